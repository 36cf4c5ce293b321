"""Encoder attention on AVX-512 CPUs, by a small C++ kernel compiled on first use.

On a small encoder (all-MiniLM-L6-v2: 12 heads of 32) torch's fused attention runs at a
third of the CPU's float32 multiply speed, and its bfloat16 path is slower still. The
kernel in ``cpu_attention.cpp`` does the whole of one (batch, head) in cache: it gathers
the keys that the padding mask allows (masked keys add nothing to a softmax, so leaving
them out is exact), computes scores, softmax and the weighted sum of values with
register-blocked AVX-512 loops, and reads queries, keys and values where the fused
projection left them (strided views, no copies). bfloat16 inputs use AVX512-BF16's dot
products with float32 sums and a float32 softmax.

``cpu_attention(q, k, v, mask, scale)`` returns the result, or None where the kernel does
not apply, and the caller then uses ``F.scaled_dot_product_attention``: not a CPU tensor,
not float32 (or bfloat16 on a CPU with AVX512-BF16), a head width other than 16, 32, 48
or 64, a mask other than one row of key booleans per batch entry (causal, windowed or
additive masks), autograd, ``torch.compile``, no AVX-512, no C++ compiler. Each reason is
logged once.

The library is built with the system C++ compiler at the first call in a process that has no
cached copy, and cached (see ``cpu_kernels``). ``REGISTRY_XF_CPU_ATTENTION=0`` turns the
kernel off (torch's attention everywhere).

Each call uses at most ``torch.get_num_threads()`` threads, from OpenMP (the kernel links
libgomp by its usual name, so the runtime torch has loaded serves it: one pool of threads
for both, none competing with torch's for the cores); ctypes releases the GIL. Calls from
several Python threads at once (``Embedder(streams=N)``, which divides torch's threads
among its streams) each use their own share, and nothing is shared between calls.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from ..errors import InputError
from . import cpu_kernels

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
SWITCH = "REGISTRY_XF_CPU_ATTENTION"  # "0", "off", "false" or "no": torch's attention
HEAD_WIDTHS = (16, 32, 48, 64)
# Below this many multiply-adds (about 50 µs of work) one thread does it all: starting
# and joining another costs more than it saves.
PARALLEL_FROM = 2_000_000


def enabled() -> bool:
    """Whether the environment lets the kernel run (``REGISTRY_XF_CPU_ATTENTION``)."""
    return cpu_kernels.switched_on(SWITCH)


_skip = cpu_kernels.OnceLog(logger, "CPU attention kernel", "torch's attention")


def _declare(lib: ctypes.CDLL) -> None:
    lib.rx_attention.argtypes = [ctypes.c_void_p] * 5 + [
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.rx_attention.restype = ctypes.c_int
    lib.rx_attention_packed.argtypes = [ctypes.c_void_p] * 4 + [
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.rx_attention_packed.restype = ctypes.c_int
    lib.rx_attention_bf16.restype = ctypes.c_int


def library() -> ctypes.CDLL | str:
    """The kernel library, built on first use, or the reason it is unavailable."""
    return cpu_kernels.library(SOURCE, _declare)


def _tensor_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these tensors' device, dtype, head width or use make no case for the kernel."""
    if q.device.type != "cpu" or k.device != q.device or v.device != q.device:
        return f"tensors on {q.device}"
    if q.dtype not in (torch.float32, torch.bfloat16) or {k.dtype, v.dtype} != {q.dtype}:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in HEAD_WIDTHS:
        return f"head width {q.shape[-1]}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head rows that are not contiguous"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "autograd"
    return None


