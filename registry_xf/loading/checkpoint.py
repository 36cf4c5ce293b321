"""Safetensors checkpoint files: single or sharded, opened safely.

Never unpickles: only ``.safetensors`` files are read. A shard index may only name files
inside the model's directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint given as a file, a directory or an index file."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".index.json"):
        return _shards_from_index(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: only .safetensors checkpoints are read (never pickles); "
                "convert .bin/.pt files with safetensors first"
            )
        return [path]
    if path.is_dir():
        if (path / SINGLE_NAME).is_file():
            return [path / SINGLE_NAME]
        if (path / INDEX_NAME).is_file():
            return _shards_from_index(path / INDEX_NAME)
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" It has {', '.join(sorted(pickles))}, which are pickles and never loaded: "
            "save the model with safetensors."
            if pickles
            else ""
        )
        raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found.{hint}")
    raise CheckpointError(f"{path}: no such file or directory")


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
    root = index_path.parent.resolve()
    files = []
    for name in dict.fromkeys(weight_map.values()):
        shard = (root / str(name)).resolve()
        if not shard.is_relative_to(root):
            raise CheckpointError(
                f"{index_path}: shard {name!r} lies outside the model directory {root}; refused"
            )
        if shard.suffix != ".safetensors":
            raise CheckpointError(f"{index_path}: shard {name!r} is not a .safetensors file")
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} is missing")
        files.append(shard)
    return files


class Checkpoint:
    """Open safetensors files as one mapping of names to lazily read tensors."""

    def __init__(self, handles: dict[str, Any], files: list[Path]):
        self._handles = handles  # tensor name -> (handle, file)
        self.files = files

    def keys(self) -> list[str]:
        return list(self._handles)

    def get(self, name: str) -> torch.Tensor:
        handle, file = self._handles[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        handle, _ = self._handles[name]
        return tuple(handle.get_slice(name).get_shape())

    def dtype_of(self, name: str) -> str:
        handle, _ = self._handles[name]
        return handle.get_slice(name).get_dtype()

    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        for handle, _ in self._handles.values():
            meta.update(handle.metadata() or {})
            break
        return meta


@contextmanager
def open_checkpoint(path: Path, device: torch.device | str = "cpu") -> Iterator[Checkpoint]:
    """Open every file of a checkpoint, reading tensors straight onto ``device``."""
    files = checkpoint_files(path)
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        for file in files:
            try:
                handle = stack.enter_context(
                    safe_open(str(file), framework="pt", device=str(device))
                )
                names = list(handle.keys())
            except Exception as e:
                raise CheckpointError(
                    f"{file}: not a readable safetensors file (truncated or corrupt?): {e}"
                ) from None
            for name in names:
                if name in handles:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} also appears in {handles[name][1]}"
                    )
                handles[name] = (handle, file)
        yield Checkpoint(handles, files)
