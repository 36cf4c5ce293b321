"""A component another package provides: found by registry_xf through its entry point."""

import torch
from torch import nn


class ScaledLayerNorm(nn.LayerNorm):
    """LayerNorm whose output is multiplied by a fixed factor."""

    def __init__(self, width: int, eps: float, factor: float):
        super().__init__(width, eps=eps)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.factor


def scaled_layer_norm(width: int, eps: float = 1e-5, factor: float = 1.0) -> nn.Module:
    """LayerNorm times ``factor``."""
    return ScaledLayerNorm(width, eps, factor)
