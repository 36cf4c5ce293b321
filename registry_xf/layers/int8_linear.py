"""Linear layers that multiply in int8 on the CPU: weights quantised once per output row,
activations per row (token), over the row's own range, at each call.

An int8 matrix product reads a quarter of float32's bytes and, on CPUs with VNNI or AMX,
does four to sixteen times the multiply-adds per instruction. Scaling each token's row of
activations by its own range (not one scale for the whole batch, as ONNX Runtime's and
torch's dynamic quantisation do) keeps a rare large activation from crushing the others:
embeddings stay within a cosine of about 0.997 of float32's, where per-tensor schemes lose
several hundredths on small models.

The multiply itself is a small part of the time; the passes around it (find each row's
range, quantise; turn the int32 products back into floats, add the bias) would cost more
than it if each were a separate torch operation. So each side is one function that
``torch.compile`` turns into one C++ loop (dynamic shapes: one compilation for every batch
size and width), and the layer after the multiply also applies the feed-forward's
activation or adds the residual connection in that loop (``linear_then_activation`` and
``linear_plus`` call it so). Where compiling is impossible (no C++ compiler), the same
functions run eagerly, slower, with a warning. On CPUs with AVX-512 a C++ kernel of
registry_xf's own does these passes instead, and a whole feed-forward layer at once
(``cpu_int8``): no compiling, a few µs per call, the same int8 codes.

``quantize_int8(model)`` swaps every ``nn.Linear`` (packed or not) for an ``Int8Linear``;
inference only (no autograd through the int8 weights).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RegistryXFError
from . import cpu_int8

logger = logging.getLogger(__name__)

_LIMIT = 127.0  # symmetric int8: -127..127, so that negation never overflows
# Rows (tokens) from which the compiled element-wise loops beat plain torch operations
# (measured on a 2-core AVX-512 CPU: about 60 µs of overhead per compiled call)
FUSE_FROM_ROWS = 32
# Up to this many torch threads the compiled loops run on one thread (see ``_Fused``)
SERIAL_UP_TO_THREADS = 2


@functools.cache
def int8_unavailable() -> str | None:
    """Why this torch cannot multiply int8 matrices on the CPU (None when it can)."""
    if not hasattr(torch, "_int_mm"):
        return "this torch has no int8 matrix multiply (torch._int_mm)"
    try:
        a = torch.ones(2, 8, dtype=torch.int8)
        torch._int_mm(a, a.t().contiguous())
    except RuntimeError as e:
        return f"this torch cannot multiply int8 matrices on the CPU ({e})"
    return None


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of each row of ``x`` (2-D float) and the float32 scale of each row
    (for weights: quantised once, so plain torch operations do)."""
    peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True).float()
    scale = peak.clamp_(min=1e-12).div_(_LIMIT)
    return (x / scale).round_().to(torch.int8), scale


def quantize_rows_shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Int8 of each row of ``x`` (2-D) over its own range [min, max] (with 0 inside it):
    the int8 values, the float32 scale and the shift (an integer, as float32) of each
    row. Activations after GELU or a norm are lopsided: a range that fits them is up to
    twice as fine as a symmetric one. Written without in-place steps so that it compiles
    to one loop."""
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    low, high = low.float().clamp(max=0.0), high.float().clamp(min=0.0)
    scale = (high - low).clamp(min=1e-12) / (2 * _LIMIT)
    shift = torch.round(low / scale) + _LIMIT  # low lands on -127
    q = (torch.round(x.float() / scale) - shift).clamp(-_LIMIT, _LIMIT).to(torch.int8)
    return q, scale, shift


def dequantize_products(
    products: torch.Tensor,
    x_scale: torch.Tensor,
    shift: torch.Tensor,
    column_sums: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The float result of the int32 ``products`` of shifted int8 rows and int8 weights:
    x = x_scale * (q + shift), so x @ W = x_scale * weight_scale * (q @ Wq + shift *
    column sums of Wq); then the bias, the ``activation`` (a name of ``_ACTIVATIONS``)
    and the ``residual``, in ``dtype``."""
    y = (products.float() + shift * column_sums) * (x_scale * weight_scale) + bias
    if activation is not None:
        y = _ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual.float()
    return y.to(dtype)


# One entry per kind of call (plain, activated, plus a residual): torch.compile keeps its
# graphs, and counts its recompilations against a limit, per function, and every kind
# gets a graph per torch thread count in use (streams change it), so one function for all
# kinds would reach the limit and fall back to the unfused steps.
def _dequantize(*args: Any) -> torch.Tensor:
    return dequantize_products(*args)


def _dequantize_activated(*args: Any) -> torch.Tensor:
    return dequantize_products(*args)


def _dequantize_plus(*args: Any) -> torch.Tensor:
    return dequantize_products(*args)


def _dequantize_entry(activation: str | None, residual: torch.Tensor | None) -> Callable:
    if activation is not None:
        return _dequantize_activated if residual is None else dequantize_products
    return _dequantize if residual is None else _dequantize_plus


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def _activation_name(activation: nn.Module) -> str | None:
    """The name in ``_ACTIVATIONS`` of what ``activation`` computes, if it is there."""
    if type(activation) is nn.GELU:
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}
    return names.get(type(activation))  # type: ignore[call-overload]


