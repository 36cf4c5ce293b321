"""Whether a forward pass may read tensor values back to the host right now.

Input checks that look at values (ids within the vocabulary, positions within a table)
read them back, which is not allowed in two cases: while ``torch.compile`` traces (it
would break the graph) and while a CUDA graph records (a copy to the host cannot be
recorded). There the checks are left out; the same call run eagerly makes them.
"""

from __future__ import annotations

import torch


def values_readable() -> bool:
    """False while torch.compile traces or a CUDA graph records on the current stream."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
