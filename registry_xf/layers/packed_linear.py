"""Linear layers whose weights are also kept in oneDNN's blocked layout for CPU inference.

PyTorch's CPU matrix multiply repacks the weight matrix on every call; for the small
batches of decoding that repacking costs more than the arithmetic, and it slows large
batches too. Packing once removes it. The original weight stays the parameter (for
saving and training); the packed copy is used only for inference on the CPU (no
autograd), is rebuilt if the weight changes, and is freed with the weight. A single row
(batch-1 decoding) is multiplied by oneDNN with the plain weight: its matrix-vector path
reads that layout faster than the blocked one.

Under ``torch.compile`` the packed multiply is the custom operator
``registry_xf::packed_linear``, which the compiler calls as an opaque kernel: the
compiled graph fuses everything around the linear layers and keeps their packed weights.
The operator is defined by ``register_packed_linear`` (idempotent), which packing calls;
importing this module changes nothing in torch.

Packing is a step of its own: ``pack_for_cpu`` (which ``registry_xf.load`` runs, and
whose outcome the load report names) swaps the class of the linear layers it packs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_linear
from .int8_linear import Int8Linear
from .norms import LayerNorm

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# CPU autocast dtypes a float32 layer keeps a packed copy of its weight in
AUTOCAST_PACKED_DTYPES = (torch.bfloat16,)
# Packing keeps a second copy of each weight: automatic packing stops at this size.
AUTO_PACK_LIMIT_BYTES = 1 << 30
# float32 products of at least this many rows go to the CPU linear kernel (``cpu_linear``),
# fewer to oneDNN, whose call costs less (decoding steps, a short input).
F32_KERNEL_FROM_ROWS = 128
_COPY = "_registry_xf_packed"  # the weight's attribute holding its packed copy


class _PackedCopy:
    """A weight's packed copy and the (data pointer, version) of the weight it was made
    from. Kept on the weight itself, so it lives and dies with it; never pickled or
    deep-copied (an unpickled one is empty and made again on first use)."""

    __slots__ = ("stamp", "tensor")

    def __init__(self) -> None:
        self.stamp: tuple[int, int] | None = None
        self.tensor: torch.Tensor | None = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_PackedCopy, ())


@functools.cache
def packing_unavailable() -> str | None:
    """Why this torch cannot pack linear weights (None when it can); asked once."""
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) is not available in this torch build"
    if not (
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return "this torch build lacks oneDNN's linear weight packing operators"
    return None


def _packing_available() -> bool:
    return packing_unavailable() is None


def _kept_copy(
    tensor: torch.Tensor, attribute: str, make: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.Tensor | None:
    """The copy of ``tensor`` that ``make`` makes, kept on ``tensor`` under ``attribute``
    and made again when ``tensor`` changes (None where ``make`` could not make it)."""
    copy = tensor.__dict__.get(attribute)
    if copy is None:
        copy = _PackedCopy()
        tensor.__dict__[attribute] = copy
    # Inference tensors (made under torch.inference_mode) keep no version counter: only
    # their replacement is noticed, not a change in place.
    stamp = (tensor.data_ptr(), -1 if tensor.is_inference() else tensor._version)
    if copy.stamp != stamp:
        copy.tensor = make(tensor.detach())
        copy.stamp = stamp
    return copy.tensor


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 8)
    except RuntimeError as e:  # this weight (dtype, shape) cannot be packed here
        logger.info("weight packing failed (%s); this layer stays plain", e)
        return None


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of ``weight`` (made on first use), or None where packing failed."""
    return _kept_copy(weight, _COPY, _pack)


def packed_weight_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``weight`` in ``dtype`` (bfloat16), packed: made on first use and kept, so that
    products under CPU autocast do not convert the weight at every call (for a short
    input that conversion costs more than the product)."""
    return _kept_copy(weight, f"{_COPY}_{dtype}", lambda w: _pack(w.to(dtype)))


def bias_in(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``bias`` in ``dtype``, made on first use and kept (as autocast would cast it)."""
    if bias is None or bias.dtype == dtype:
        return bias
    return _kept_copy(bias, f"{_COPY}_{dtype}", lambda b: b.to(dtype))


