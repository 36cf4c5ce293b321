"""The quantise and dequantise passes of int8 linear layers, by a small C++ kernel for
AVX-512 CPUs (``cpu_int8.cpp``), compiled on first use and cached (see ``cpu_kernels``).

``Int8Linear`` spends about as long in these element-wise passes as in its int8 multiply.
Compiled by ``torch.compile`` they cost some 60 µs per call in the compiled code's wrapper
(too much for a short batch's few rows), and the GELU after the feed-forward's first
product computes ``erf`` through a general library function. The kernel does each pass
in one call with a few µs of overhead: rows are quantised from L1 (min and max, then the
codes), and GELU's ``erf`` is a short polynomial times an exponential (absolute error
below 2e-7). The int8 codes, scales and shifts are exactly ``quantize_rows_shifted``'s.

Two more savings: each thread keeps the memory of its codes and int32 products between
calls (``multiply``; fresh pages for every product cost the operating system a tenth of
a pass), and a feed-forward layer of two int8 linears runs in one go (``feed_forward``):
its wide activated rows are quantised for the second product as they are made, in L1,
never written out as floats.

Each function returns None where the kernel does not apply, and the caller then runs the
compiled or plain torch functions: not a float32 CPU tensor, rows that are not contiguous,
autograd, ``torch.compile`` or tracing (the graph has torch's operators), no AVX-512, no
C++ compiler, or ``REGISTRY_XF_CPU_INT8=0``. Each reason is logged once.

Calls use one thread up to ``SERIAL_UP_TO_THREADS`` torch threads (as the compiled loops
do: on a busy 2-core machine a parallel loop's barrier often waits for a descheduled
thread; measured with this kernel too), else torch's thread count. ctypes releases the
GIL, and threads share nothing, so ``Embedder(streams=N)`` runs N at once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

from . import cpu_kernels

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_int8.cpp")
SWITCH = "REGISTRY_XF_CPU_INT8"  # "0", "off", "false" or "no": the compiled torch loops
ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "tanh": 5}
SERIAL_UP_TO_THREADS = 2
# Below this many elements a pass runs on one thread whatever torch's count: starting
# and joining threads costs more than it saves
PARALLEL_FROM = 1 << 18

# Bytes each thread keeps between calls for the int8 codes and the int32 products (freed
# with the thread); a larger product gets memory of its own
SCRATCH_LIMIT = 64 << 20


class _Scratch(threading.local):
    """One thread's memory for the codes and products of its int8 multiplies: both live
    only within one layer's call, and reusing them spares the operating system's work of
    mapping fresh zeroed pages for every product (several per call, a tenth of a pass's
    time otherwise)."""

    buffer: torch.Tensor | None = None

    def take(self, size: int) -> torch.Tensor:
        """``size`` bytes, valid until this thread's next call."""
        if size > SCRATCH_LIMIT:
            return torch.empty(size, dtype=torch.uint8)
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = None  # the old one is freed first
            self.buffer = torch.empty(max(size, 1 << 20), dtype=torch.uint8)
        return self.buffer


_scratch = _Scratch()


_skip = cpu_kernels.OnceLog(logger, "CPU int8 kernel", "the torch loops")


_P = ctypes.c_void_p
_I = ctypes.c_int64


def _declare(lib: ctypes.CDLL) -> None:
    lib.rx_int8_quantize.argtypes = [_P, _I, _I, _I, _P, _P, _P, ctypes.c_int]
    lib.rx_int8_dequantize.argtypes = [_P, _I, _I, *[_P] * 6, _I, ctypes.c_int, _P, ctypes.c_int]
    lib.rx_int8_dequantize_quantize.argtypes = [
        *(_P, _I, _I),
        *[_P] * 5,
        ctypes.c_int,
        *[_P] * 3,
        ctypes.c_int,
    ]
    for fn in (lib.rx_int8_quantize, lib.rx_int8_dequantize, lib.rx_int8_dequantize_quantize):
        fn.restype = ctypes.c_int


def library() -> ctypes.CDLL | str:
    """The kernel library, built on first use, or the reason it is unavailable."""
    return cpu_kernels.library(SOURCE, _declare)


