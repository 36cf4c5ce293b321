"""Reading a user's text file (``--file``, a corpus of lines) with one kind of error."""

from __future__ import annotations

from pathlib import Path

from ..errors import RegistryXFError


def read_text(path: str | Path, label: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file is a
    RegistryXFError that names it as ``label`` (the option or the path the user gave)."""
    try:
        return Path(path).read_text(encoding="utf8")
    except FileNotFoundError:
        raise RegistryXFError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise RegistryXFError(f"{label}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise RegistryXFError(
            f"{label}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    except OSError as e:
        raise RegistryXFError(f"{label}: cannot be read ({e.strerror or e})") from None
