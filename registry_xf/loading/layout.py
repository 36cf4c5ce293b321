"""Which layout fused projections take when a checkpoint stores their parts apart.

A fused query/key/value (or gate/up) matrix read from HF's separate matrices is a copy
of them, unless the parts lie back to back in the file in the fused order, when it is a
view of the file. For a big model the copy is most of the load (1 GB of a 0.9B Llama) and
buys little: the separate matrices, views of the file, decode about as fast once a step
reads over a gigabyte. So a model too big to be packed for the CPU (packing copies every
weight anyway, fused or not) is built with separate projections wherever fusing would
copy, and its config says so (``hyper.qkv = "separate"``, ``hyper.fused_gate_up =
false``): saving and exporting follow the layout the model has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers.attention import SelfAttention
from ..layers.feedforward import FeedForward
from ..layers.packed_linear import AUTO_PACK_LIMIT_BYTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedLayout:
    """A module kind with a fused projection, and the ``[hyper]`` setting that chooses it
    in every family config (``qkv = ${hyper.qkv}``)."""

    kind: type[nn.Module]
    projection: str  # the fused linear layer's attribute
    hyper: str
    fused: Any
    separate: Any


FUSED_LAYOUTS = (
    FusedLayout(SelfAttention, "qkv_proj", "qkv", "fused", "separate"),
    FusedLayout(FeedForward, "gate_up_proj", "fused_gate_up", True, False),
)


def copy_to_fuse_automatically(device: torch.device, model_bytes: Callable[[], int]) -> bool:
    """Whether fusing by copy pays: off the CPU (where joining is a fast device copy and
    fewer kernel calls matter), and for CPU models small enough to be packed."""
    return device.type != "cpu" or model_bytes() <= AUTO_PACK_LIMIT_BYTES


def separate_where_fusing_copies(
    model: nn.Module,
    hyper: Mapping[str, Any] | None,
    copies: Callable[[str], bool],
) -> dict[str, Any]:
    """Give every fused module of a kind separate projections if fusing would copy for any
    of them (``copies`` is asked with our parameter names), and the ``[hyper]`` setting
    allows it. Returns the ``[hyper]`` values that now describe the model."""
    hyper = hyper or {}
    layouts = [layout for layout in FUSED_LAYOUTS if hyper.get(layout.hyper) == layout.fused]
    if not layouts:  # fixed in the family's config, or already separate
        return {}
    found: dict[FusedLayout, list[tuple[str, nn.Module]]] = {layout: [] for layout in layouts}
    for prefix, module in model.named_modules():
        for layout in layouts:
            if isinstance(module, layout.kind) and module.fused:
                found[layout].append((prefix, module))
    changed: dict[str, Any] = {}
    for layout, modules in found.items():
        if not any(
            copies(f"{prefix}.{layout.projection}.{p}" if prefix else f"{layout.projection}.{p}")
            for prefix, module in modules
            for p, value in getattr(module, layout.projection).named_parameters(recurse=False)
            if value is not None
        ):
            continue
        for _, module in modules:
            module.separate_projections()
        changed[layout.hyper] = layout.separate
        logger.info(
            "%d %s modules keep separate projections (views of the file): fusing them "
            "would copy them",
            len(modules),
            layout.kind.__name__,
        )
    return changed
