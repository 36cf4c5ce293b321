"""One transformer layer: attention and feed-forward with their residuals and norms."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem, InputError
from ..registry import registry
from ..types import Probability
from .attention_mask import AttentionMask
from .cross_attention import EncoderMemory
from .kv_cache import LayerCache

Residual = Literal["pre", "post", "parallel"]


class TransformerLayer(nn.Module):
    """Attention then feed-forward, each with a residual connection.

    ``residual`` places the norms: ``"post"`` (BERT) norms after each residual sum;
    ``"pre"`` (GPT-2, Llama) norms each branch's input; ``"parallel"`` (GPT-NeoX, Falcon)
    adds attention and feed-forward of the same input, with the feed-forward norm
    optional (shared with attention when absent).

    A decoder layer of an encoder-decoder adds ``cross_attention`` (to the encoder's
    states, passed as ``memory``) between attention and feed-forward, with its own
    ``cross_attention_norm`` placed as ``residual`` says ("pre" or "post").

    ``query_index`` computes the layer's output at those positions only (keys and values
    still from every position): for a last layer whose reader needs a few tokens.
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
        cross_attention: nn.Module | None = None,
        cross_attention_norm: nn.Module | None = None,
    ):
        super().__init__()
        if cross_attention is not None and (residual == "parallel" or cross_attention_norm is None):
            raise ValueError("cross_attention needs cross_attention_norm and residual pre/post")
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
        self.cross_attention = cross_attention
        self.cross_attention_norm = cross_attention_norm

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        memory: EncoderMemory | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.residual == "post" and self._fuses_residuals():
            # inference: the residual sums (and norms, where they can) happen inside the
            # output projections
            rows = _rows(x, query_index)
            x = self._attend(x, mask, positions, cache, query_index, rows, self.attention_norm)
            return self.feed_forward(x, residual=x, norm=self.feed_forward_norm)
        if self.residual == "post":
            attn = self._attend(x, mask, positions, cache, query_index)
            x = self.attention_norm(_rows(x, query_index) + self.dropout(attn))
            if self.cross_attention is not None:
                cross = self.cross_attention(x, self._memory(memory))
                x = self.cross_attention_norm(x + self.dropout(cross))
            return self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))
        if self.residual == "pre" and self._fuses_residuals():
            # inference: each residual sum happens inside its output projection
            h = self.attention_norm(x)
            x = self._attend(h, mask, positions, cache, query_index, _rows(x, query_index))
            return self.feed_forward(self.feed_forward_norm(x), residual=x)
        if self.residual == "pre":
            attn = self._attend(self.attention_norm(x), mask, positions, cache, query_index)
            x = _rows(x, query_index) + self.dropout(attn)
            if self.cross_attention is not None:
                h = self.cross_attention_norm(x)
                x = x + self.dropout(self.cross_attention(h, self._memory(memory)))
            return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        h = self.attention_norm(x)
        h_ff = self.feed_forward_norm(x) if self.feed_forward_norm is not None else h
        attn = self._attend(h, mask, positions, cache, query_index)
        h_ff = _rows(h_ff, query_index)
        return _rows(x, query_index) + self.dropout(attn) + self.dropout(self.feed_forward(h_ff))

    def _attend(
        self,
        h: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None,
        cache: LayerCache | None,
        query_index: torch.Tensor | None,
        residual: torch.Tensor | None = None,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """Attention's output, plus ``residual``, then ``norm`` (each where given; an
        attention that adds residuals takes both)."""
        extra = {"residual": residual} if residual is not None else {}
        if norm is not None:
            extra["norm"] = norm
        if query_index is None:
            return self.attention(h, mask, positions, cache, **extra)
        if getattr(self.attention, "selects_queries", False):
            return self.attention(h, mask, positions, cache, query_index=query_index, **extra)
        out = self.attention(h, mask, positions, cache).index_select(1, query_index)
        out = out if residual is None else out + residual
        return out if norm is None else norm(out)

    def _fuses_residuals(self) -> bool:
        """Whether attention and feed-forward add the residual (and apply a post-norm)
        themselves: in inference
        (dropout does nothing), without cross-attention, where both parts can."""
        return (
            not self.training
            and self.cross_attention is None
            and getattr(self.attention, "adds_residual", False)
            and getattr(self.feed_forward, "adds_residual", False)
        )

    @staticmethod
    def _memory(memory: EncoderMemory | None) -> EncoderMemory:
        if memory is None:
            raise InputError("this decoder layer cross-attends: it needs the encoder's memory")
        return memory


def _rows(x: torch.Tensor, query_index: torch.Tensor | None) -> torch.Tensor:
    return x if query_index is None else x.index_select(1, query_index)


@registry.layers.register("registry_xf.TransformerLayer.v1")
def transformer_layer(
    attention: nn.Module,
    feed_forward: nn.Module,
    attention_norm: nn.Module | None = None,
    feed_forward_norm: nn.Module | None = None,
    residual: Residual = "post",
    dropout: Probability = 0.0,
    cross_attention: nn.Module | None = None,
    cross_attention_norm: nn.Module | None = None,
) -> nn.Module:
    """A transformer layer; ``residual`` is "pre", "post" or "parallel". A decoder layer
    of an encoder-decoder has ``cross_attention`` and ``cross_attention_norm`` ("pre" or
    "post" only)."""
    parts = {
        "attention": attention,
        "feed_forward": feed_forward,
        "attention_norm": attention_norm,
        "feed_forward_norm": feed_forward_norm,
        "cross_attention": cross_attention,
        "cross_attention_norm": cross_attention_norm,
    }
    if cross_attention is not None and (residual == "parallel" or cross_attention_norm is None):
        found = "residual='parallel'" if residual == "parallel" else "no cross_attention_norm"
        raise ConfigError(
            [
                ConfigProblem(
                    "cross_attention",
                    "needs a cross_attention_norm and residual 'pre' or 'post'",
                    found,
                    True,
                )
            ]
        )
    widths = {name: hidden_width(part) for name, part in parts.items() if part is not None}
    known = {name: w for name, w in widths.items() if w is not None}
    if len(set(known.values())) > 1:
        # they add into one residual stream: a mismatch would fail at the first forward pass
        raise ConfigError(
            [
                ConfigProblem(
                    name, "widths of the layer's parts differ: " + _listed(known), w, True
                )
                for name, w in known.items()
                if w != known.get("attention", next(iter(known.values())))
            ]
        )
    return TransformerLayer(
        attention,
        feed_forward,
        attention_norm=attention_norm,
        feed_forward_norm=feed_forward_norm,
        residual=residual,
        dropout=dropout,
        cross_attention=cross_attention,
        cross_attention_norm=cross_attention_norm,
    )


def hidden_width(module: nn.Module) -> int | None:
    """The width of the hidden states a part of a layer reads and writes (None: unknown)."""
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    for name in ("o_proj", "down_proj"):  # attention, feed-forward
        projection = getattr(module, name, None)
        if isinstance(projection, nn.Linear):
            return projection.out_features
    weight = getattr(module, "weight", None)  # RMSNorm and other norms
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return None


def _listed(widths: dict[str, int]) -> str:
    return ", ".join(f"{name} {width}" for name, width in widths.items())
