"""T5's bucketed relative position bias: a learned score per head and distance bucket.

One table serves every layer of a stack: the assembly computes the bias once per forward
pass and hands it to the layers through the attention mask (``AttentionMask.bias``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from ..types import HeadCount, PositionCount
from .attention_mask import query_slots


class RelativePositionBias(nn.Module):
    """``bias[h, q, k] = weight[bucket(k - q), h]``, added to the attention scores.

    Distances below half the buckets each get a bucket of their own; longer ones share
    logarithmically wider buckets up to ``max_distance``, beyond which all share the last.
    ``bidirectional`` (an encoder) gives keys after the query buckets of their own; a
    causal stack (a decoder) only has keys at or before the query.
    """

    def __init__(self, n_heads: int, n_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.n_buckets = n_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_heads))

    def buckets(self, relative: torch.Tensor) -> torch.Tensor:
        """The bucket of each relative position (key position minus query position)."""
        n_buckets = self.n_buckets
        buckets = torch.zeros_like(relative)
        if self.bidirectional:
            n_buckets //= 2
            buckets = buckets + (relative > 0).long() * n_buckets
            distance = relative.abs()
        else:
            distance = (-relative).clamp(min=0)
        exact = n_buckets // 2
        # the float log of a distance below ``exact`` is never used (the where picks the
        # exact bucket); clamping keeps it finite
        log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(
            self.max_distance / exact
        )
        wide = exact + (log_ratio * (n_buckets - exact)).long()
        wide = wide.clamp(max=n_buckets - 1)
        return buckets + torch.where(distance < exact, distance, wide)

    def forward(
        self, n_queries: int, n_keys: int, query_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(1, heads, queries, keys); the queries are the last ``n_queries`` keys, or sit
        at ``query_positions`` among them (a decoding step of fixed shape)."""
        device = self.weight.device
        query = query_slots(n_queries, n_keys, device, query_positions)
        key = torch.arange(n_keys, device=device)[None, :]
        values = nn.functional.embedding(self.buckets(key - query), self.weight)
        return values.permute(2, 0, 1)[None]


@registry.layers.register("registry_xf.RelativePositionBias.v1")
def relative_position_bias(
    n_heads: HeadCount,
    n_buckets: PositionCount = 32,
    max_distance: PositionCount = 128,
    bidirectional: bool = True,
) -> nn.Module:
    """T5's relative position bias: bidirectional for an encoder, causal for a decoder."""
    # half the buckets (of each direction) are exact, the other half logarithmic up to
    # max_distance: both halves need at least one bucket, and max_distance must lie
    # beyond the exact ones (the logarithm's base)
    least = 4 if bidirectional else 2
    exact = n_buckets // (4 if bidirectional else 2)
    problems = []
    if n_buckets < least:
        problems.append(
            ConfigProblem(
                "n_buckets",
                f"at least {least} buckets are needed "
                f"({'bidirectional' if bidirectional else 'causal'})",
                n_buckets,
                True,
            )
        )
    elif max_distance <= exact:
        problems.append(
            ConfigProblem(
                "max_distance",
                f"must exceed the {exact} exact buckets that n_buckets={n_buckets} gives",
                max_distance,
                True,
            )
        )
    if problems:
        raise ConfigError(problems)
    return RelativePositionBias(n_heads, n_buckets, max_distance, bidirectional)
