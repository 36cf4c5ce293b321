"""How registry_xf knows a directory as one it wrote: the only kind (besides an empty
folder) that ``overwrite=True`` replaces, so that a mistyped path never deletes a user's
own files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..about import __version__
from .sources import META_FILE, SAVED_CONFIG

# Recorded in the metadata of every safetensors file registry_xf writes.
WRITER = f"registry_xf {__version__}"
WRITER_KEY = "written_by"
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON; larger ones are not ours
_MAX_META = 2**20
EXPORTED_KIND = "an HF directory written by registry_xf.export_hf"


def is_saved_model(directory: Path) -> bool:
    """A directory written by ``registry_xf.save``: config.cfg and our meta.json."""
    meta = directory / META_FILE
    if not (directory / SAVED_CONFIG).is_file() or not meta.is_file():
        return False
    try:
        if meta.stat().st_size > _MAX_META:
            return False
        data = json.loads(meta.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"registry_xf_version", "format_version"} <= set(data)


def is_exported_hf(directory: Path) -> bool:
    """A directory written by ``registry_xf.export_hf``: config.json, and a
    model.safetensors whose metadata says registry_xf wrote it."""
    if not (directory / "config.json").is_file():
        return False
    writer = safetensors_writer(directory / "model.safetensors")
    return writer is not None and writer.startswith("registry_xf")


def safetensors_writer(path: Path) -> str | None:
    """The ``written_by`` entry of a safetensors file's metadata (its header only is read)."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                return None
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    writer = metadata.get(WRITER_KEY) if isinstance(metadata, dict) else None
    return writer if isinstance(writer, str) else None
