"""Joining names that come from untrusted data (byte blobs, index files) onto a directory.

A name read from a file decides where bytes are written or read, so it must not be able to
point anywhere but inside the directory it belongs to: no absolute names, no drive letters,
no ``..``, no backslashes (a separator on Windows), no NUL, and no symbolic link on the way
that leads out.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UnsafePathError

_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_join(
    root: str | Path, name: object, *, where: str = "", links_into: Path | None = None
) -> Path:
    """``root / name``, after checking that ``name`` is a plain relative name inside ``root``.

    ``name`` uses ``/`` between folders; empty, ``.`` and ``..`` parts are refused, as is
    anything that resolves (through links already under ``root``) outside ``root``, or
    outside ``links_into`` where that is given (the blobs of a Hub cache entry, which its
    snapshot's files link to). ``where`` names the data the name came from, for the error.
    """
    source = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise UnsafePathError(f"{source}file name {name!r} is not a string")
    problem = _problem(name)
    if problem:
        raise UnsafePathError(f"{source}file name {name!r} {problem}; refused")
    base = Path(root).resolve()
    joined = base.joinpath(*name.split("/"))
    target = joined.resolve()
    inside = target.is_relative_to(base)
    if not inside and links_into is not None:
        inside = target.is_relative_to(links_into.resolve())
    if not inside:
        raise UnsafePathError(
            f"{source}file name {name!r} leads outside {base} (through a link); refused"
        )
    return joined


def _problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL character"
    if "\\" in name:
        return "contains a backslash (use / between folders)"
    if name.startswith("/"):
        return "is absolute"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    parts = name.split("/")
    if ".." in parts:
        return "goes up a folder (..)"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' part"
    return None
