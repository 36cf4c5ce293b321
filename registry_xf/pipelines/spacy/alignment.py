"""Which pieces of the model's tokenizer make up each spaCy token.

The doc's text is tokenized once; each piece carries its character offsets, and a token
owns every piece whose characters overlap its own. A token no piece overlaps (whitespace,
or characters the tokenizer drops) borrows its nearest preceding piece, so every token
of a doc that has pieces gets a vector.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def align_tokens(
    token_spans: NDArray[np.int64], piece_offsets: NDArray[np.int64]
) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Token → piece alignment as (piece indices, pieces per token).

    ``token_spans`` is (n_tokens, 2) character start/end, ascending and non-overlapping;
    ``piece_offsets`` is (n_pieces, 2) in the same characters. The piece indices of token
    ``i`` are ``indices[sum(lengths[:i]) : sum(lengths[:i + 1])]``, in order.
    """
    n_tokens = len(token_spans)
    n_pieces = len(piece_offsets)
    if n_tokens == 0 or n_pieces == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(n_tokens, dtype=np.int32)
    starts, ends = token_spans[:, 0], token_spans[:, 1]
    p_starts, p_ends = piece_offsets[:, 0], piece_offsets[:, 1]
    # first token ending after the piece starts, last token starting before it ends
    first = np.searchsorted(ends, p_starts, side="right")
    last = np.searchsorted(starts, p_ends, side="left") - 1
    counts = np.where(p_ends > p_starts, np.maximum(last - first + 1, 0), 0)
    piece_of_pair = np.repeat(np.arange(n_pieces), counts)
    offset_in_run = np.arange(len(piece_of_pair)) - np.repeat(np.cumsum(counts) - counts, counts)
    token_of_pair = np.repeat(first, counts) + offset_in_run
    lengths = np.bincount(token_of_pair, minlength=n_tokens)
    # tokens with no piece of their own borrow the nearest piece before them (else the first)
    orphans = np.flatnonzero(lengths == 0)
    if len(orphans):
        nearest = np.searchsorted(p_starts, starts[orphans], side="right") - 1
        token_of_pair = np.concatenate([token_of_pair, orphans])
        piece_of_pair = np.concatenate([piece_of_pair, np.maximum(nearest, 0)])
        lengths[orphans] = 1
    order = np.lexsort((piece_of_pair, token_of_pair))
    return piece_of_pair[order].astype(np.int32), lengths.astype(np.int32)
