"""Poolers: one vector per sequence from the hidden states of its real tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..registry import registry

Mode = Literal["mean", "cls", "max"]


class Pooler(nn.Module):
    """Mean, first-token (CLS) or max pooling over non-padding tokens, optionally L2-normed."""

    def __init__(self, mode: Mode = "mean", normalize: bool = False):
        super().__init__()
        self.mode = mode
        self.normalize = normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.mode == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}"


@registry.poolers.register("registry_xf.MeanPooler.v1")
def mean_pooler(normalize: bool = False) -> Pooler:
    """Average of the real tokens' hidden states (sentence-transformers' default)."""
    return Pooler("mean", normalize)


@registry.poolers.register("registry_xf.CLSPooler.v1")
def cls_pooler(normalize: bool = False) -> Pooler:
    """The first token's hidden state."""
    return Pooler("cls", normalize)


@registry.poolers.register("registry_xf.MaxPooler.v1")
def max_pooler(normalize: bool = False) -> Pooler:
    """Element-wise maximum over the real tokens."""
    return Pooler("max", normalize)
