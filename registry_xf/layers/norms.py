"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import registry
from ..types import Eps, FiniteFloat, Width


class LayerNorm(nn.LayerNorm):
    """Layer normalisation with optional bias (no-bias variants exist in newer models)."""


class RMSNorm(nn.Module):
    """Root-mean-square norm. ``weight_offset=1`` gives Gemma's ``(1 + w)`` scaling.

    Computed in float32 and cast back, as the reference implementations do.
    """

    def __init__(self, width: int, eps: float = 1e-6, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(width))

    def reset_parameters(self) -> None:
        """Scaling by one: a weight of ones, or of zeros with ``weight_offset=1``."""
        nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.weight_offset:
            # the same computation as below, as one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.weight.float() + self.weight_offset)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, weight_offset={self.weight_offset}"


@registry.layers.register("registry_xf.LayerNorm.v1")
def layer_norm(width: Width, eps: Eps = 1e-5, bias: bool = True) -> nn.Module:
    """LayerNorm over the last dimension."""
    return LayerNorm(width, eps=eps, bias=bias)


@registry.layers.register("registry_xf.RMSNorm.v1")
def rms_norm(width: Width, eps: Eps = 1e-6, weight_offset: FiniteFloat = 0.0) -> nn.Module:
    """RMSNorm; ``weight_offset`` is added to the weight (1.0 for Gemma)."""
    return RMSNorm(width, eps=eps, weight_offset=weight_offset)


@registry.layers.register("registry_xf.Identity.v1")
def identity() -> nn.Module:
    """No normalisation: fills a norm slot that a layer leaves empty on purpose (ModernBERT's
    first layer, whose input was just normalised by the embeddings)."""
    return nn.Identity()
