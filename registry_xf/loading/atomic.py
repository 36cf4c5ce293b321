"""Writing a directory so that it appears whole or not at all, and replacing one so that
its path holds the old or the new directory at every instant, crash or not.

How a replacement stays whole. A directory cannot be renamed over a non-empty one, so a
plain rename cannot swap models, and two renames (old aside, new in) leave a moment with
no model at the path. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps two paths in one
atomic step: the new directory is written beside the target under a hidden name, flushed
to disk (files, then folders), and exchanged with the target; the old model, now under
the hidden name, is deleted. The path is a plain directory throughout.

Why not a symbolic link to versioned siblings (swapped by renaming a new link over it)?
That is atomic everywhere, but the path would be a link for ever after: ``cp -r`` and
``shutil.copytree(symlinks=True)`` copy the link, not the model; moving the folder
elsewhere breaks it; ``shutil.rmtree`` refuses it; an upload of the parent sees two
entries. The exchange keeps what users see unchanged.

Where the exchange is not available (not Linux, or a filesystem without it, such as
NFS), the old directory is renamed aside under a hidden ``old`` name and the new one
renamed in. A crash between the two renames leaves the path empty for a moment, and the
old model under the hidden name: the next ``load`` or ``save`` of the path puts it back.

Leftovers. A killed save leaves its hidden directory (``.<name>.registry_xf-new-<hex>``,
or ``-old-`` in the fallback). ``clean_leftovers`` removes them; ``save`` calls it first
and ``load`` calls it too (one listing of the parent when there is nothing to do). A save
holds an exclusive ``flock`` on the parent directory from start to end, released by the
kernel when its process dies, even by SIGKILL; the cleaner takes the same lock without
waiting and, when it is busy, leaves everything alone, so it never deletes the directory
of a save that is still running, in this process or another. Saves into the same parent
directory therefore run one after the other.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import RegistryXFError, SaveError

try:
    import fcntl
except ImportError:  # Windows: no locks, so leftovers are not cleaned there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_KIND = re.compile(r"(new|old)-[0-9a-f]{8}")


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    function.argtypes = [c_int, c_path, c_int, c_path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _rename2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(source, target, flags)``; False where the system or filesystem lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def never(directory: Path) -> bool:
    return False


@contextmanager
def atomic_directory(
    target: str | Path,
    *,
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] = never,
    kind: str = "a model saved by registry_xf",
) -> Iterator[Path]:
    """Yield a new hidden directory beside ``target``; on success it becomes ``target``.

    An existing ``target`` is replaced only with ``overwrite=True``, and only if it is
    empty or ``replaceable(target)`` says it is ``kind``. On any error nothing is left
    behind (no hidden directory, no parent folder this call created) and ``target`` is
    untouched; filesystem errors are raised as :class:`SaveError` naming the path.
    """
    target = _where(target)
    created = _make_parent(target)
    tmp: Path | None = None
    try:
        with _directory_lock(target.parent, wait=True):
            _clean_locked(target)
            exists = _check_target(target, overwrite, replaceable, kind)
            tmp = _new_hidden(target, "new")
            yield tmp
            _fsync_tree(tmp)
            if exists:
                _replace(tmp, target)
            elif not _rename2(tmp, target, _RENAME_NOREPLACE):
                os.rename(tmp, target)
            for folder in [target, *created]:  # the new entries, up to the first old folder
                _fsync_directory(folder.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old model, after an exchange
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if isinstance(e, OSError) and not isinstance(e, RegistryXFError):
            raise SaveError(f"{target}: the save failed: {_describe(e)}") from e
        raise


def _where(target: str | Path) -> Path:
    """The absolute path to write; a symbolic link is followed (the link keeps working)."""
    path = Path(os.path.abspath(Path(target).expanduser()))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _describe(e: OSError) -> str:
    text = e.strerror or str(e)
    return f"{text} ({e.filename})" if e.filename else text


def _make_parent(target: Path) -> list[Path]:
    """Create ``target``'s missing parent folders; return them, deepest first."""
    missing: list[Path] = []
    found = target.parent
    while not os.path.lexists(found) and found != found.parent:
        missing.append(found)
        found = found.parent
    if not found.is_dir():
        raise SaveError(f"{target}: cannot save there: {found} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(missing)
        raise SaveError(f"{target}: cannot create its folder: {_describe(e)}") from None
    return missing


def _remove_created(created: list[Path]) -> None:
    for folder in created:  # deepest first; stops at the first that is not empty
        try:
            os.rmdir(folder)
        except OSError:
            return


def _check_target(
    target: Path, overwrite: bool, replaceable: Callable[[Path], bool], kind: str
) -> bool:
    """Whether ``target`` exists (and may be replaced); a SaveError if it may not."""
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise SaveError(f"{target} exists and is a file, not a folder; refusing to replace it")
    entries = sorted(p.name for p in target.iterdir())
    if entries and not replaceable(target):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if entries[5:] else "")
        raise SaveError(
            f"{target} exists and is not {kind} (it holds {shown}); overwrite=True replaces "
            "only that or an empty folder: remove it yourself or choose another path"
        )
    if not overwrite:
        raise SaveError(f"{target} exists; pass overwrite=True to replace it")
    return True


