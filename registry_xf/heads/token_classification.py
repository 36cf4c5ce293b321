"""One label distribution per token (named entities, parts of speech)."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import registry
from ..types import Probability, Width
from .labels import check_labels, scores


class TokenClassificationHead(nn.Module):
    """``classifier(dropout(h))`` at every position, as every family's HF token classifier."""

    task = "token_classification"
    problem_type = None

    def __init__(self, width: int, labels: list[str], dropout: float = 0.1):
        super().__init__()
        self.labels = check_labels(labels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, len(self.labels))

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, seq, n_labels) from hidden states (batch, seq, width)."""
        return self.classifier(self.dropout(hidden))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """A softmax over the labels at each token."""
        return scores(logits, None)


@registry.heads.register("registry_xf.TokenClassificationHead.v1")
def token_classification_head(
    width: Width, labels: list[str], dropout: Probability = 0.1
) -> TokenClassificationHead:
    """A linear classifier applied to every token's hidden state."""
    return TokenClassificationHead(width, labels, dropout)
