"""How layers are stacked: N copies, shared groups (ALBERT), or a repeating pattern.

A stack is a ``ModuleList`` of the distinct layers (their parameters) and says, through
``applied()``, in which order the layers run. The template layer is cloned; on the meta
device, where models are built, a clone allocates nothing.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..registry import registry
from ..types import MAX_PARAMETERS, LayerCount
from .token_merging import TokenMerging, check_layers


def clone(module: nn.Module) -> nn.Module:
    """An independent copy of ``module``: same structure, its own parameters.

    Meta modules are cloned structurally (much faster than ``copy.deepcopy``, which
    matters when a deep model is built at every load); others are deep-copied.
    """
    return clones(module, 1)[0]


def clones(module: nn.Module, n: int) -> list[nn.Module]:
    """``n`` independent copies of ``module`` (see ``clone``)."""
    with torch._C.DisableTorchFunction():  # the build's device mode: no Python per tensor
        all_meta = _all_meta(module)
    if not all_meta:
        return [copy.deepcopy(module) for _ in range(n)]
    # Meta tensors need no device placement: skip the build's device mode (much faster).
    with torch._C.DisableTorchFunction():
        return [_clone_meta(module, {}) for _ in range(n)]


def _all_meta(module: nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is on meta (a direct walk: faster
    than ``parameters()``, which matters for the same reason as the structural clone)."""
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return all(t is None or t.is_meta for t in tensors) and all(
        child is None or _all_meta(child) for child in module._modules.values()
    )


_CONTAINER_BASES = (dict, list, set)
# Whether a type's values are containers that a clone copies (a dict, list or set,
# subclasses included), by type: asked once per type, not once per attribute.
_IS_CONTAINER: dict[type, bool] = {dict: True, list: True, set: True, OrderedDict: True}


def _clone_meta(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]
    new = module.__class__.__new__(module.__class__)
    state = module.__dict__.copy()
    for k, v in state.items():
        container = _IS_CONTAINER.get(type(v))
        if container is None:
            container = _IS_CONTAINER[type(v)] = isinstance(v, _CONTAINER_BASES)
        if container:
            state[k] = v.copy()
    new.__dict__.update(state)  # not nn.Module.__setattr__, which would check the name
    memo[id(module)] = new
    for name, p in module._parameters.items():
        if p is not None:
            if id(p) not in memo:  # a new Parameter object; meta tensors hold no data
                memo[id(p)] = (
                    torch.Tensor._make_subclass(nn.Parameter, p, p.requires_grad)
                    if type(p) is nn.Parameter  # what nn.Parameter() does, without its checks
                    else nn.Parameter(p, requires_grad=p.requires_grad)
                )
            new._parameters[name] = memo[id(p)]  # type: ignore[assignment]
    for name, b in module._buffers.items():
        if b is not None:
            new._buffers[name] = b.detach()
    for name, child in module._modules.items():
        if child is not None:
            new._modules[name] = _clone_meta(child, memo)
    return new


class LayerStack(nn.ModuleList):
    """``n_layers`` independent copies of one layer.

    Every stack may carry a ``token_merging`` (encoders only): a plain attribute, since
    a module there would be iterated as one of the layers.
    """

    token_merging: TokenMerging | None = None

    def __init__(self, layer: nn.Module, n_layers: int):
        super().__init__(clones(layer, n_layers))

    def applied(self) -> Sequence[nn.Module]:
        return list(self)


class SharedLayerStack(nn.ModuleList):
    """``n_groups`` distinct layers, each run ``n_layers / n_groups`` times in turn (ALBERT)."""

    token_merging: TokenMerging | None = None

    def __init__(self, layer: nn.Module, n_layers: int, n_groups: int = 1):
        if n_layers % n_groups:
            raise ValueError(f"n_layers {n_layers} is not a multiple of n_groups {n_groups}")
        super().__init__(clones(layer, n_groups))
        self.n_layers = n_layers

    def applied(self) -> Sequence[nn.Module]:
        per_group = self.n_layers // len(self)
        return [self[i // per_group] for i in range(self.n_layers)]


class PatternLayerStack(nn.ModuleList):
    """Layers of several kinds in a repeating pattern, e.g. local/local/global attention.

    ``first`` names a kind for the first layer in place of the pattern's (ModernBERT's
    first layer has no attention norm); the pattern goes on as if it were its own.
    """

    token_merging: TokenMerging | None = None

    def __init__(
        self,
        kinds: dict[str, nn.Module],
        pattern: Sequence[str],
        n_layers: int,
        first: str | None = None,
    ):
        unknown = sorted((set(pattern) | ({first} if first else set())) - set(kinds))
        if unknown:
            raise ValueError(f"pattern names {unknown}, but the kinds are {sorted(kinds)}")
        if not pattern:
            raise ValueError("pattern is empty")
        self.kind_names = [pattern[i % len(pattern)] for i in range(n_layers)]
        if first is not None and n_layers:
            self.kind_names[0] = first
        super().__init__(clone(kinds[name]) for name in self.kind_names)

    def applied(self) -> Sequence[nn.Module]:
        return list(self)


@registry.layers.register("registry_xf.LayerStack.v1")
def layer_stack(
    layer: nn.Module, n_layers: LayerCount, token_merging: TokenMerging | None = None
) -> nn.Module:
    """``n_layers`` copies of ``layer``, each with its own weights; ``token_merging``
    shortens an encoder's sequences between layers."""
    stack = LayerStack(within_size_bound(layer, n_layers), n_layers)
    return with_merging(stack, token_merging, n_layers)


@registry.layers.register("registry_xf.SharedLayerStack.v1")
def shared_layer_stack(
    layer: nn.Module,
    n_layers: LayerCount,
    n_groups: LayerCount = 1,
    token_merging: TokenMerging | None = None,
) -> nn.Module:
    """``n_layers`` layer applications sharing the weights of ``n_groups`` layers (ALBERT)."""
    stack = SharedLayerStack(within_size_bound(layer, n_groups), n_layers, n_groups)
    return with_merging(stack, token_merging, n_layers)


@registry.layers.register("registry_xf.PatternLayerStack.v1")
def pattern_layer_stack(
    kinds: dict[str, nn.Module],
    pattern: list[str],
    n_layers: LayerCount,
    first: str | None = None,
    token_merging: TokenMerging | None = None,
) -> nn.Module:
    """Layers whose kind follows ``pattern`` cyclically (alternating attention, as Gemma 2
    and ModernBERT); ``first``, if given, is the kind of the first layer instead."""
    for kind in kinds.values():
        within_size_bound(kind, n_layers)
    return with_merging(PatternLayerStack(kinds, pattern, n_layers, first), token_merging, n_layers)


def with_merging(stack: nn.Module, merging: TokenMerging | None, n_layers: int) -> nn.Module:
    """``stack`` carrying ``merging`` (checked against its layers), or as it is."""
    check_layers(merging, n_layers)
    if merging is not None:
        stack.token_merging = merging
    return stack


def within_size_bound(layer: nn.Module, copies: int) -> nn.Module:
    """``layer``, unless ``copies`` of it hold more parameters than any real model: refused
    before they are made (``MAX_PARAMETERS``)."""
    with torch._C.DisableTorchFunction():  # as in clones: no Python per tensor
        count = sum(p.numel() for p in layer.parameters()) * copies
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{copies} layers of {count // copies:,} parameters would make {count:,}, more "
            f"than the {MAX_PARAMETERS:,} registry_xf builds; check the layer's sizes"
        )
    return layer