def _packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``weight``'s packed copy (CPU, no autograd).

    A single row (a decoding step of one sequence) goes to oneDNN with the plain weight
    instead: for a matrix-vector product it reads that layout about a tenth faster than
    the blocked one, which suits several rows."""
    if not (x.numel() == x.shape[-1] and weight.is_contiguous()):
        packed = packed_weight(weight)
        if packed is None:
            return F.linear(x, weight, bias)
        weight = packed
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fused_activation(activation: nn.Module) -> tuple[str, list, str] | None:
    """oneDNN's post-op for ``activation`` (its name, scalars, algorithm), where it has one
    that computes the same function: exact and tanh GELU, ReLU."""
    if type(activation) is nn.GELU:
        return "gelu", [], activation.approximate
    if type(activation) is nn.ReLU:
        return "relu", [], ""
    return None


# oneDNN's post-op (name + algorithm) -> the CPU linear kernel's activation. For bfloat16
# products the kernel runs where it fuses what oneDNN's autocast path does in passes of its
# own (rounding x, adding a residual): an activation or a residual; a plain bfloat16 product
# is as fast in oneDNN. For float32 it runs for every product of enough rows.
_KERNEL_ACTIVATIONS = {"gelunone": "gelu", "gelutanh": "gelu_tanh", "relu": "relu"}


def _hooked(linear: nn.Module) -> bool:
    """Whether ``linear`` has hooks (a hook, such as a tensor-parallel all-reduce, must see
    the layer's own output, so no post-op may be fused into it)."""
    return bool(linear._forward_hooks or linear._forward_pre_hooks)


def _fusable(linear: nn.Module) -> bool:
    """Whether a post-op may replace calling ``linear``: a packed layer without hooks."""
    return type(linear) is PackedLinear and not _hooked(linear)


def linear_then_activation(
    linear: nn.Module, activation: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """``activation(linear(x))``; a packed layer applies a GELU or ReLU inside its multiply
    (a oneDNN post-op), so the wide intermediate is written once and not read again; an
    int8 layer applies it where it turns its products back into floats."""
    if type(linear) is Int8Linear and not _hooked(linear):
        return linear(x, activation=activation)
    post_op = _fused_activation(activation)
    if post_op is not None and _fusable(linear) and not linear.uses_packed(x):
        dtype = linear.autocast_dtype(x)  # autocast: the activation on the product's dtype
        out = None if dtype is None else linear.autocast_linear(x, dtype, post_op)
        if out is not None:
            return out
    if (
        post_op is None
        or not _fusable(linear)
        or not linear.uses_packed(x)
        or torch.compiler.is_compiling()
        or x.numel() == x.shape[-1]
    ):
        return activation(linear(x))
    if post_op[0] + post_op[2] in _KERNEL_ACTIVATIONS:
        out = linear.f32_kernel_linear(x, _KERNEL_ACTIVATIONS[post_op[0] + post_op[2]])
        if out is not None:
            return out
    packed = packed_weight(linear.weight)
    if packed is None:
        return activation(linear(x))
    return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, *post_op)


def _plain_layer_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a LayerNorm the CPU linear kernel may apply in its place: torch's
    or registry_xf's class itself (a subclass may compute something else), without hooks."""
    return type(norm) in (nn.LayerNorm, LayerNorm) and not _hooked(norm)


def linear_plus(
    linear: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor,
    norm: nn.Module | None = None,
) -> torch.Tensor:
    """``linear(x) + residual``, then ``norm`` where given (a post-norm layer's); a packed
    layer adds inside its multiply (a oneDNN post-op or the CPU linear kernel), saving a
    pass over the output (a residual connection's sum); so does an int8 layer. The CPU
    linear kernel (float32, or bfloat16 under CPU autocast) also applies a plain LayerNorm
    ``norm`` to the rows it has just finished."""
    if norm is not None:
        if _fusable(linear) and _plain_layer_norm(norm):
            if linear.autocast_dtype(x) is not None:
                out = linear.kernel_linear(x, residual=residual, out_dtype=torch.float32, norm=norm)
            else:
                out = linear.f32_kernel_linear(x, residual=residual, norm=norm)
            if out is not None:
                return out
        return norm(linear_plus(linear, x, residual))
    if type(linear) is Int8Linear and not _hooked(linear):
        out_shape = (*x.shape[:-1], linear.out_features)
        if residual.shape == out_shape:
            return linear(x, residual=residual)
    if _fusable(linear) and linear.autocast_dtype(x) is not None:  # autocast: the kernel
        out = linear.kernel_linear(x, residual=residual, out_dtype=torch.float32)
        if out is not None:
            return out
    if (
        not _fusable(linear)
        or not linear.uses_packed(x)
        or torch.compiler.is_compiling()
        or x.numel() == x.shape[-1]
        or residual.shape[:-1] != x.shape[:-1]
        or residual.dtype != x.dtype
    ):
        return linear(x) + residual
    out = linear.f32_kernel_linear(x, residual=residual)
    if out is not None:
        return out
    packed = packed_weight(linear.weight)
    if packed is None:
        return linear(x) + residual
    return torch.ops.mkldnn._linear_pointwise.binary(
        x, residual.contiguous(), packed, linear.bias, "add"
    )


def _packed_linear_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@functools.cache
def register_packed_linear() -> torch.library.Library:
    """Define the operator ``registry_xf::packed_linear`` (once; later calls return the
    same library). Defined with the plain operator library, not
    ``torch.library.custom_op``, whose wrapper adds about 20 µs a call: a tenth of a small
    linear layer's time in a decoding step."""
    library = torch.library.Library("registry_xf", "FRAGMENT")
    library.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    library.impl("packed_linear", _packed_linear, "CPU")
    torch.library.register_fake("registry_xf::packed_linear", _packed_linear_shape, lib=library)
    return library


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies with a prepacked copy of its weight when it can."""

    def __setstate__(self, state: dict) -> None:  # unpickled or deep-copied: compilable too
        super().__setstate__(state)
        register_packed_linear()

    def uses_packed(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is multiplied with the packed weight (CPU inference). Not under
        CPU autocast, which casts the inputs of a plain ``F.linear`` only."""
        weight = self.weight
        return not (
            torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            or x.device.type != "cpu"
            or weight.device.type != "cpu"
            or x.dtype != weight.dtype
            or weight.dtype not in PACKABLE_DTYPES
        )

    def autocast_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype CPU autocast multiplies ``x`` in, where this layer does it eagerly
        with a packed copy of its float32 weight in that dtype, kept (inference; under
        ``torch.compile`` the compiler folds and packs the converted weight itself)."""
        if (
            torch.is_grad_enabled()
            or not torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
        ):
            return None
        dtype = torch.get_autocast_dtype("cpu")
        weight = self.weight
        if (
            dtype not in AUTOCAST_PACKED_DTYPES
            or weight.dtype != torch.float32
            or x.dtype not in (torch.float32, dtype)
            or x.device.type != "cpu"
            or weight.device.type != "cpu"
        ):
            return None
        return dtype

    def autocast_linear(
        self, x: torch.Tensor, dtype: torch.dtype, post_op: tuple[str, list, str] | None = None
    ) -> torch.Tensor | None:
        """What CPU autocast makes of ``F.linear`` (then ``post_op``): ``x``, the weight and
        the bias in ``dtype``, the result in ``dtype``; the weight's copy packed and kept.
        None where that copy could not be packed (the caller runs the plain layer)."""
        if post_op is not None and post_op[0] + post_op[2] in _KERNEL_ACTIVATIONS:
            out = self.kernel_linear(x, _KERNEL_ACTIVATIONS[post_op[0] + post_op[2]], None, dtype)
            if out is not None:
                return out
        packed = packed_weight_in(self.weight, dtype)
        if packed is None:
            return None
        bias = bias_in(self.bias, dtype)
        return torch.ops.mkldnn._linear_pointwise(
            x.to(dtype), packed, bias, *(post_op or ("none", [], ""))
        )

    def kernel_linear(
        self,
        x: torch.Tensor,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        norm: nn.LayerNorm | None = None,
        products: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor | None:
        """``activation(self(x)) + residual``, then the LayerNorm ``norm`` where given, by
        the CPU linear kernel (``cpu_linear``) with ``products`` (bfloat16 or float32), with
        its packed copy of the weight made on first use and kept; None where the kernel
        does not apply."""
        weight = self.weight
        return cpu_linear.linear(
            x,
            weight,
            lambda: _kept_copy(
                weight, f"{_COPY}_kernel_{products}", lambda w: cpu_linear.pack_weight(w, products)
            ),
            self.bias,
            activation,
            residual,
            out_dtype,
            norm,
            products,
        )

    def f32_kernel_linear(
        self,
        x: torch.Tensor,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
        norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor | None:
        """``kernel_linear`` with float32 products, for a float32 ``x`` of at least
        ``F32_KERNEL_FROM_ROWS`` rows that this layer multiplies with packed weights
        (``uses_packed``); None elsewhere, or where the kernel does not apply."""
        if (
            x.dtype != torch.float32
            or x.numel() < F32_KERNEL_FROM_ROWS * x.shape[-1]
            or not self.uses_packed(x)
        ):
            return None
        return self.kernel_linear(x, activation, residual, torch.float32, norm, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not self.uses_packed(x):
            dtype = self.autocast_dtype(x)
            out = None if dtype is None else self.autocast_linear(x, dtype)
            return F.linear(x, weight, self.bias) if out is None else out
        if torch.compiler.is_compiling():  # the operator: opaque to the compiler
            return torch.ops.registry_xf.packed_linear(x, weight, self.bias)
        out = self.f32_kernel_linear(x)
        if out is not None:
            return out
        return _packed_linear(x, weight, self.bias)  # eagerly, without the dispatcher


def pack_linear_weights(model: nn.Module, modules: list[nn.Module] | None = None) -> int:
    """Make every CPU ``nn.Linear`` of ``model`` a ``PackedLinear``; return how many.

    Each packs its weight on its first inference call, so loading stays fast and a model
    never used for inference never pays for it. A no-op (0) where oneDNN is unavailable
    or weights are not float32/bfloat16 on CPU. ``modules``: ``model``'s, where the caller
    has listed them already.
    """
    if not _packing_available():
        return 0
    register_packed_linear()
    packed = 0
    for module in model.modules() if modules is None else modules:
        if type(module) is nn.Linear:
            weight = module.weight
            if weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES:
                module.__class__ = PackedLinear
                packed += 1
    return packed


def should_pack(model: nn.Module) -> bool:
    """Automatic choice: pack CPU float32/bfloat16 models up to ``AUTO_PACK_LIMIT_BYTES``."""
    return _why_not_packed(model) is None


def _why_not_packed(model: nn.Module, modules: list[nn.Module] | None = None) -> str | None:
    params = _parameters(list(model.modules()) if modules is None else modules)
    if not params:
        return "no parameters"
    unavailable = packing_unavailable()
    if unavailable is not None:
        return unavailable
    off_cpu = other_dtype = False
    size = 0
    for p in params:  # one pass: this runs at every load
        off_cpu = off_cpu or p.device.type != "cpu"
        other_dtype = other_dtype or p.dtype not in PACKABLE_DTYPES
        size += p.numel() * p.element_size()
    if off_cpu:
        return "not on the CPU"
    if other_dtype:
        return "weights neither float32 nor bfloat16"
    if size > AUTO_PACK_LIMIT_BYTES:
        return (
            f"{size / 2**30:.2f} GiB of weights, over the automatic limit of "
            f"{AUTO_PACK_LIMIT_BYTES / 2**30:.0f} GiB (packing keeps a second copy)"
        )
    return None


def _parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The distinct parameters of ``modules``, as ``parameters()`` lists them, read
    straight from each module (half the time)."""
    seen: set[int] = set()
    found = []
    for module in modules:
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                found.append(p)
    return found


def pack_for_cpu(model: nn.Module, pack: bool | None = None) -> str:
    """The packing step: pack ``model``'s CPU linear weights when ``pack`` says so (None:
    automatically, see ``should_pack``). Returns what was done, or why not, in words."""
    if pack is False:
        return "off (pack=false)"
    modules = list(model.modules())  # walked once for both steps
    if pack is None:
        reason = _why_not_packed(model, modules)
        if reason is not None:
            return f"not packed: {reason}"
    count = pack_linear_weights(model, modules)
    if not count:
        return "not packed: " + (packing_unavailable() or "no float32/bfloat16 CPU linear layers")
    how = "automatic" if pack is None else "pack=true"
    return f"{count} linear layers packed ({how}; each on its first inference call)"
