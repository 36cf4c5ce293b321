"""The entry points of one group, remembered while the installed packages stay the same.

``importlib.metadata.entry_points`` reads every installed distribution's metadata at each
call (about 3 ms in a small virtual environment, a quarter of loading MiniLM by its package
name). The answer is kept with a stamp of what it was read from: ``sys.path``, the import
finders, and the modification time of each ``sys.path`` entry (installing or removing a
package adds or removes a ``*.dist-info`` folder there, which changes that time). A
changed stamp reads the metadata again; so does a caller that found nothing (``fresh``),
so that a package installed in a way the stamp misses is still found.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading

_Stamp = tuple[object, ...]

_lock = threading.Lock()
_known: dict[str, tuple[_Stamp, dict[str, importlib.metadata.EntryPoint]]] = {}


def _stamp() -> _Stamp:
    """What a scan of the installed distributions depends on, cheaply (one ``stat`` per
    ``sys.path`` entry)."""
    times = []
    for entry in sys.path:
        try:
            times.append(os.stat(entry or ".").st_mtime_ns)
        except (OSError, ValueError, TypeError):
            times.append(None)
    return (tuple(sys.path), tuple(id(f) for f in sys.meta_path), tuple(times))


def entry_points_by_name(
    group: str, *, fresh: bool = False
) -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points of ``group`` by name (the first of a name, as a scan finds them),
    read again only when the stamp changed or ``fresh`` asks for it. Shared: only read it."""
    stamp = _stamp()
    with _lock:
        cached = _known.get(group)
        if cached is not None and cached[0] == stamp and not fresh:
            return cached[1]
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        found.setdefault(ep.name, ep)
    with _lock:
        _known[group] = (stamp, found)
    return found
