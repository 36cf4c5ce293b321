"""The model a task pipeline runs: loaded from a source or given, with the head it needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..assemblies.with_head import EncoderWithHead
from ..errors import RegistryXFError
from ..loading.load import load


def model_with_head(
    model: EncoderWithHead | str | Path,
    tasks: Sequence[str],
    needs: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> EncoderWithHead:
    """``model`` (a source is loaded first), checked to have a head of one of ``tasks`` and a
    tokenizer; ``needs`` says in the error what the pipeline needs and where it comes from."""
    loaded = load(model, device=device, dtype=dtype) if isinstance(model, str | Path) else model
    task = getattr(loaded, "task", None)
    if not isinstance(loaded, EncoderWithHead) or task not in tasks:
        found = f"a {task} head" if task else f"{type(loaded).__name__}, no head"
        raise RegistryXFError(f"{needs}; this model has {found}")
    if loaded.tokenizer is None:
        raise RegistryXFError("this model has no tokenizer: its source needs a tokenizer.json")
    return loaded