class _Fused:
    """The element-wise steps compiled (once per process, on first use), or the plain
    functions where compiling failed.

    With one or two threads the loops run on one thread: every parallel loop ends at a
    barrier, and on a 2-core machine that also runs other work a barrier often waits for
    a descheduled thread; int8 has three loops per layer where float32 has one. Measured
    on a busy 2-core CPU: 1.35x float32's speed with single-threaded loops, 0.70x with
    parallel ones. With more threads the loops are parallel."""

    failed: str | None = None

    @staticmethod
    @functools.cache
    def compiled(fn: Callable, serial: bool) -> Callable:
        options = {"cpp.threads": 1} if serial else None
        return torch.compile(fn, dynamic=True, fullgraph=True, options=options)

    @classmethod
    def run(cls, fn: Callable, *args: Any) -> Any:
        if cls.failed is not None or torch.compiler.is_compiling():
            return fn(*args)  # under an outer compile, the outer graph fuses it
        try:
            return cls.compiled(fn, torch.get_num_threads() <= SERIAL_UP_TO_THREADS)(*args)
        except Exception as e:  # no C++ compiler, an unsupported torch build...
            cls.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning(
                "int8: compiling the quantise/dequantise steps failed (%s); they run "
                "unfused, which is slower than float32",
                cls.failed,
            )
            return fn(*args)


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as int8 rows and their float32 scales.

    ``fused=False`` runs the element-wise steps as plain torch operations (no compiling);
    the results are the same up to float rounding."""

    def __init__(self, linear: nn.Linear, *, fused: bool = True):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        self.fused = fused
        qweight, scale = _quantize_rows(weight.float())
        # (in, out) with the columns contiguous: the layout oneDNN reads fastest
        self.register_buffer("qweight", qweight.t(), persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1), persistent=False)
        self.register_buffer("column_sums", qweight.float().sum(1).reshape(1, -1), persistent=False)
        # zeros where the layer has none: one compiled loop serves layers with and without
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias.float(), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        *,
        activation: nn.Module | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``activation(x @ W.T + b) + residual`` (both optional), the activation and the
        sum inside the loop that turns the int32 products back into floats where it can
        (GELU, ReLU, SiLU, tanh; another activation module is applied after)."""
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            out = x.new_zeros((*shape[:-1], self.out_features))
            out = out if activation is None else activation(out)
            return out if residual is None else out + residual
        name = None if activation is None else _activation_name(activation)
        late = activation is not None and name is None  # applied after, and the sum too
        plus = None if residual is None or late else residual.reshape(-1, self.out_features)
        kernel = cpu_int8.ready(rows) if self.fused else None
        y = None
        if kernel is not None:  # the C++ passes (AVX-512), for any number of rows
            products, x_scale, shift = cpu_int8.multiply(kernel, rows, self.qweight)
            y = cpu_int8.dequantize(kernel, products, x_scale, shift, *self._columns(), plus, name)
        else:
            # A few rows (a short sentence, a decoding step) run unfused: calling a
            # compiled function costs more than its loop saves there (and the size 1
            # would be compiled again: torch.compile specialises it)
            run = _Fused.run if self.fused and rows.shape[0] >= FUSE_FROM_ROWS else _call
            qx, x_scale, shift = run(quantize_rows_shifted, rows)
            products = torch._int_mm(qx, self.qweight)
        if y is None:
            run = _Fused.run if self.fused and rows.shape[0] >= FUSE_FROM_ROWS else _call
            y = run(
                _dequantize_entry(name, plus),
                products,
                x_scale,
                shift,
                *self._columns(),
                plus,
                name,
                x.dtype,
            )
        y = y.reshape(*shape[:-1], self.out_features)
        if late:
            y = activation(y)  # type: ignore[misc]
            return y if residual is None else y + residual
        return y

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.column_sums, self.weight_scale, self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_feed_forward(
    up: nn.Module,
    activation: nn.Module,
    down: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor | None,
) -> torch.Tensor | None:
    """``down(activation(up(x))) + residual`` where both are int8 layers and the C++
    kernel takes it (see ``cpu_int8.feed_forward``): the wide activated rows go straight
    to int8. None otherwise (the caller runs the layers one by one)."""
    if type(up) is not Int8Linear or type(down) is not Int8Linear:
        return None
    if not (up.fused and down.fused):
        return None
    if up._forward_hooks or up._forward_pre_hooks or down._forward_hooks:
        return None  # a hook must see its layer's own input and output
    if down._forward_pre_hooks or up.out_features != down.in_features:
        return None
    name = _activation_name(activation)
    rows = x.reshape(-1, up.in_features)
    if name is None or rows.shape[0] == 0:
        return None
    kernel = cpu_int8.ready(rows)
    if kernel is None:
        return None
    if residual is not None and residual.shape != (*x.shape[:-1], down.out_features):
        return None  # a residual broadcast over the rows: the layers one by one
    plus = None if residual is None else residual.reshape(-1, down.out_features)
    y = cpu_int8.feed_forward(
        kernel,
        rows,
        (up.qweight, *up._columns()),
        name,
        (down.qweight, *down._columns()),
        plus,
    )
    return None if y is None else y.reshape(*x.shape[:-1], down.out_features)


def _call(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def quantize_int8(model: nn.Module, *, fused: bool = True) -> int:
    """Replace every linear layer of ``model`` (on the CPU) by an ``Int8Linear``; return
    how many. Weights are quantised now; the float weights are released. ``fused=False``
    skips compiling the element-wise steps (slower; for a torch without a C++ compiler)."""
    unavailable = int8_unavailable()
    if unavailable is not None:
        raise RegistryXFError(f"int8 quantisation: {unavailable}")
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        if child.weight.device.type != "cpu":
            raise RegistryXFError(
                f"int8 quantisation runs on the CPU; layer {name} is on {child.weight.device}"
            )
        if child.weight.shape[0] < 2 or child.weight.shape[1] < 8:  # too small to gain
            continue
        setattr(parent, name, Int8Linear(child, fused=fused))
    count = sum(isinstance(m, Int8Linear) for m in model.modules())
    logger.info("int8: %d linear layers quantised", count)
    return count
