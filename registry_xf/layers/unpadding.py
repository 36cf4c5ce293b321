"""Unpadded (packed) tokens: a padded batch's real tokens, one after another.

Everything in a transformer but attention works token by token, so it may run on the real
tokens alone: a batch of mixed lengths then spends no arithmetic on padding. Attention
needs each sequence's tokens in place, so ``SelfAttention`` puts its projections back
into the padded layout for the attention itself and packs the result again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Unpadded:
    """Where the real tokens of a (batch, seq) mask sit: ``indices`` into the flattened
    batch, in order, and each sequence's count of them, ``lengths``."""

    indices: torch.Tensor
    batch: int
    seq: int
    lengths: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Unpadded:
        batch, seq = attention_mask.shape
        indices = attention_mask.reshape(-1).nonzero().squeeze(-1)
        return cls(indices, batch, seq, attention_mask.sum(1, dtype=torch.int64))

    @cached_property
    def offsets(self) -> torch.Tensor:
        """Sequence b's packed rows are ``offsets[b]:offsets[b + 1]`` (int64, on the CPU:
        what attention of packed sequences reads); computed at the first use, so that a
        pass that never reads it (on an accelerator) waits for no copy."""
        ends = self.lengths.cumsum(0).cpu()
        return torch.cat([ends.new_zeros(1), ends])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) → (1, real tokens, ...)."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, real tokens, ...) → (batch, seq, ...), zeros at padding."""
        out = x.new_zeros(self.batch * self.seq, *x.shape[2:])
        out.index_copy_(0, self.indices, x[0])
        return out.view(self.batch, self.seq, *x.shape[2:])
