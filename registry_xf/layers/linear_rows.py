"""Cutting one linear layer into several by blocks of its output rows."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def split_rows(linear: nn.Linear, rows: Sequence[int]) -> list[nn.Linear]:
    """Linear layers computing consecutive blocks of ``linear``'s outputs, ``rows`` each.

    Their weights and biases are views of ``linear``'s (nothing is copied or initialised;
    on the meta device nothing is allocated), keeping its class and ``requires_grad``.
    """
    weight, bias = linear.weight, linear.bias
    if sum(rows) != weight.shape[0]:
        raise ValueError(f"row blocks {list(rows)} do not add up to {weight.shape[0]} outputs")
    parts = []
    start = 0
    for n in rows:
        part = nn.Linear.__new__(type(linear))
        nn.Module.__init__(part)
        part.in_features, part.out_features = linear.in_features, n
        part.weight = nn.Parameter(weight[start : start + n], weight.requires_grad)
        part.bias = (
            None if bias is None else nn.Parameter(bias[start : start + n], bias.requires_grad)
        )
        parts.append(part)
        start += n
    return parts
