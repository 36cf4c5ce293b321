"""Reading one rank's shard of a tensor: only its slices of the checkpoint's tensors.

Our tensor may be several HF tensors joined (fused query/key/value), reordered (GPT-NeoX
and Falcon interleave heads) or transposed (Conv1D layouts). The shard is given in our
layout; it is mapped back to the HF tensors' rows or columns, and only those are read,
with safetensors' slices, straight onto the target device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..converters.base import KeyRule
from ..parallel.shards import Shard, runs_of
from .checkpoint import Checkpoint


def read_shard(
    ckpt: Checkpoint,
    rule: KeyRule | None,
    files: Sequence[str],
    shard: Shard,
    hyper: Mapping[str, Any] | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Our tensor's part ``shard``, read from the HF tensors ``files`` as ``rule`` joins
    them, in ``dtype`` (floating tensors; None keeps the stored one)."""
    hyper = hyper or {}
    transpose = rule is not None and rule.transpose
    hf_dim = 1 - shard.dim if transpose else shard.dim
    join_dim = rule.dim if rule is not None else 0
    shapes = [ckpt.entry(f).shape for f in files]
    runs = shard.runs
    reorder = rule.to_ours if rule is not None else None
    if reorder is not None and hf_dim == 0:
        # our row i is the joined HF row order[i]: read those rows, already in our order
        total = sum(s[0] for s in shapes) if join_dim == 0 else shapes[0][0]
        order = reorder(torch.arange(total), hyper).tolist()
        runs = runs_of(order[i] for start, stop in runs for i in range(start, stop))
        reorder = None
    if len(files) > 1 and join_dim == hf_dim:
        groups = [_across_parts(files, shapes, hf_dim, runs)]
    else:
        groups = [[(f, a, b) for a, b in runs] for f in files]
    tensor = _joined(ckpt, groups, dict(zip(files, shapes, strict=True)), hf_dim, join_dim, dtype)
    if reorder is not None:  # a shard of columns: every row was read, reorder them
        tensor = reorder(tensor, hyper)
    if transpose:
        tensor = tensor.t()
    return tensor.contiguous()


# Entries ``[start, stop)`` of one HF tensor, on the dimension being sharded.
_Piece = tuple[str, int, int]


def _across_parts(
    files: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dim: int,
    runs: Sequence[tuple[int, int]],
) -> list[_Piece]:
    """The ``runs`` of the parts joined on ``dim``, each in the part it lies in."""
    pieces = []
    for start, stop in runs:
        offset = 0
        for name, shape in zip(files, shapes, strict=True):
            low, high = max(start, offset), min(stop, offset + shape[dim])
            if low < high:
                pieces.append((name, low - offset, high - offset))
            offset += shape[dim]
    return pieces


def _joined(
    ckpt: Checkpoint,
    groups: Sequence[Sequence[_Piece]],
    shapes: Mapping[str, tuple[int, ...]],
    dim: int,
    join_dim: int,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The pieces of each group joined on ``dim``, the groups joined on ``join_dim``, in
    ``dtype`` (floating tensors) on the checkpoint's device: one new tensor, each piece
    copied into its slice once, from a view of the file where ``read_slice`` gives one
    (not read, joined, cast, then moved)."""
    first = groups[0][0][0]
    stored = ckpt.stored_dtype(first) or ckpt.read_slice(first, dim, 0, 0).dtype
    if dtype is None or not stored.is_floating_point:
        dtype = stored
    shape = list(shapes[first])
    shape[dim] = sum(stop - start for _, start, stop in groups[0])
    if len(groups) > 1:
        shape[join_dim] = sum(shapes[group[0][0]][join_dim] for group in groups)
    out = torch.empty(shape, dtype=dtype, device=ckpt.device)
    offset = 0
    for group in groups:
        width = shapes[group[0][0]][join_dim]
        part = out.narrow(join_dim, offset, width) if len(groups) > 1 else out
        offset += width
        at = 0
        for name, start, stop in group:
            part.narrow(dim, at, stop - start).copy_(ckpt.read_slice(name, dim, start, stop))
            at += stop - start
    return out