def _replace(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; afterwards ``new`` holds the old directory (or is gone)."""
    if _rename2(new, target, _RENAME_EXCHANGE):
        return
    old = _hidden_name(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _short(name: str) -> str:
    """The target's name in hidden names, kept short enough for any filesystem."""
    if len(name) <= 100:
        return name
    return name[:80] + "-" + hashlib.sha256(name.encode("utf8", "surrogateescape")).hexdigest()[:12]


def _hidden_name(target: Path, kind: str) -> Path:
    return target.parent / f".{_short(target.name)}.registry_xf-{kind}-{secrets.token_hex(4)}"


def _new_hidden(target: Path, kind: str) -> Path:
    while True:
        path = _hidden_name(target, kind)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _leftovers(target: Path) -> list[tuple[str, Path]]:
    """(kind, path) of every hidden directory that saves of ``target`` leave beside it."""
    prefix = f".{_short(target.name)}.registry_xf-"
    found = []
    try:
        with os.scandir(target.parent) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix):
                    continue
                match = _KIND.fullmatch(entry.name[len(prefix) :])
                if match and entry.is_dir(follow_symlinks=False):
                    found.append((match[1], Path(entry.path)))
    except OSError:
        return []
    return found


def clean_leftovers(target: str | Path) -> None:
    """Remove what interrupted saves of ``target`` left beside it; put an old model that
    an interrupted fallback replacement moved aside back at ``target``.

    Cheap when there is nothing to do (one listing of the parent folder). Leaves
    everything alone while a save into the same folder runs; never raises.
    """
    try:
        where = _where(target)
        if not _leftovers(where):
            return
        with _directory_lock(where.parent, wait=False) as held:
            if held:
                _clean_locked(where)
    except (OSError, ValueError) as e:  # ValueError: a name with a NUL, say
        logger.warning("could not clean up beside %s: %s", target, e)


def _clean_locked(target: Path) -> None:
    found = _leftovers(target)
    if not os.path.lexists(target):
        olds = sorted((p for kind, p in found if kind == "old"), key=_mtime, reverse=True)
        if olds:
            os.rename(olds[0], target)
            logger.warning("%s: put back the model that an interrupted save moved aside", target)
            found = [(kind, p) for kind, p in found if p != olds[0]]
    for _, path in found:
        logger.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@contextmanager
def _directory_lock(directory: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``directory``; yield whether it is held.

    Where locks are not available (Windows, some network filesystems) this yields False:
    a writer goes on without it, a cleaner then does nothing.
    """
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except OSError:
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def flushing(root: Path) -> Iterator[None]:
    """Flush the files already under ``root`` to disk in a thread while the block runs
    (hashing them, say), so that the two take the time of the longer, not of both."""
    files = [path for path in Path(root).rglob("*") if path.is_file()]
    flusher = threading.Thread(target=_fsync_files, args=(files,), daemon=True)
    flusher.start()
    try:
        yield
    finally:
        flusher.join()


def _fsync_files(files: list[Path]) -> None:
    for path in files:
        try:
            _fsync(str(path), os.O_RDWR if os.name == "nt" else os.O_RDONLY)
        except OSError:  # flushed again, with errors raised, before the swap
            pass


def _fsync_tree(root: Path) -> None:
    """Flush every file, then every folder (deepest first), under ``root`` to disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(folder, name), os.O_RDWR if os.name == "nt" else os.O_RDONLY)
        _fsync_directory(Path(folder))


def _fsync_directory(folder: Path) -> None:
    if os.name == "nt":  # folders cannot be opened, nor need to be, on Windows
        return
    _fsync(str(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync
            raise
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf8")


def check_file_target(target: str | Path, *, overwrite: bool = False) -> Path:
    """The absolute path ``atomic_file`` would write; a SaveError if it cannot (checked
    before long work, so that none is lost)."""
    target = _where(target)
    if target.is_dir():
        raise SaveError(f"{target} is a folder; give a file name inside it")
    if not target.parent.is_dir():
        raise SaveError(f"{target}: the folder {target.parent} does not exist")
    if os.path.lexists(target) and not overwrite:
        raise SaveError(f"{target} exists; pass overwrite=True to replace it")
    return target


@contextmanager
def atomic_file(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden directory beside ``target`` to write ``target.name`` into (and any
    side files named after it); on success those files take their places, the file
    ``target`` itself last, so that ``target`` is the old file or the whole new one.

    An existing ``target`` is replaced only with ``overwrite=True``; on any error nothing
    is left behind. Filesystem errors are raised as :class:`SaveError` naming the path.
    """
    target = check_file_target(target, overwrite=overwrite)
    tmp: Path | None = None
    try:
        tmp = _new_hidden(target, "new")
        yield tmp
        written = tmp / target.name
        if not written.is_file():
            raise SaveError(f"{target}: nothing was written")
        _fsync_tree(tmp)
        sides = sorted(p for p in tmp.iterdir() if p.name != target.name)
        for side in sides:  # data files first: the model file commits the whole
            os.replace(side, target.parent / side.name)
        os.replace(written, target)
        _fsync_directory(target.parent)
    except BaseException as e:
        if isinstance(e, OSError) and not isinstance(e, RegistryXFError):
            raise SaveError(f"{target}: the save failed: {_describe(e)}") from e
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
