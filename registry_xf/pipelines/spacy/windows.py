"""Strided windows over a document's pieces, for documents longer than the model's positions.

Windows of ``size`` pieces start every ``stride`` pieces until one reaches the end; where
windows overlap, each piece's hidden state is the average of the windows that saw it.
"""

from __future__ import annotations


def strided_windows(n_pieces: int, size: int, stride: int) -> list[tuple[int, int]]:
    """``(start, end)`` piece ranges covering ``n_pieces``; one empty window for none."""
    if size < 1 or not 0 < stride <= size:
        raise ValueError(f"windows need 0 < stride <= size; found size={size}, stride={stride}")
    windows = []
    start = 0
    while True:
        end = min(start + size, n_pieces)
        windows.append((start, end))
        if end >= n_pieces:
            return windows
        start += stride
