"""One transformer layer: attention and feed-forward with their residuals and norms."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..registry import registry
from .attention_mask import AttentionMask
from .kv_cache import LayerCache

Residual = Literal["pre", "post", "parallel"]


class TransformerLayer(nn.Module):
    """Attention then feed-forward, each with a residual connection.

    ``residual`` places the norms: ``"post"`` (BERT) norms after each residual sum;
    ``"pre"`` (GPT-2, Llama) norms each branch's input; ``"parallel"`` (GPT-NeoX, Falcon)
    adds attention and feed-forward of the same input, with the feed-forward norm
    optional (shared with attention when absent).
    """

    def __init__(
        self,
        attention: nn.Module,
        feed_forward: nn.Module,
        *,
        attention_norm: nn.Module | None = None,
        feed_forward_norm: nn.Module | None = None,
        residual: Residual = "post",
        dropout: float = 0.0,
    ):
        super().__init__()
        if residual in ("pre", "post") and (attention_norm is None or feed_forward_norm is None):
            raise ValueError(f"residual='{residual}' needs attention_norm and feed_forward_norm")
        if residual == "parallel" and attention_norm is None:
            raise ValueError("residual='parallel' needs attention_norm")
        self.attention = attention
        self.feed_forward = feed_forward
        self.attention_norm = attention_norm
        self.feed_forward_norm = feed_forward_norm
        self.residual = residual
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        if self.residual == "post":
            x = self.attention_norm(x + self.dropout(self.attention(x, mask, positions, cache)))
            return self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))
        if self.residual == "pre":
            x = x + self.dropout(self.attention(self.attention_norm(x), mask, positions, cache))
            return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        h = self.attention_norm(x)
        h_ff = self.feed_forward_norm(x) if self.feed_forward_norm is not None else h
        attn = self.attention(h, mask, positions, cache)
        return x + self.dropout(attn) + self.dropout(self.feed_forward(h_ff))


@registry.layers.register("registry_xf.TransformerLayer.v1")
def transformer_layer(
    attention: nn.Module,
    feed_forward: nn.Module,
    attention_norm: nn.Module | None = None,
    feed_forward_norm: nn.Module | None = None,
    residual: Residual = "post",
    dropout: float = 0.0,
) -> nn.Module:
    """A transformer layer; ``residual`` is "pre", "post" or "parallel"."""
    return TransformerLayer(
        attention,
        feed_forward,
        attention_norm=attention_norm,
        feed_forward_norm=feed_forward_norm,
        residual=residual,
        dropout=dropout,
    )
