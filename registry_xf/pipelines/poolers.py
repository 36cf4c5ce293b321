"""Poolers: one vector per sequence from the hidden states of its real tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..registry import registry

Mode = Literal["mean", "cls", "max"]


class Pooler(nn.Module):
    """Mean, first-token (CLS) or max pooling over non-padding tokens, optionally L2-normed.

    ``include_prompt=False`` leaves a prompt's tokens out of the pool (as sentence-transformers'
    ``Pooling(include_prompt=False)`` does, for instruction models): the caller passes the
    prompt's length in tokens, and CLS pooling then takes the first token after the prompt.
    """

    def __init__(self, mode: Mode = "mean", normalize: bool = False, include_prompt: bool = True):
        super().__init__()
        self.mode = mode
        self.normalize = normalize
        self.include_prompt = include_prompt

    def pool(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0
    ) -> torch.Tensor:
        """The pooled vectors before normalisation (truncation goes between the two)."""
        if prompt_length and not self.include_prompt:
            attention_mask = exclude_prompt(attention_mask, prompt_length)
            if self.mode == "cls":  # the first token left in the pool
                first = attention_mask.to(torch.int).argmax(dim=1)
                return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.mode == "cls":
            return hidden[:, 0]
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0
    ) -> torch.Tensor:
        pooled = self.pool(hidden, attention_mask, prompt_length)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def extra_repr(self) -> str:
        text = f"mode={self.mode!r}, normalize={self.normalize}"
        return text if self.include_prompt else text + ", include_prompt=False"


def exclude_prompt(attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """A copy of the mask without the first ``prompt_length`` real tokens of each row
    (after any left padding)."""
    first_real = attention_mask.to(torch.int).argmax(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask.masked_fill(positions < first_real + prompt_length, 0)


@registry.poolers.register("registry_xf.MeanPooler.v1")
def mean_pooler(normalize: bool = False, include_prompt: bool = True) -> Pooler:
    """Average of the real tokens' hidden states (sentence-transformers' default)."""
    return Pooler("mean", normalize, include_prompt)


@registry.poolers.register("registry_xf.CLSPooler.v1")
def cls_pooler(normalize: bool = False, include_prompt: bool = True) -> Pooler:
    """The first token's hidden state."""
    return Pooler("cls", normalize, include_prompt)


@registry.poolers.register("registry_xf.MaxPooler.v1")
def max_pooler(normalize: bool = False, include_prompt: bool = True) -> Pooler:
    """Element-wise maximum over the real tokens."""
    return Pooler("max", normalize, include_prompt)
