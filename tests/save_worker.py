"""A process that saves models in children it kills with SIGKILL (for tests/test_saves.py).

Started once (importing torch takes seconds); each save runs in a forked child, so that a
save is killed at the point the test chooses, as ``kill -9`` would. Reads one JSON command
a line on stdin and answers one JSON line on stdout:

- ``{"op": "save", "model": "a", "target": PATH, "delay": S, "exchange": true}``: fork a
  child that saves model ``a`` over ``PATH``; kill it after ``S`` seconds unless it has
  finished. Answers ``{"killed": bool, "seconds": float, "status": int}``.
- ``{"op": "hold", "target": PATH}``: fork a child that is inside a save of ``PATH`` (its
  hidden directory made, a file written) and waits there. Answers ``{"pid", "tmp"}``.
- ``{"op": "kill", "pid": PID}``: SIGKILL that child. Answers ``{}``.

``"exchange": false`` makes the child use the two-rename fallback, as on a filesystem
without ``RENAME_EXCHANGE``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import registry_xf as rx
from registry_xf.loading import atomic
from registry_xf.loading.save import is_saved_model


def _child(work) -> None:  # type: ignore[no-untyped-def]
    """Run ``work`` in this forked child and leave without running the parent's cleanups."""
    try:
        work()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def save(models: dict, command: dict) -> dict:  # type: ignore[type-arg]
    model = models[command["model"]]

    def work() -> None:
        if not command.get("exchange", True):
            atomic._renameat2 = None
        rx.save(model, command["target"], overwrite=True)

    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(work)
    deadline = start + command["delay"]
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status)
            break
        time.sleep(min(0.0005, max(0.0, deadline - time.perf_counter())))
    return {"killed": killed, "seconds": time.perf_counter() - start, "status": status}


def hold(command: dict) -> dict:  # type: ignore[type-arg]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)

        def work() -> None:
            with atomic.atomic_directory(
                command["target"], overwrite=True, replaceable=is_saved_model
            ) as tmp:
                (tmp / "model.safetensors").write_bytes(b"partial")
                os.write(write_end, str(tmp).encode() + b"\n")
                time.sleep(600)

        _child(work)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        tmp = f.readline().strip()
    return {"pid": pid, "tmp": tmp}


def main() -> None:
    models = {
        name: rx.load(path, pack=False) for name, path in zip("ab", sys.argv[1:3], strict=True)
    }
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "save":
            answer = save(models, command)
        elif command["op"] == "hold":
            answer = hold(command)
        else:
            os.kill(command["pid"], signal.SIGKILL)
            os.waitpid(command["pid"], 0)
            answer = {}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
