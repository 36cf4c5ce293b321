"""Which keys each query may attend to: padding, causality, sliding windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMask:
    """A mask built once per forward pass and shared by every layer.

    ``key_mask`` is (batch, keys) with True for real tokens (HF's ``attention_mask``).
    Queries are the last ``n_queries`` keys (so a cache of earlier keys fits).
    Rows with no key to attend to are given zeros by attention, never NaN.
    """

    key_mask: torch.Tensor | None
    causal: bool = False
    window: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def bool_mask(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor | None:
        """(batch or 1, 1, queries, keys) with True = attend; None when nothing is masked."""
        key = (n_queries, n_keys, self.window)
        if key in self._cache:
            return self._cache[key]
        mask = None
        if self.key_mask is not None and not bool(self.key_mask.all()):
            mask = self.key_mask[:, None, None, :n_keys].to(device=device, dtype=torch.bool)
        if self.causal or self.window is not None:
            q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
            k_pos = torch.arange(n_keys, device=device)[None, :]
            allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
            if self.causal:
                allowed &= k_pos <= q_pos
            if self.window is not None:
                allowed &= (q_pos - k_pos) < self.window
                if not self.causal:
                    allowed &= (k_pos - q_pos) < self.window
            allowed = allowed[None, None]
            mask = allowed if mask is None else mask & allowed
        self._cache[key] = mask
        return mask

    def for_attention(
        self, n_queries: int, n_keys: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask, dead rows) ready for attention.

        ``dead`` is (batch, 1, queries, 1), True where a query can see no key at all; those
        rows are opened in ``mask`` (so softmax stays finite) and must be zeroed afterwards.
        """
        key = ("attention", n_queries, n_keys, self.window)
        if key not in self._cache:
            mask = self.bool_mask(n_queries, n_keys, device)
            dead = None
            if mask is not None:
                rows = ~mask.any(-1, keepdim=True)
                if bool(rows.any()):
                    dead = rows
                    mask = mask | rows
            self._cache[key] = (mask, dead)
        return self._cache[key]
