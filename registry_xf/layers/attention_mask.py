"""Which keys each query may attend to: padding, causality, sliding windows."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .unpadding import Unpadded


def query_slots(
    n_queries: int,
    n_keys: int,
    device: torch.device,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The queries' slots among the keys, as a column (queries, 1): ``query_positions``
    (a step of fixed shape), or else the last ``n_queries`` keys."""
    if query_positions is not None:
        return query_positions.to(device)[:, None]
    return torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]


@dataclass
class AttentionMask:
    """A mask built once per forward pass and shared by every layer.

    ``key_mask`` is (batch, keys) with True for real tokens (HF's ``attention_mask``),
    covering cached keys too. Queries are the last ``n_queries`` keys. ``causal`` lets a
    query see only earlier keys; a layer may add a sliding ``window``. Rows with no key to
    attend to are given zeros by attention, never NaN.

    Eagerly, masks are left out where nothing is masked (so the fused kernels run without
    one). Inside ``torch.compile`` that test would read values back and break the graph, so
    there a key mask is always applied and dead rows always zeroed: the same results.

    ``query_positions`` (queries,) places the queries among the keys when the keys are a
    whole preallocated cache, written or not (a decoding step of fixed shape, see
    :class:`~registry_xf.layers.kv_cache.KVCache`); such a step never reads a value back
    to the host either, so it masks as a compiled one does.
    """

    key_mask: torch.Tensor | None
    causal: bool = False
    # scores added before softmax, (1 or batch, heads, queries, keys): T5's position bias
    bias: torch.Tensor | None = None
    # set when the layers run on the real tokens alone (an encoder's ``unpad``)
    unpadded: Unpadded | None = None
    # what relative-position attention shares between layers (DeBERTa's relative rows)
    relative: Any = None
    query_positions: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Compute something once per forward pass and share it between layers."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def bool_mask(
        self, n_queries: int, n_keys: int, device: torch.device, window: int | None = None
    ) -> torch.Tensor | None:
        """(batch or 1, 1, queries, keys) with True = attend; None when nothing is masked."""
        # Within one forward pass every layer sees the same numbers of queries and keys, so
        # the memo keys leave them out (hashing a size would also pin it under compile).
        key = ("bool", window)
        if key in self._cache:
            return self._cache[key]
        mask = None
        if self.key_mask is not None and self._padded(n_keys):
            mask = self.key_mask[:, None, None, :n_keys].to(device=device, dtype=torch.bool)
        # a query at a given slot must not see the (stale or empty) slots after it
        needs_causal = self.causal and (n_queries > 1 or self.query_positions is not None)
        needs_window = window is not None and n_keys > window
        if needs_causal or needs_window:
            q_pos = query_slots(n_queries, n_keys, device, self.query_positions)
            k_pos = torch.arange(n_keys, device=device)[None, :]
            allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
            if self.causal:
                allowed &= k_pos <= q_pos
            if window is not None:
                allowed &= (q_pos - k_pos) < window
                if not self.causal:
                    allowed &= (k_pos - q_pos) < window
            allowed = allowed[None, None]
            mask = allowed if mask is None else mask & allowed
        self._cache[key] = mask
        return mask

    def for_attention(
        self, n_queries: int, n_keys: int, device: torch.device, window: int | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """(mask, dead rows, is_causal) ready for attention.

        ``dead`` is (batch, 1, queries, 1), True where a query can see no key at all; those
        rows are opened in ``mask`` (so softmax stays finite) and must be zeroed afterwards.
        ``is_causal`` is True when a plain causal mask is all there is (no padding, no
        window, queries = keys): the fused kernels then need no mask tensor at all.
        """
        key = ("attention", window)
        if key not in self._cache:
            padded = self.key_mask is not None and self._padded(n_keys)
            windowed = window is not None and n_keys > window
            if self.causal and n_queries == n_keys > 1 and not padded and not windowed:
                self._cache[key] = (None, None, True)
                return self._cache[key]
            mask = self.bool_mask(n_queries, n_keys, device, window)
            dead = None
            if mask is not None:
                rows = ~mask.any(-1, keepdim=True)
                if self._no_readback() or bool(rows.any()):
                    dead = rows
                    mask = mask | rows
            self._cache[key] = (mask, dead, False)
        return self._cache[key]

    def _padded(self, n_keys: int) -> bool:
        """Whether any of the first ``n_keys`` keys is masked (assumed so when compiling
        or in a step of fixed shape)."""
        assert self.key_mask is not None
        return self._no_readback() or not bool(self.key_mask[:, :n_keys].all())

    def _no_readback(self) -> bool:
        """Whether values must stay on the device: inside ``torch.compile`` (reading one
        would break the graph) and in a step of fixed shape (a CUDA graph may record it)."""
        return torch.compiler.is_compiling() or self.query_positions is not None