def ready(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library, where the kernel may take ``x`` (2-D rows); None otherwise (logged)."""
    lib = cpu_kernels.usable_library(SWITCH, library, _skip, lambda: _problem(x))
    return None if isinstance(lib, str) else lib


def _problem(x: torch.Tensor) -> str | None:
    """Why ``x`` is not a case the kernel takes (None when it is)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"a {x.dtype} tensor on {x.device}"
    if x.dim() != 2 or x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        return "rows that are not contiguous"
    if x.requires_grad and torch.is_grad_enabled():
        return "autograd"
    return None


def _threads(elements: int) -> int:
    threads = torch.get_num_threads()
    return 1 if threads <= SERIAL_UP_TO_THREADS or elements < PARALLEL_FROM else threads


def quantize_rows(
    lib: ctypes.CDLL, x: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_rows_shifted(x)`` by the kernel, for ``x`` that ``ready`` accepted: the
    int8 codes (into ``out`` if given: contiguous, x's shape), and the float32 scale and
    shift of each row (each (rows, 1))."""
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8) if out is None else out
    scale = torch.empty((rows, 1), dtype=torch.float32)
    shift = torch.empty((rows, 1), dtype=torch.float32)
    lib.rx_int8_quantize(
        x.data_ptr(),
        rows,
        cols,
        x.stride(0),
        q.data_ptr(),
        scale.data_ptr(),
        shift.data_ptr(),
        _threads(x.numel()),
    )
    return q, scale, shift


def multiply(
    lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int32 products of ``x``'s rows quantised and the int8 ``qweight`` (in, out),
    and the rows' scales and shifts. The codes and products are in this thread's scratch
    memory: the products are valid until its next call."""
    rows, cols = x.shape
    width = qweight.shape[1]
    at = (rows * width * 4 + 63) // 64 * 64  # the codes after the products, aligned
    memory = _scratch.take(at + rows * cols)
    products = memory[: rows * width * 4].view(torch.int32).view(rows, width)
    q, scale, shift = quantize_rows(
        lib, x, memory[at : at + rows * cols].view(rows, cols).view(torch.int8)
    )
    torch._int_mm(q, qweight, out=products)
    return products, scale, shift


def _residual_problem(residual: torch.Tensor | None, rows: int, cols: int) -> bool:
    return residual is not None and (
        residual.dtype != torch.float32
        or residual.shape != (rows, cols)
        or residual.stride(1) != 1
        or residual.stride(0) < cols
    )


def feed_forward(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    up: tuple[torch.Tensor, ...],
    activation: str,
    down: tuple[torch.Tensor, ...],
    residual: torch.Tensor | None,
) -> torch.Tensor | None:
    """``down(activation(up(x))) + residual`` for int8 layers given as (int8 weight, column
    sums, weight scales, bias): the wide activated rows are quantised as they are made (in
    L1), never written as floats. None where the activation or residual is not one the
    kernel takes."""
    code = ACTIVATIONS.get(activation)
    rows, cols = x.shape
    up_weight, *up_columns = up
    down_weight, *down_columns = down
    inner, width = up_weight.shape[1], down_weight.shape[1]
    if code is None or _residual_problem(residual, rows, width):
        return None
    at = (rows * max(inner, width) * 4 + 63) // 64 * 64  # codes after the products, aligned
    memory = _scratch.take(at + rows * max(cols, inner))
    products = memory[: rows * inner * 4].view(torch.int32).view(rows, inner)
    codes = memory[at : at + rows * cols].view(rows, cols).view(torch.int8)
    q, scale, shift = quantize_rows(lib, x, codes)
    torch._int_mm(q, up_weight, out=products)
    inner_codes = memory[at : at + rows * inner].view(rows, inner).view(torch.int8)
    inner_scale = torch.empty((rows, 1), dtype=torch.float32)
    inner_shift = torch.empty((rows, 1), dtype=torch.float32)
    failed = lib.rx_int8_dequantize_quantize(
        products.data_ptr(),
        rows,
        inner,
        scale.data_ptr(),
        shift.data_ptr(),
        *(t.data_ptr() for t in up_columns),
        code,
        inner_codes.data_ptr(),
        inner_scale.data_ptr(),
        inner_shift.data_ptr(),
        _threads(products.numel()),
    )
    if failed:
        raise MemoryError("int8 kernel: no memory for a row buffer")
    down_products = memory[: rows * width * 4].view(torch.int32).view(rows, width)
    torch._int_mm(inner_codes, down_weight, out=down_products)
    return dequantize(lib, down_products, inner_scale, inner_shift, *down_columns, residual, None)


def dequantize(
    lib: ctypes.CDLL,
    products: torch.Tensor,
    x_scale: torch.Tensor,
    shift: torch.Tensor,
    column_sums: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor | None:
    """``dequantize_products`` by the kernel (float32), or None where the residual's rows
    are not contiguous float32 or the activation is not one of ``ACTIVATIONS`` (the
    products, scales and column vectors are the layer's own: contiguous float32)."""
    rows, cols = products.shape
    code = 0 if activation is None else ACTIVATIONS.get(activation)
    if code is None:
        return None
    if _residual_problem(residual, rows, cols):
        return None
    out = torch.empty((rows, cols), dtype=torch.float32)
    lib.rx_int8_dequantize(
        products.data_ptr(),
        rows,
        cols,
        x_scale.data_ptr(),
        shift.data_ptr(),
        column_sums.data_ptr(),
        weight_scale.data_ptr(),
        bias.data_ptr(),
        None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0),
        code,
        out.data_ptr(),
        _threads(products.numel()),
    )
    return out
