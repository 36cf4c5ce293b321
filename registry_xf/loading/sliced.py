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
        tensor = _joined(_across_parts(ckpt, files, shapes, hf_dim, runs), hf_dim, ckpt, dtype)
    elif len(files) > 1:
        parts = [[ckpt.read_slice(f, hf_dim, a, b) for a, b in runs] for f in files]
        tensor = _joined(parts, hf_dim, ckpt, dtype, join_dim)
    else:
        tensor = _joined(
            [ckpt.read_slice(files[0], hf_dim, a, b) for a, b in runs], hf_dim, ckpt, dtype
        )
    if reorder is not None:  # a shard of columns: every row was read, reorder them
        tensor = reorder(tensor, hyper)
    if transpose:
        tensor = tensor.t()
    return tensor.contiguous()


def _across_parts(
    ckpt: Checkpoint,
    files: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dim: int,
    runs: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """The ``runs`` of the parts joined on ``dim``, each read from the part it lies in."""
    pieces = []
    for start, stop in runs:
        offset = 0
        for name, shape in zip(files, shapes, strict=True):
            low, high = max(start, offset), min(stop, offset + shape[dim])
            if low < high:
                pieces.append(ckpt.read_slice(name, dim, low - offset, high - offset))
            offset += shape[dim]
    return pieces


def _joined(
    pieces: Sequence[Any],
    dim: int,
    ckpt: Checkpoint,
    dtype: torch.dtype | None,
    outer_dim: int | None = None,
) -> torch.Tensor:
    """``pieces`` joined on ``dim`` (lists of pieces: each list on ``dim``, the lists on
    ``outer_dim``), cast to ``dtype`` (floating tensors) on the checkpoint's device: one new
    tensor, each piece copied once into its slice (pieces are views of the file where
    ``read_slice`` gives them), not joined, then cast, then moved."""
    groups = [list(g) for g in pieces] if outer_dim is not None else [list(pieces)]
    first = groups[0][0]
    if dtype is None or not first.is_floating_point():
        dtype = first.dtype
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in groups[0])
    if outer_dim is not None:
        shape[outer_dim] = sum(g[0].shape[outer_dim] for g in groups)
    out = torch.empty(shape, dtype=dtype, device=ckpt.device)
    outer = 0
    for group in groups:
        part = (
            out.narrow(outer_dim, outer, group[0].shape[outer_dim])
            if outer_dim is not None
            else out
        )
        start = 0
        for piece in group:
            part.narrow(dim, start, piece.shape[dim]).copy_(piece)
            start += piece.shape[dim]
        outer += group[0].shape[outer_dim] if outer_dim is not None else 0
    return out
