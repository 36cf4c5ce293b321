"""What part of a full tensor one rank holds, as the loader needs to know it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Shard:
    """The entries ``runs`` (half-open ``(start, stop)`` ranges, in order) of dimension
    ``dim`` of a tensor whose full shape is ``full_shape``: what the loader reads.
    ``split`` is a fused tensor's parts (query/key/value rows) in the whole, as the
    loader checks the stored parts against them."""

    dim: int
    runs: tuple[tuple[int, int], ...]
    full_shape: tuple[int, ...]
    split: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.runs)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = self.size
        return tuple(shape)


def runs_of(indices: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Consecutive indices as ``(start, stop)`` ranges, in the order given."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((start, stop) for start, stop in runs)


def block(start: int, stop: int) -> tuple[tuple[int, int], ...]:
    return ((start, stop),)


@dataclass
class ShardedLayout:
    """How a model built on meta was sharded for one rank: the parameters it holds a part
    of (by module and attribute; tied parameters share one entry) and the names of the
    parameters this rank holds none of (a row-sharded projection's bias: rank 0 adds it).
    Every other parameter is replicated."""

    shards: dict[tuple[nn.Module, str], Shard] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def of(self, places: Sequence[tuple[nn.Module, str]]) -> Shard | None:
        for place in places:
            found = self.shards.get(place)
            if found is not None:
                return found
        return None
