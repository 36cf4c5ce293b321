"""Linear layers on AVX-512 CPUs by a small C++ kernel compiled on first use: float32
products, or bfloat16 products (AVX512-BF16) with float32 sums.

The kernel (``cpu_linear.cpp``) keeps the weight packed in its own layout, panels of 64
output columns, and adds the bias, applies a GELU or ReLU and adds a residual as it stores
each block of the output, so none of these costs a pass of its own. A post-norm transformer
layer (BERT) normalises the output projection's sum with its residual right away: ``norm=``
(an ``nn.LayerNorm`` over the output's width) has the kernel normalise each finished row
while it is still in cache (float32 statistics, the module's epsilon, weight and bias),
saving the norm's own pass over the output.

- **float32** (packed layers, eagerly, from ``packed_linear.F32_KERNEL_FROM_ROWS`` rows): x is
  read in place. The products run at the speed of oneDNN's packed ones (about 92% of one
  Zen 4 core's float32 peak at 2,048 rows); what the kernel saves are the LayerNorms'
  passes and part of the epilogues' cost (the GELU above all): float32 passes of
  all-MiniLM-L6-v2 take about 3% less time. ``REGISTRY_XF_CPU_F32_LINEAR=0`` leaves them to oneDNN.
- **bfloat16** (``matmul_dtype="bfloat16"``, CPU autocast): oneDNN's bfloat16 products
  need their float32 inputs converted first (a pass of its own over every activation); the
  kernel rounds x to bfloat16 while copying blocks of it into cache. Its products alone run
  as fast as oneDNN's (about 90% of the bfloat16 peak on one Zen 4 core); what it saves
  are the passes, so layers call it for a product followed by an activation or a residual
  and leave plain bfloat16 products to oneDNN. ``REGISTRY_XF_CPU_BF16_LINEAR=0`` leaves
  them all to oneDNN.

``REGISTRY_XF_CPU_LINEAR_NORM=0`` leaves LayerNorms to torch.

``linear(x, weight, packed, bias, ...)`` returns ``act(x @ weightᵀ + bias) [+ residual]``
or None where the kernel does not apply, and the caller then runs oneDNN: not a CPU
input whose rows are contiguous (float32, or bfloat16 for bfloat16 products), a weight that
is not float32, autograd, ``torch.compile`` or tracing, no AVX-512 (or AVX512-BF16 for
bfloat16 products), no C++ compiler, or the switch off. Each reason is logged once.
``packed`` is the weight in the kernel's layout, made by ``pack_weight`` (the caller keeps
it).

Each call uses at most ``torch.get_num_threads()`` threads (OpenMP: the runtime torch has
loaded), one for small products; ctypes releases the GIL, and calls from several Python
threads at once share nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_linear.cpp")
SWITCHES = {  # "0", "off", "false" or "no": oneDNN for these products
    torch.float32: "REGISTRY_XF_CPU_F32_LINEAR",
    torch.bfloat16: "REGISTRY_XF_CPU_BF16_LINEAR",
}
NORM_SWITCH = "REGISTRY_XF_CPU_LINEAR_NORM"  # "0" etc.: LayerNorms stay torch's
PANEL = 64  # output columns per packed weight panel (the kernel's, checked at load)
# Below this many multiply-adds (about 40 µs of work) one thread does it all.
PARALLEL_FROM = 4_000_000
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def enabled(products: torch.dtype = torch.bfloat16) -> bool:
    """Whether the environment lets the kernel compute ``products`` (``SWITCHES``)."""
    return cpu_kernels.switched_on(SWITCHES[products])


def norm_enabled() -> bool:
    """Whether the environment lets the kernel apply a LayerNorm itself
    (``REGISTRY_XF_CPU_LINEAR_NORM``; the kernel must be on too)."""
    return cpu_kernels.switched_on(NORM_SWITCH)


_skips = {
    torch.float32: cpu_kernels.OnceLog(logger, "CPU float32 linear kernel", "oneDNN"),
    torch.bfloat16: cpu_kernels.OnceLog(logger, "CPU bfloat16 linear kernel", "oneDNN"),
}


def _declare(lib: ctypes.CDLL) -> None:
    lib.rx_linear.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_float,
    ]
    lib.rx_linear.restype = ctypes.c_int
    lib.rx_linear_has_bf16.restype = ctypes.c_int
    lib.rx_linear_panel_width.restype = ctypes.c_int


def library(products: torch.dtype = torch.bfloat16) -> ctypes.CDLL | str:
    """The kernel library, built on first use, or the reason it cannot compute
    ``products`` here (including, for bfloat16, a CPU without AVX512-BF16)."""
    if products == torch.bfloat16 and not cpu_has_bf16():
        return "the CPU lacks AVX512-BF16"
    lib = cpu_kernels.library(SOURCE, _declare)
    if isinstance(lib, str):
        return lib
    return _checked(lib, products)


_libraries = {products: functools.partial(library, products) for products in SWITCHES}


def cpu_has_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 (``cpu_kernels.cpu_flags`` reads its flags once)."""
    return "avx512_bf16" in cpu_kernels.cpu_flags()


