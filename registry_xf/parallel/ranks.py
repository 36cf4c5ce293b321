"""The ranks a model is sharded over, and how they act together.

Every rank runs the same program. Anything that can fail on one rank and not another
(a file, a config, a device) is done in a phase whose outcome the ranks share before
the next collective starts: then every rank raises a clear error, and none waits for
a collective that another rank will never join.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import TensorParallelError

# How long a collective may wait for the other ranks (REGISTRY_XF_DIST_TIMEOUT, seconds).
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Ranks:
    """One rank's view of a 1-d device mesh: its process group, its place, its device."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int
    size: int
    device: torch.device
    kind: str  # the mesh's device type

    def check_device(self) -> None:
        """The shards' device must be of the mesh's kind (its collectives run there)."""
        if self.device.type != self.kind:
            raise TensorParallelError(
                f"rank {self.rank}: device {self.device} is not on the mesh's device type "
                f"{self.kind!r}: pass device={self.kind!r} or a mesh of {self.device.type!r}"
            )

    def common_seed(self) -> int:
        """A seed rank 0 draws and every rank receives: sampling without a given seed
        still picks the same tokens on every rank."""
        seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(self._wire)
        dist.broadcast(seed, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(seed)

    def gather(self, value: Any) -> list[Any]:
        """``value`` (JSON) of every rank, in rank order: sent as bytes, never pickled."""
        payload = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.long, device=self._wire)
        lengths = [torch.empty_like(length) for _ in range(self.size)]
        dist.all_gather(lengths, length, group=self.group)
        longest = max(int(n) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        parts = [torch.empty_like(padded, device=self._wire) for _ in range(self.size)]
        dist.all_gather(parts, padded.to(self._wire), group=self.group)
        return [
            json.loads(bytes(part[: int(n)].cpu().tolist()).decode())
            for part, n in zip(parts, lengths, strict=True)
        ]

    @property
    def _wire(self) -> torch.device:
        """Where the collectives' tensors live: the CPU for gloo, the GPU for NCCL."""
        if self.kind == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def timeout_s() -> float:
    """The collectives' timeout: REGISTRY_XF_DIST_TIMEOUT seconds, else 300."""
    raw = os.environ.get("REGISTRY_XF_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise TensorParallelError(
            f"REGISTRY_XF_DIST_TIMEOUT must be a positive number of seconds; found {raw!r}"
        )
    return value


def ranks_of(device_mesh: Any, device: torch.device | str | None) -> Ranks:
    """This rank's place in ``device_mesh`` (a 1-d ``DeviceMesh``) and the device its
    shards go to: ``device``, else the mesh's kind (CUDA: the current device).

    Checks only what is the same on every rank (a bad mesh); the device is checked by
    ``check_device`` and ``agree``, in phases whose outcome the ranks share."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(device_mesh, DeviceMesh):
        raise TensorParallelError(
            "device_mesh must be a torch.distributed DeviceMesh (init_device_mesh(kind, "
            f"(n_ranks,))); found {type(device_mesh).__name__}"
        )
    if device_mesh.ndim != 1:
        raise TensorParallelError(
            f"device_mesh must have one dimension (tensor parallel ranks); found "
            f"{device_mesh.ndim}: pass the tensor-parallel sub-mesh, mesh['tp']"
        )
    target = torch.device(device if device is not None else device_mesh.device_type)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return Ranks(
        device_mesh.get_group(),
        device_mesh.get_local_rank(),
        device_mesh.size(),
        target,
        device_mesh.device_type,
    )


@contextmanager
def mesh_from_environment(device: str | None = None) -> Iterator[Any]:
    """A 1-d mesh over every process torchrun started (WORLD_SIZE, RANK, LOCAL_RANK),
    with a process group made with the collectives' timeout (and destroyed after);
    None when not under torchrun. CUDA ranks use NCCL on the GPU of their LOCAL_RANK;
    others gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    from torch.distributed.device_mesh import init_device_mesh

    kind = torch.device(device or "cpu").type
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    made = not dist.is_initialized()
    if made:
        dist.init_process_group(
            "nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s())
        )
    try:
        yield init_device_mesh(kind, (dist.get_world_size(),))
    finally:
        if made:
            dist.destroy_process_group()


@contextmanager
def together(ranks: Ranks | None, what: str) -> Iterator[None]:
    """Run a phase with no collectives inside, then share its outcome: if it failed on
    any rank, every rank raises (its own error, or one naming the ranks that failed)."""
    if ranks is None:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as e:  # shared below, then raised again
        failure = e
    outcomes = ranks.gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if failed:
        listed = "\n".join(f"  rank {rank}: {message}" for rank, message in failed)
        raise TensorParallelError(f"{what} failed on another rank:\n{listed}")


def agree(ranks: Ranks, values: dict[str, str]) -> None:
    """Every rank must have the same ``values`` (a config's digest, a device kind): where
    they differ, every rank raises an error listing each rank's value."""
    everyone = ranks.gather(values)
    problems = []
    for key in values:
        found = [v.get(key) for v in everyone]
        if len(set(found)) > 1:
            listed = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(found))
            problems.append(f"the ranks disagree on {key} ({listed})")
    if problems:
        raise TensorParallelError("cannot shard one model over these ranks: " + "; ".join(problems))


def digest(text: str) -> str:
    """A short digest of ``text`` (a config), compared across ranks."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
