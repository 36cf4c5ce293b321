"""Position-wise feed-forward layers, plain or gated (GLU family)."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import registry
from ..types import Probability, Width
from .activations import Activation
from .int8_linear import int8_feed_forward
from .linear_rows import split_rows
from .packed_linear import linear_plus, linear_then_activation


class FeedForward(nn.Module):
    adds_residual = True  # forward takes residual and norm
    """``down(act(up(x)))``, or gated: ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU).

    A gated layer with ``fused=True`` computes gate and up with one matrix ``gate_up_proj``
    (gate rows first), which is faster; otherwise ``gate_proj`` and ``up_proj``.
    """

    def __init__(
        self,
        width: int,
        intermediate_width: int,
        activation: nn.Module,
        *,
        gated: bool = False,
        fused: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.gated = gated
        self.fused = gated and fused
        if self.fused:
            self.gate_up_proj = nn.Linear(width, 2 * intermediate_width, bias=bias)
        else:
            self.up_proj = nn.Linear(width, intermediate_width, bias=bias)
            if gated:
                self.gate_proj = nn.Linear(width, intermediate_width, bias=bias)
        self.down_proj = nn.Linear(intermediate_width, width, bias=bias)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)
        self.split = (intermediate_width, intermediate_width)

    def separate_projections(self) -> None:
        """Switch a fused layout to separate ``gate_proj`` and ``up_proj``, whose weights
        are row blocks (views) of the fused matrix: the same results, no copy."""
        if not self.fused:
            return
        gate, up = split_rows(self.gate_up_proj, self.split)
        del self.gate_up_proj
        self.up_proj, self.gate_proj = up, gate
        self.fused = False

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """The layer's output, plus ``residual`` if given (added inside the last multiply
        where the weights are packed; in inference only, as dropout then does nothing),
        then ``norm`` if given (a post-norm layer's; inside the multiply where it can)."""
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = self.activation(gate) * up
        elif self.gated:
            h = self.activation(self.gate_proj(x)) * self.up_proj(x)
        else:
            if not self.training:  # int8 layers: the C++ kernel may do all of it at once
                up, down = self.up_proj, self.down_proj
                out = int8_feed_forward(up, self.activation, down, x, residual)
                if out is not None:
                    return out if norm is None else norm(out)
            h = linear_then_activation(self.up_proj, self.activation, x)
        if residual is not None and not self.training:
            return linear_plus(self.down_proj, h, residual, norm)
        out = self.dropout(self.down_proj(h))
        out = out if residual is None else out + residual
        return out if norm is None else norm(out)


@registry.layers.register("registry_xf.FeedForward.v1")
def feed_forward(
    width: Width,
    intermediate_width: Width,
    activation: Activation = "gelu",  # type: ignore[assignment]
    gated: bool = False,
    bias: bool = True,
    dropout: Probability = 0.0,
    fused: bool = False,
) -> nn.Module:
    """Feed-forward layer. ``gated=True`` with ``silu`` is SwiGLU, with ``gelu`` GeGLU;
    ``fused`` computes a gated layer's gate and up projections with one matrix."""
    return FeedForward(
        width,
        intermediate_width,
        activation,
        gated=gated,
        fused=fused,
        bias=bias,
        dropout=dropout,
    )