def _shape_problem(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> str | None:
    """Why these tensors are not a case the kernel computes (None when they are)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "inputs that are not (batch, heads, positions, head width)"
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % max(k.shape[1], 1):
        return "keys and values whose shapes do not match the queries"
    problem = _tensor_problem(q, k, v)
    if problem:
        return problem
    if k.shape[2] >= 2**31 or q.numel() == 0 or k.shape[2] == 0:
        return "an empty or huge sequence"
    if mask is not None:
        if mask.dtype != torch.bool or mask.device != q.device:
            return "a mask that is not boolean (an additive bias)"
        if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != k.shape[2]:
            return "a mask other than one row of keys per batch entry (causal or windowed)"
        if mask.shape[0] not in (1, b):
            return "a mask whose batch size differs"
    return None


def _ready(q: torch.Tensor, problem: str | None) -> ctypes.CDLL | None:
    """The library, if the kernel may run on ``q`` (and ``problem`` is None), else None."""
    lib = cpu_kernels.usable_library(SWITCH, library, _skip, lambda: problem)
    if isinstance(lib, str):
        return None
    if q.dtype == torch.bfloat16 and not lib.rx_attention_bf16():
        _skip("bfloat16 on a CPU without AVX512-BF16")
        return None
    return lib


def _threads(work: int) -> int:
    """One thread for a small call (starting another costs more than it saves), else
    torch's count."""
    return 1 if work < PARALLEL_FROM else torch.get_num_threads()


def cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """softmax(q kᵀ · scale, over the keys ``mask`` allows) v, or None where the kernel does
    not apply (see the module's docstring).

    ``q`` is (batch, heads, queries, width), ``k`` and ``v`` (batch, kv heads, keys, width)
    with kv heads dividing heads (grouped queries); ``mask`` is None or boolean (batch or
    1, 1, 1, keys), True = attend. A batch entry with no key allowed gets zeros. The result
    is (batch, heads, queries, width), a view of a (batch, queries, heads, width) tensor,
    so that merging the heads after it copies nothing."""
    lib = _ready(q, _shape_problem(q, k, v, mask))
    if lib is None:
        return None
    bf16 = q.dtype == torch.bfloat16
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.empty((b, n_q, h, d), dtype=q.dtype).transpose(1, 2)
    mask_strides = (0, 0)
    if mask is not None:
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(3))
    sizes = (ctypes.c_int64 * 8)(b, h, k.shape[1], n_q, n_k, d, *mask_strides)
    strides = (ctypes.c_int64 * 12)(
        *(s for t in (q, k, v, out) for s in (t.stride(0), t.stride(1), t.stride(2)))
    )
    threads = _threads(b * h * n_q * n_k * d)
    status = lib.rx_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        None if mask is None else mask.data_ptr(),
        sizes,
        strides,
        float(scale),
        int(bf16),
        threads,
    )
    if status:
        _skip(f"the kernel could not run (status {status}: out of memory)", logging.WARNING)
        return None
    return out


def packed_ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``cpu_attention_packed`` would run for tensors of this device and dtype
    here (so that a caller may choose the packed layout for its sake)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not enabled():
        return False
    lib = library()
    return not isinstance(lib, str) and (dtype == torch.float32 or bool(lib.rx_attention_bf16()))


def _packed_problem(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor
) -> str | None:
    """Why these packed tensors are not a case the kernel computes (None when they are)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "packed inputs that are not (tokens, heads, head width)"
    n, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d or h % max(k.shape[1], 1):
        return "packed keys and values whose shapes do not match the queries"
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or not offsets.is_contiguous():
        return "sequence offsets that are not one contiguous row of int64"
    if n >= 2**31 or n == 0 or len(offsets) < 2:
        return "an empty or huge packed batch"
    return _tensor_problem(q, k, v)


def call_packed(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    threads: int,
) -> tuple[torch.Tensor, int]:
    """The packed entry of ``lib`` (this kernel's library, or another build of it) on
    checked inputs: the output and the kernel's status (0: done). The one place that
    knows the entry's arguments."""
    n, h, d = q.shape
    out = torch.empty((n, h, d), dtype=q.dtype)
    sizes = (ctypes.c_int64 * 5)(len(offsets) - 1, h, k.shape[1], d, n)
    strides = (ctypes.c_int64 * 8)(*(s for t in (q, k, v, out) for s in (t.stride(1), t.stride(0))))
    status = lib.rx_attention_packed(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        ctypes.cast(offsets.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
        sizes,
        strides,
        scale,
        int(q.dtype == torch.bfloat16),
        threads,
    )
    return out, status


def cpu_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """Attention of packed sequences (an unpadded batch), or None where the kernel does not
    apply (as ``cpu_attention``; then the caller pads them again).

    ``q`` is (tokens, heads, width), ``k`` and ``v`` (tokens, kv heads, width), views of
    the projection's rows; sequence ``b`` is tokens ``offsets[b]:offsets[b + 1]`` (CPU
    int64, non-decreasing from 0 to tokens) and attends to its own tokens alone. The
    result is (tokens, heads, width), contiguous: the heads merge with a view. Offsets
    that do not fit raise ``InputError``."""
    lib = _ready(q, _packed_problem(q, k, v, offsets))
    if lib is None:
        return None
    n, h, d = q.shape
    work = n * n // (len(offsets) - 1) * h * d  # sequences of equal lengths
    out, status = call_packed(lib, q, k, v, offsets, float(scale), _threads(work))
    if status:
        if status == 3:
            raise InputError(
                f"cpu_attention_packed offsets: expected a non-decreasing row from 0 to the "
                f"{n} tokens; found {offsets.tolist()}"
            )
        _skip(f"the kernel could not run (status {status}: out of memory)", logging.WARNING)
        return None
    return out
