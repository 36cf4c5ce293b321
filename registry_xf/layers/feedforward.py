"""Position-wise feed-forward layers, plain or gated (GLU family)."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import registry
from .activations import Activation


class FeedForward(nn.Module):
    """``down(act(up(x)))``, or gated: ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU)."""

    def __init__(
        self,
        width: int,
        intermediate_width: int,
        activation: nn.Module,
        *,
        gated: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.up_proj = nn.Linear(width, intermediate_width, bias=bias)
        self.gate_proj = nn.Linear(width, intermediate_width, bias=bias) if gated else None
        self.down_proj = nn.Linear(intermediate_width, width, bias=bias)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            h = self.activation(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.activation(self.up_proj(x))
        return self.dropout(self.down_proj(h))


@registry.layers.register("registry_xf.FeedForward.v1")
def feed_forward(
    width: int,
    intermediate_width: int,
    activation: Activation = "gelu",  # type: ignore[assignment]
    gated: bool = False,
    bias: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    """Feed-forward layer. ``gated=True`` with ``silu`` is SwiGLU, with ``gelu`` GeGLU."""
    return FeedForward(
        width, intermediate_width, activation, gated=gated, bias=bias, dropout=dropout
    )
