"""Vocabulary logits at every position: the masked-language-model head."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.activations import Activation
from ..registry import registry
from ..types import Eps, VocabSize, Width


class MaskedLMHead(nn.Module):
    """``decoder(norm(activation(transform(h))))``, the transform every BERT-like family
    puts before its output projection.

    ``embedding_width`` is the width the decoder reads: the hidden width for BERT and
    RoBERTa, the narrower embedding width for ALBERT and ELECTRA's generator. With
    ``tie_embeddings`` the decoder's weight is the token embeddings' (the assembly ties
    them) and its bias is the head's ``bias``, as HF ties them. The logits are what a
    SPLADE pooler reads. ``transform_bias``, ``norm_bias`` and ``decoder_bias`` leave
    out those biases (ModernBERT has none on the transform and its norm).
    """

    task = "masked_lm"
    labels = None
    problem_type = None

    def __init__(
        self,
        width: int,
        vocab_size: int,
        activation: nn.Module,
        embedding_width: int | None = None,
        layer_norm_eps: float = 1e-12,
        tie_embeddings: bool = True,
        transform_bias: bool = True,
        norm_bias: bool = True,
        decoder_bias: bool = True,
    ):
        super().__init__()
        embedding_width = embedding_width or width
        self.tie_embeddings = tie_embeddings
        self.transform = nn.Linear(width, embedding_width, bias=transform_bias)
        self.activation = activation
        self.transform_norm = nn.LayerNorm(embedding_width, eps=layer_norm_eps, bias=norm_bias)
        self.decoder = nn.Linear(embedding_width, vocab_size, bias=decoder_bias)
        if tie_embeddings and decoder_bias:
            # HF ties the bias too: the decoder's is the head's own ``bias`` (one tensor,
            # found under that name first), stored apart from the decoder in checkpoints.
            self.bias = self.decoder.bias

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) from hidden states (batch, seq, width)."""
        return self.decoder(self.transform_norm(self.activation(self.transform(hidden))))


@registry.heads.register("registry_xf.MaskedLMHead.v1")
def masked_lm_head(
    width: Width,
    vocab_size: VocabSize,
    activation: Activation = "gelu",  # type: ignore[assignment]
    embedding_width: Width | None = None,
    layer_norm_eps: Eps = 1e-12,
    tie_embeddings: bool = True,
    transform_bias: bool = True,
    norm_bias: bool = True,
    decoder_bias: bool = True,
) -> MaskedLMHead:
    """A masked-LM head: dense, activation, LayerNorm, projection to the vocabulary."""
    return MaskedLMHead(
        width,
        vocab_size,
        activation,
        embedding_width,
        layer_norm_eps,
        tie_embeddings,
        transform_bias,
        norm_bias,
        decoder_bias,
    )
