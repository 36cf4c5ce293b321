"""An embedding pass (encoder, pooling, normalisation) run through ``torch.compile``, with
matrix products optionally in bfloat16, and the eager pass as a fallback."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor import config as inductor_config

from ..errors import InputError, RegistryXFError

logger = logging.getLogger(__name__)

# name -> the dtype matrix products run in under CPU autocast
MATMUL_DTYPES = {"bfloat16": torch.bfloat16}


def check_matmul_dtype(matmul_dtype: Any) -> torch.dtype | None:
    """The autocast dtype for ``matmul_dtype`` (None: products in the weights' dtype)."""
    if matmul_dtype is None:
        return None
    if isinstance(matmul_dtype, torch.dtype):
        matmul_dtype = str(matmul_dtype).removeprefix("torch.")
    if not isinstance(matmul_dtype, str) or matmul_dtype not in MATMUL_DTYPES:
        raise InputError(
            f"matmul_dtype={matmul_dtype!r}: expected None or one of {sorted(MATMUL_DTYPES)}"
        )
    return MATMUL_DTYPES[matmul_dtype]


def check_compile(compile: Any) -> bool:
    if not isinstance(compile, bool):
        raise InputError(f"compile={compile!r}: expected True or False")
    return compile


@functools.cache
def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot compile for the CPU here (None when it can); asked once."""
    try:
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # no C++ compiler, or a torch without inductor
        return f"torch.compile is unavailable: {type(e).__name__}: {e}"
    return None


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """CPU autocast to ``dtype`` (a no-op for None): linear layers multiply in ``dtype``,
    while layer norms, softmax and the residual sums stay in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


class CompiledForward:
    """``forward`` under ``torch.compile`` (whole graph, dynamic shapes: one graph for
    every batch of two rows or more and one for a single row, whatever the lengths).

    With a ``matmul_dtype``, the weights are frozen into the graph (their bfloat16 copies
    made and packed once, at compile time). Where compiling fails (no C++ compiler, an
    operator the compiler cannot trace), the reason is logged once and ``forward`` runs
    eagerly from then on."""

    def __init__(self, forward: Callable[..., torch.Tensor], frozen: bool):
        self.eager = forward
        reason = compile_unavailable()
        if reason is not None:
            logger.warning("compile=True: running eagerly (%s)", reason)
            self.compiled: Callable[..., torch.Tensor] | None = None
            return
        self.frozen = frozen
        self.compiled = torch.compile(forward, fullgraph=True, dynamic=True)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self._run_compiled(*args, **kwargs)
            except RegistryXFError:
                raise
            except Exception as e:  # a compiler failure: the eager pass still works
                logger.warning(
                    "compile=True: compiling failed, running eagerly (%s: %s)",
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                self.compiled = None
        return self.eager(*args, **kwargs)

    def _run_compiled(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The compiled pass with inductor's ``freezing`` set as this pass needs it.

        Freezing is read from inductor's global config when a graph compiles (compile
        options do not reach it), so it is set only while this pass runs; directly, as
        ``config.patch`` costs about 40 µs a call (1% of one short sentence's pass), and
        not at all where the global value is already the one needed."""
        assert self.compiled is not None
        before = inductor_config.freezing
        if before == self.frozen:
            return self.compiled(*args, **kwargs)
        inductor_config.freezing = self.frozen
        try:
            return self.compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = before
