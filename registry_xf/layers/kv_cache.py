"""A key/value cache allocated once for the whole generation.

Each layer's keys and values live in two preallocated tensors; each step writes its new
entries in place (``index_copy_``) instead of concatenating, so memory stays flat and
shapes static. One pair of tensors per layer, not one for all layers, so that a compiled
graph writing one layer's entries never copies the others'.

A step may also say where to write with a tensor on the device (``cache_position``)
instead of a Python number: it then reads every position back, written or not (the
attention mask hides the others), so each step has the same shapes and nothing on the
host changes between steps, which a CUDA graph needs.
"""

from __future__ import annotations

import operator

import torch

from ..errors import InputError


def _size(name: str, value: object) -> int:
    """A Python or numpy integer of at least 1, as an int."""
    if not isinstance(value, bool) and hasattr(value, "__index__"):
        size = operator.index(value)  # type: ignore[call-overload]
        if size >= 1:
            return size
    raise InputError(f"a KV cache needs an integer {name} of at least 1; found {value!r}")


class LayerCache:
    """One layer's view of the cache for one forward pass: new entries go at ``start``, a
    position, or a tensor of the positions (one per new entry) on the cache's device."""

    def __init__(self, parent: KVCache, index: int, start: int | torch.Tensor):
        self.parent = parent
        self.index = index
        self.start = start

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (batch, kv_heads, n, head_width); return all so far,
        or, with positions in a tensor, every position the cache holds."""
        start = self.start
        keys, values = self.parent.keys[self.index], self.parent.values[self.index]
        self._check_kind(k, keys)
        if isinstance(start, torch.Tensor):
            keys.index_copy_(2, start, k)
            values.index_copy_(2, start, v)
            return keys, values
        end = start + k.shape[2]
        if end > self.parent.max_length:
            raise InputError(
                f"KV cache overflow: {end} positions needed, the cache holds "
                f"{self.parent.max_length}; create it with a larger max_length"
            )
        where = torch.arange(start, end, device=keys.device)
        keys.index_copy_(2, where, k)
        values.index_copy_(2, where, v)
        return keys[:, :, :end], values[:, :, :end]

    def _check_kind(self, k: torch.Tensor, keys: torch.Tensor) -> None:
        if (
            k.shape[1] != keys.shape[1]
            or k.shape[3] != keys.shape[3]
            or k.dtype != keys.dtype
            or k.device != keys.device
        ):
            raise InputError(
                f"the KV cache holds {keys.shape[1]} heads of width {keys.shape[3]} "
                f"({keys.dtype}, {keys.device}); layer {self.index} gives {k.shape[1]} of width "
                f"{k.shape[3]} ({k.dtype}, {k.device}): make the cache with this model's "
                "new_cache"
            )


class KVCache:
    """Keys and values for ``n_layers`` layers, up to ``max_length`` positions."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_width: int,
        max_length: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        batch_size, max_length = _size("batch_size", batch_size), _size("max_length", max_length)
        shape = (batch_size, n_kv_heads, max_length, head_width)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_length = max_length
        # as its tensors report it ("cuda" is read as "cuda:0")
        self.device = self.keys[0].device if self.keys else torch.device(device)
        self.length = 0

    def check_fits(self, batch_size: int, start: int, n_new: int, n_layers: int) -> None:
        """Refuse a forward pass this cache cannot take: another number of layers, another
        batch size, more positions than it holds. Shapes only (trace-friendly)."""
        if len(self.keys) != n_layers:
            raise InputError(
                f"the KV cache has {len(self.keys)} layers and the model {n_layers}: make the "
                "cache with this model's new_cache"
            )
        if not self.keys:
            return
        held = self.keys[0].shape
        if held[0] != batch_size:
            raise InputError(
                f"the KV cache was made for a batch of {held[0]} and input_ids has a batch of "
                f"{batch_size}: make it with new_cache({batch_size}, max_length)"
            )
        if start + n_new > held[2]:
            raise InputError(
                f"KV cache overflow: {start} cached + {n_new} new positions need "
                f"{start + n_new}, the cache holds {held[2]}; create it with a larger max_length"
            )

    def layer(self, index: int, start: int | torch.Tensor) -> LayerCache:
        """Layer ``index``'s view, writing the next entries at position ``start`` (or at
        the positions a tensor holds)."""
        return LayerCache(self, index, start)

    def set_length(self, n: int) -> None:
        """Record that every layer now holds ``n`` positions."""
        self.length = n

    def reset(self) -> None:
        self.length = 0