@functools.cache
def _checked(lib: ctypes.CDLL, products: torch.dtype) -> ctypes.CDLL | str:
    if lib.rx_linear_panel_width() != PANEL:
        return f"the kernel's panels are {lib.rx_linear_panel_width()} columns, not {PANEL}"
    if products == torch.bfloat16 and not lib.rx_linear_has_bf16():
        return "the kernel was built without AVX512-BF16"
    return lib


def pack_weight(weight: torch.Tensor, products: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``weight`` (out x in, float32) in the kernel's layout for ``products``, panels of 64
    output rows, the padding zeros. float32: [ceil(out / 64), in, 64]. bfloat16 (rounded to
    nearest even, as ``.to(torch.bfloat16)``), pairs of inputs side by side:
    [ceil(out / 64), ceil(in / 2), 64, 2]."""
    n, k = weight.shape
    n_pad = -n % PANEL
    if products == torch.float32:
        w = F.pad(weight.detach().to(torch.float32), (0, 0, 0, n_pad))
        return w.view((n + n_pad) // PANEL, PANEL, k).transpose(1, 2).contiguous()
    k_pad = k % 2
    w = F.pad(weight.detach(), (0, k_pad, 0, n_pad)).to(torch.bfloat16)
    w = w.view((n + n_pad) // PANEL, PANEL, (k + k_pad) // 2, 2)
    return w.permute(0, 2, 1, 3).contiguous()


def _problem(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, products: torch.dtype
) -> str | None:
    """Why these tensors are not a case the kernel computes (None when they are)."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"tensors on {x.device}"
    inputs = (torch.float32,) if products == torch.float32 else (torch.float32, torch.bfloat16)
    if x.dtype not in inputs or weight.dtype != torch.float32:
        return f"input {x.dtype} and weight {weight.dtype} for {products} products"
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return "an input whose width is not the weight's"
    if x.numel() == 0 or x.numel() >= 2**31:
        return "an empty or huge input"
    if not x.is_contiguous():
        return "an input that is not contiguous"
    if residual is not None and (
        residual.dtype != torch.float32
        or residual.shape != (*x.shape[:-1], weight.shape[0])
        or not residual.is_contiguous()
    ):
        return "a residual that is not a contiguous float32 tensor of the output's shape"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "autograd"
    return None


def _norm_problem(norm: nn.LayerNorm, n: int, out_dtype: torch.dtype) -> str | None:
    """Why the kernel cannot apply ``norm`` to its output (None when it can)."""
    if not norm_enabled():
        return f"{NORM_SWITCH} leaves LayerNorms to torch"
    if tuple(norm.normalized_shape) != (n,):
        return "a LayerNorm over other than the output's last dimension"
    if out_dtype != torch.float32:
        return "a LayerNorm on a bfloat16 output"
    for tensor in (norm.weight, norm.bias):
        if tensor is None:
            continue
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            return f"LayerNorm parameters in {tensor.dtype} on {tensor.device}"
        if torch.is_grad_enabled() and tensor.requires_grad:
            return "autograd"
    return None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    norm: nn.LayerNorm | None = None,
    products: torch.dtype = torch.bfloat16,
) -> torch.Tensor | None:
    """``activation(x @ weightᵀ + bias) + residual`` with ``products`` (float32, or
    bfloat16 with float32 sums), in ``out_dtype`` (float32, or bfloat16 for bfloat16
    products), then ``norm`` (a LayerNorm over the output's width, float32 output only), or
    None where the kernel does not apply (see the module's docstring; the caller then runs
    the norm too). ``packed()`` gives ``pack_weight(weight, products)`` (kept by the
    caller), asked only when the kernel runs."""
    n, k = weight.shape

    def problem() -> str | None:
        found = _problem(x, weight, residual, products)
        if found is None and products == torch.float32 and out_dtype != torch.float32:
            found = f"a {out_dtype} output of float32 products"
        if found is None and norm is not None:
            found = _norm_problem(norm, n, out_dtype)
        return found

    lib = cpu_kernels.usable_library(
        SWITCHES[products], _libraries[products], _skips[products], problem
    )
    if isinstance(lib, str):
        return None  # oneDNN's operator (in a graph, the one the compiler or exporter knows)
    m = x.numel() // k
    threads = 1 if m * n * k < PARALLEL_FROM else torch.get_num_threads()
    weights = packed()
    out = torch.empty((*x.shape[:-1], n), dtype=out_dtype)
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    norm_weight = norm_bias = None
    if norm is not None:
        norm_weight = None if norm.weight is None else norm.weight.detach().contiguous()
        norm_bias = None if norm.bias is None else norm.bias.detach().contiguous()
    sizes = (ctypes.c_int64 * 6)(m, k, n, k, n, n)
    status = lib.rx_linear(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        weights.data_ptr(),
        int(products == torch.float32),
        None if bias is None else bias.data_ptr(),
        None if residual is None else residual.data_ptr(),
        out.data_ptr(),
        int(out_dtype == torch.bfloat16),
        sizes,
        ACTIVATIONS[activation],
        threads,
        int(norm is not None),
        None if norm_weight is None else norm_weight.data_ptr(),
        None if norm_bias is None else norm_bias.data_ptr(),
        0.0 if norm is None else float(norm.eps),
    )
    if status:
        _skips[products](f"the kernel could not run (status {status})", logging.WARNING)
        return None
    return out
