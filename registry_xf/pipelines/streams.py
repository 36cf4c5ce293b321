"""Batches run on several threads at once, each with its share of torch's CPU threads.

A forward pass split over threads (torch's intra-op parallelism) ends every operation at a
barrier that waits for the slowest thread; on a small model each operation is short, so
that waiting is a large part of the time, and on a busy machine a paused thread stalls the
other. Several passes side by side, each single-threaded (or with a few threads), never
wait for each other: more texts per second from the same cores, and the same results to
float rounding (each batch is computed as it would be alone, on fewer threads, which may
split a sum differently). OpenVINO calls this throughput streams.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from ..errors import InputError

Item = TypeVar("Item")


def check_streams(streams: object) -> int:
    """``streams`` as a count of parallel passes: an integer from 1 to the CPU count."""
    limit = max(1, os.cpu_count() or 1)
    if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= limit:
        raise InputError(
            f"streams={streams!r}: expected an integer from 1 to {limit} (this machine's CPUs)"
        )
    return streams


def run_in_streams(work: Callable[[Item], None], items: Iterable[Item], streams: int) -> None:
    """``work(item)`` for every item, on ``streams`` threads that take the next item as
    each finishes one (items of uneven cost stay balanced), under ``torch.inference_mode``.

    torch's thread count is one setting for the whole process: while this runs it is the
    count it was, divided among the streams (at least 1 each), and it is restored after.
    The first item runs alone on the calling thread, already with the divided count, so
    that what compiles at its first call (a compiled pass, int8 loops) compiles once and
    for the threads it will run with. The first error raised by ``work`` stops the other
    streams after their current item and is raised here."""
    pending = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def stream() -> None:
        with torch.inference_mode():
            while not errors:
                with lock:
                    item = next(pending, _DONE)
                if item is _DONE:
                    return
                try:
                    work(item)  # type: ignore[arg-type]
                except BaseException as e:  # handed to the caller's thread
                    errors.append(e)
                    return

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))
    try:
        first = next(pending, _DONE)
        if first is not _DONE:
            with torch.inference_mode():
                work(first)  # type: ignore[arg-type]
        workers = [
            threading.Thread(target=stream, name=f"registry_xf-stream-{k}", daemon=True)
            for k in range(streams)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


_DONE = object()
