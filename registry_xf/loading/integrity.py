"""The sha256 of each file of a saved model: recorded in meta.json by ``save``, checked by
``load(..., verify=True)``.

safetensors files carry no checksum, so a flipped byte in the data of a tensor loads
without complaint; only a hash taken when the file was written can tell.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError
from .paths import safe_join
from .sources import META_FILE, SourceConfig

HASHES_KEY = "sha256"
_CHUNK = 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """The sha256 of every file under ``directory`` but meta.json, by relative name."""
    return {
        path.relative_to(directory).as_posix(): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() != META_FILE
    }


def _blobs(directory: Path) -> Path | None:
    """The blobs folder of the Hub cache entry whose snapshot ``directory`` is (its files
    are links into it), or None for any other folder."""
    if directory.parent.name != "snapshots":
        return None
    blobs = directory.parent.parent / "blobs"
    return blobs if blobs.is_dir() else None


def verify_saved(directory: str | Path) -> None:
    """Check the files of a saved model against the hashes its meta.json recorded.

    Raises a CheckpointError naming every file that is missing or differs. Files added
    to the directory later are not checked.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{meta_path}: missing; only a directory written by registry_xf.save can be verified"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    hashes = meta.get(HASHES_KEY) if isinstance(meta, dict) else None
    if not isinstance(hashes, dict) or not hashes:
        raise CheckpointError(
            f"{meta_path}: records no file hashes ({HASHES_KEY!r}); it was written by an "
            "older registry_xf and cannot be verified: save it again"
        )
    problems = []
    for name, expected in sorted(hashes.items()):
        path = safe_join(directory, name, where=str(meta_path), links_into=_blobs(directory))
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        found = file_sha256(path)
        if found != expected:
            problems.append(f"{path}: sha256 {found} differs from {expected}")
    if problems:
        raise CheckpointError(
            f"{directory}: {len(problems)} file(s) changed since the model was saved "
            f"(corrupted or edited), against the hashes recorded in {meta_path}:\n  - "
            + "\n  - ".join(problems)
        )


def verify_source(found: SourceConfig) -> None:
    """``verify_saved`` for what ``config_from_source`` found, which must be a saved model."""
    origin = found.origin
    if origin.kind != "saved" or origin.path is None:
        raise CheckpointError(
            f"{origin.path or origin.given}: verify=True needs a directory written by "
            "registry_xf.save (only those record the hashes of their files)"
        )
    verify_saved(origin.path)
