"""Small C++ kernels for x86-64 CPUs with AVX-512, compiled on first use and cached.

Each kernel is one ``.cpp`` file beside this module (with the headers it includes from
there, such as ``cpu_activations.h``), with a C interface and no torch headers: pointers,
sizes and strides come from Python through ctypes (which releases the GIL during the call).
``library(source, declare)`` builds it with the system C++ compiler (``REGISTRY_XF_CXX``,
else ``CXX``, else ``c++``) at the first call in a process that has no cached copy, and
caches it under ``$XDG_CACHE_HOME/registry_xf/kernels`` (``~/.cache/...``) by a hash of its
source and those headers, the compiler, the flags and the CPU, so an edited header rebuilds
it and a machine with another CPU never loads it. It is written to a temporary file and
renamed into place: a concurrent build in another process never leaves a half-written
library at that name, and temporary files of killed builds are removed by later builds.

Kernels use OpenMP for threads and link libgomp by its usual name, so the runtime torch has
loaded serves them: one pool of threads for both, none competing with torch's for the cores.

Nothing here raises: where a kernel cannot be had (another machine, no compiler, a failed
build) the caller gets the reason as a string and runs torch's operators instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
COMPILER = "REGISTRY_XF_CXX"  # the C++ compiler to build kernels with
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()


def switched_on(variable: str) -> bool:
    """Whether the environment variable ``variable`` lets a kernel run: unset, or anything
    but "0", "off", "false" and "no"."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "off", "false", "no")


class OnceLog:
    """Logs why a kernel does not run, once per reason (a reason is a fact of the machine
    or of a kind of call, and would otherwise be logged at every call)."""

    def __init__(self, log: logging.Logger, kernel: str, instead: str):
        self.log, self.kernel, self.instead = log, kernel, instead
        self.seen: set[str] = set()

    def __call__(self, reason: str, level: int = logging.DEBUG) -> None:
        if reason not in self.seen:
            self.seen.add(reason)
            self.log.log(level, "%s not used: %s; using %s", self.kernel, reason, self.instead)


def usable_library(
    switch: str,
    library: Callable[[], ctypes.CDLL | str],
    skip: OnceLog,
    problem: Callable[[], str | None] | None = None,
) -> ctypes.CDLL | str:
    """The kernel's library where it may run now, else why not (logged once per reason
    by ``skip``, but for a graph being compiled or traced, where torch's operators are
    what the compiler or exporter knows). Asked in this order, so that a cheaper or more
    general reason wins: a graph, the environment ``switch``, the call's own ``problem``
    (asked only then), the library (built on first use by ``library``)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "a graph being compiled or traced"
    if not switched_on(switch):
        reason = f"{switch} turns it off"
        skip(reason, logging.INFO)
        return reason
    found = problem() if problem is not None else None
    if found:
        skip(found)
        return found
    lib = library()
    if isinstance(lib, str):
        skip(lib, logging.INFO)
    return lib


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``, read once; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _cpu_id() -> str:
    """The CPU's model name and feature flags: what ``-march=native`` builds for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    model = next((ln for ln in lines if ln.startswith("model name")), "")
    return model + "\n" + " ".join(sorted(cpu_flags()))


def compiler() -> str:
    """The C++ compiler's name or path, from the environment now."""
    return os.environ.get(COMPILER) or os.environ.get("CXX") or "c++"


def kernels_dir() -> Path:
    """Where built kernels are cached: ``$XDG_CACHE_HOME/registry_xf/kernels``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "registry_xf" / "kernels"


_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def local_headers(source: Path) -> list[Path]:
    """The headers ``source`` includes by ``#include "name"`` from its own folder, and
    theirs in turn, each once, in the order first met."""
    found: list[Path] = []
    pending = [source]
    while pending:
        text = pending.pop(0).read_bytes()
        for name in _LOCAL_INCLUDE.findall(text):
            header = source.parent / name.decode()
            if header not in found:
                found.append(header)
                pending.append(header)
    return found


def library_path(source: Path, program: str) -> Path:
    """The cached library's path for this source and the headers it includes, the
    compiler, the flags and the CPU: editing any of them builds a new library."""
    digest = hashlib.sha256()
    parts = [source.read_bytes()] + [header.read_bytes() for header in local_headers(source)]
    for part in (*parts, program.encode(), " ".join(FLAGS).encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(_cpu_id().encode())
    return kernels_dir() / f"{source.stem}-{digest.hexdigest()[:24]}.so"


def remove_stale_builds(folder: Path) -> None:
    """Delete temporary files of builds that were killed before they could clean up: any
    older than twice the compile timeout (a build still running elsewhere is younger)."""
    horizon = time.time() - 2 * COMPILE_TIMEOUT_S
    for leftover in folder.glob(".*-*.so"):
        try:
            if leftover.stat().st_mtime < horizon:
                leftover.unlink()
        except OSError:  # removed by another process meanwhile, or not ours to remove
            continue


def build(source: Path, program: str, target: Path) -> None:
    """Compile ``source`` into ``target``: into a temporary file beside it, renamed into
    place, so the path holds nothing or a whole library. Raises OSError or
    CalledProcessError (with the compiler's message) when it cannot."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(target.parent)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [program, *FLAGS, "-o", temporary, str(source)],
            check=True,
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def unavailable_here() -> str | None:
    """Why no kernel can run on this machine (None where they can)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not an x86-64 Linux machine ({platform.system()} {platform.machine()})"
    missing = {"avx512f", "avx512bw", "avx512vl"} - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


@functools.cache
def load(source: Path, program: str) -> ctypes.CDLL | str:
    """The library built from ``source`` by ``program``, or why there is none (built at
    most once per process, source and compiler; callers hold the lock)."""
    reason = unavailable_here()
    if reason:
        return reason
    if shutil.which(program) is None:
        return f"no C++ compiler {program!r} (set {COMPILER} to one)"
    try:
        path = library_path(source, program)
    except OSError as e:  # the source or a header it includes is missing or unreadable
        return f"could not read {source.name} or a header it includes: {e}"
    if not path.exists():
        logger.info("Building %s with %s into %s", source.name, program, path)
        try:
            build(source, program, path)
        except subprocess.CalledProcessError as e:
            return f"{program} failed to build {source.name}: {e.stderr.strip()[-2000:]}"
        except (OSError, subprocess.SubprocessError) as e:
            return f"could not build {source.name} with {program}: {e}"
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        return f"could not load {path}: {e}"


@functools.cache
def _declared(lib: ctypes.CDLL, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    declare(lib)
    return lib


def library(source: Path, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | str:
    """The kernel library built from ``source`` (built on first use), with ``declare``
    having set its functions' argument and result types, or the reason it is unavailable."""
    with _lock:
        lib = load(source, compiler())
        return lib if isinstance(lib, str) else _declared(lib, declare)
