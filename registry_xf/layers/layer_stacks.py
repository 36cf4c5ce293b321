"""How layers are stacked: N copies, shared groups (ALBERT), or a repeating pattern.

A stack is a ``ModuleList`` of the distinct layers (their parameters) and says, through
``applied()``, in which order the layers run. The template layer is deep-copied, which
costs nothing on the meta device where models are built.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from ..registry import registry


class LayerStack(nn.ModuleList):
    """``n_layers`` independent copies of one layer."""

    def __init__(self, layer: nn.Module, n_layers: int):
        super().__init__(copy.deepcopy(layer) for _ in range(n_layers))

    def applied(self) -> Sequence[nn.Module]:
        return list(self)


class SharedLayerStack(nn.ModuleList):
    """``n_groups`` distinct layers, each run ``n_layers / n_groups`` times in turn (ALBERT)."""

    def __init__(self, layer: nn.Module, n_layers: int, n_groups: int = 1):
        if n_layers % n_groups:
            raise ValueError(f"n_layers {n_layers} is not a multiple of n_groups {n_groups}")
        super().__init__(copy.deepcopy(layer) for _ in range(n_groups))
        self.n_layers = n_layers

    def applied(self) -> Sequence[nn.Module]:
        per_group = self.n_layers // len(self)
        return [self[i // per_group] for i in range(self.n_layers)]


class PatternLayerStack(nn.ModuleList):
    """Layers of several kinds in a repeating pattern, e.g. local/local/global attention."""

    def __init__(self, kinds: dict[str, nn.Module], pattern: Sequence[str], n_layers: int):
        unknown = sorted(set(pattern) - set(kinds))
        if unknown:
            raise ValueError(f"pattern names {unknown}, but the kinds are {sorted(kinds)}")
        if not pattern:
            raise ValueError("pattern is empty")
        self.kind_names = [pattern[i % len(pattern)] for i in range(n_layers)]
        super().__init__(copy.deepcopy(kinds[name]) for name in self.kind_names)

    def applied(self) -> Sequence[nn.Module]:
        return list(self)


@registry.layers.register("registry_xf.LayerStack.v1")
def layer_stack(layer: nn.Module, n_layers: int) -> nn.Module:
    """``n_layers`` copies of ``layer``, each with its own weights."""
    return LayerStack(layer, n_layers)


@registry.layers.register("registry_xf.SharedLayerStack.v1")
def shared_layer_stack(layer: nn.Module, n_layers: int, n_groups: int = 1) -> nn.Module:
    """``n_layers`` layer applications sharing the weights of ``n_groups`` layers (ALBERT)."""
    return SharedLayerStack(layer, n_layers, n_groups)


@registry.layers.register("registry_xf.PatternLayerStack.v1")
def pattern_layer_stack(
    kinds: dict[str, nn.Module], pattern: list[str], n_layers: int
) -> nn.Module:
    """Layers whose kind follows ``pattern`` cyclically (alternating attention, as Gemma 2)."""
    return PatternLayerStack(kinds, pattern, n_layers)
