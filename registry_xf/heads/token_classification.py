"""One label distribution per token (named entities, parts of speech)."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.activations import Activation
from ..registry import registry
from ..types import Probability, Width
from .labels import check_labels, scores


class TokenClassificationHead(nn.Module):
    """``classifier(dropout(h))`` at every position, as the BERT-like families' HF token
    classifiers. With an ``activation``, ``h`` is first transformed by ``dense``, the
    activation and an optional ``norm`` (ModernBERT's head)."""

    task = "token_classification"
    problem_type = None

    def __init__(
        self,
        width: int,
        labels: list[str],
        dropout: float = 0.1,
        activation: nn.Module | None = None,
        dense_bias: bool = True,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        self.labels = check_labels(labels)
        if activation is not None:
            self.dense = nn.Linear(width, width, bias=dense_bias)
            self.activation = activation
            self.norm = norm
        self.transforms = activation is not None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, len(self.labels))

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, seq, n_labels) from hidden states (batch, seq, width)."""
        if self.transforms:
            hidden = self.activation(self.dense(hidden))
            if self.norm is not None:
                hidden = self.norm(hidden)
        return self.classifier(self.dropout(hidden))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """A softmax over the labels at each token."""
        return scores(logits, None)


@registry.heads.register("registry_xf.TokenClassificationHead.v1")
def token_classification_head(
    width: Width,
    labels: list[str],
    dropout: Probability = 0.1,
    activation: Activation | None = None,
    dense_bias: bool = True,
    norm: nn.Module | None = None,
) -> TokenClassificationHead:
    """A linear classifier applied to every token's hidden state; with an ``activation``,
    after a dense layer, that activation and an optional ``norm`` (ModernBERT)."""
    return TokenClassificationHead(width, labels, dropout, activation, dense_bias, norm)
