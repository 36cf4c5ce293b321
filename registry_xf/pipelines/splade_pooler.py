"""SPLADE pooling: one sparse vocabulary-sized vector per sequence from masked-LM logits."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..registry import registry

Strategy = Literal["max", "sum"]
SpladeActivation = Literal["relu", "log1p_relu"]


class SpladePooler(nn.Module):
    """``pool over tokens of log(1 + relu(logits))``, padding left out.

    Most vocabulary entries of a trained model get a logit at or below zero at every token,
    so the vector is sparse: its non-zero entries are the terms (with their weights) that
    the model finds in the text or expands it with. ``strategy`` "max" is SPLADE v2 and
    later, "sum" the first SPLADE; ``activation`` "log1p_relu" takes the log once more
    (OpenSearch's models). The same as sentence-transformers' ``SpladePooling``.
    """

    def __init__(self, strategy: Strategy = "max", activation: SpladeActivation = "relu"):
        super().__init__()
        if strategy not in ("max", "sum"):
            raise ValueError(f"strategy must be 'max' or 'sum'; got {strategy!r}")
        if activation not in ("relu", "log1p_relu"):
            raise ValueError(f"activation must be 'relu' or 'log1p_relu'; got {activation!r}")
        self.strategy = strategy
        self.activation = activation

    def forward(self, logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Vectors (batch, vocab) from logits (batch, seq, vocab) and the mask (batch, seq)."""
        # relu after masking: a padding position gives 0, which neither max nor sum notices
        weights = (logits * attention_mask.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
        if self.activation == "log1p_relu":
            weights = weights.log1p_()
        if self.strategy == "max":
            return weights.amax(dim=1)
        return weights.sum(dim=1)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, activation={self.activation!r}"


@registry.poolers.register("registry_xf.SpladePooler.v1")
def splade_pooler(
    strategy: Strategy = "max", activation: SpladeActivation = "relu"
) -> SpladePooler:
    """SPLADE's sparse vector over a masked-LM head's logits: log(1 + ReLU), max over tokens."""
    return SpladePooler(strategy, activation)
