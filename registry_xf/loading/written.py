"""How registry_xf knows a file or directory as one it wrote: the only kind (besides an
empty folder) that ``overwrite=True`` replaces, so that a mistyped path never deletes a
user's own files. (A saved model is known by its meta.json: see ``save.is_saved_model``.)"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..about import __version__

# Recorded in the metadata of every safetensors file registry_xf writes.
WRITER = f"registry_xf {__version__}"
WRITER_KEY = "written_by"
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON; larger ones are not ours
EXPORTED_KIND = "an HF directory written by registry_xf.export_hf"


def is_exported_hf(directory: Path) -> bool:
    """A directory written by ``registry_xf.export_hf``: config.json, and a
    model.safetensors whose metadata says registry_xf wrote it. A saved model holds them
    too when it is a sentence-transformers model; its config.cfg tells it apart."""
    if not (directory / "config.json").is_file() or (directory / "config.cfg").is_file():
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
