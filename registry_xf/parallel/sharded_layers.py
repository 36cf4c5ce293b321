"""The communication a sharded layer needs, added to the plain layers in place.

Projections stay plain ``nn.Linear`` modules holding their local part (so that the CPU
packing step still packs them); a forward hook does the collective:

- column-sharded (queries/keys/values, gate/up): no communication, the input is whole
  on every rank and the output is this rank's heads or columns;
- row-sharded (attention output, down): each rank's partial product is summed over the
  ranks with one all-reduce; rank 0 alone holds the bias, so it is added once;
- vocabulary-sharded output projection: each rank's logits are gathered into the whole.

The token embedding is the one layer whose computation changes: a vocabulary-sharded
table looks up the ids it holds, zeros the others, and the ranks sum their rows.
Inference only: the collectives are not differentiated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_reduce_output(group: Any) -> Any:
    """A forward hook summing a row-sharded projection's output over ``group``."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dist.all_reduce(output, group=group)
        return output

    return hook


def all_gather_last_dim(group: Any, size: int) -> Any:
    """A forward hook gathering a vocabulary-sharded projection's output (equal parts on
    the last dimension) from the ``size`` ranks of ``group``."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(output) for _ in range(size)]
        with torch.no_grad():
            dist.all_gather(parts, output.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    return hook


class VocabShardedEmbedding(nn.Embedding):
    """A token embedding holding rows ``[start, stop)`` of the vocabulary: ids outside
    them give zeros here and their row on the rank that has it; one all-reduce sums."""

    start: int
    stop: int
    group: Any

    @classmethod
    def convert(cls, embedding: nn.Embedding, start: int, stop: int, group: Any) -> None:
        """Make ``embedding`` (built on meta, whole) this rank's part, in place."""
        embedding.__class__ = cls
        embedding.start, embedding.stop, embedding.group = start, stop, group  # type: ignore[attr-defined]
        embedding.num_embeddings = stop - start

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        local = input - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside[..., None], 0.0)
        with torch.no_grad():
            dist.all_reduce(h, group=self.group)
        return h
