"""Length-sorted batches under a token budget, shared by the pipelines that score pairs
or texts in bulk."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def length_batches(lengths: Sequence[int], budget: int, max_batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length, longest first, each group padded to at most
    ``budget`` tokens and ``max_batch_size`` rows (a lone overlong row still gets a batch):
    little compute goes to padding, and short inputs share large batches."""
    order = np.argsort(np.asarray(lengths), kind="stable")[::-1]
    batch: list[int] = []
    for index in order:
        if batch and (
            (len(batch) + 1) * lengths[batch[0]] > budget or len(batch) >= max_batch_size
        ):
            yield batch
            batch = []
        batch.append(int(index))
    if batch:
        yield batch
