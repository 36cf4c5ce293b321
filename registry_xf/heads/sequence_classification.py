"""One label distribution per sequence, read from its first token ([CLS] or <s>) or from the
mean of its tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..layers.activations import Activation
from ..registry import registry
from ..types import Probability, Width
from .labels import ProblemType, check_labels, scores

Pooling = Literal["cls", "mean"]


class SequenceClassificationHead(nn.Module):
    """``out_proj(dropout(norm?(activation(dense(dropout?(pooled))))))``.

    One shape covers each family's head, which differ in the activation and where dropout
    sits: BERT and ALBERT pool with tanh (HF's pooler), RoBERTa also with tanh but with
    dropout before ``dense`` too, ELECTRA with GELU, DistilBERT with ReLU; ModernBERT adds
    a ``norm`` after the activation, has no bias on ``dense`` and may pool by the mean of
    the real tokens (``pooling="mean"``) instead of the first token (``"cls"``).
    ``problem_type`` (HF's) says how logits become scores: softmax, sigmoid per label, or
    raw (regression).
    """

    task = "sequence_classification"
    reads_positions = (0,)  # the first token only: the encoder may compute no other

    def __init__(
        self,
        width: int,
        labels: list[str],
        activation: nn.Module,
        dropout: float = 0.1,
        dropout_before_dense: bool = False,
        problem_type: ProblemType | None = None,
        pooling: Pooling = "cls",
        dense_bias: bool = True,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        self.labels = check_labels(labels)
        self.problem_type = problem_type
        self.pooling = pooling
        self.dense = nn.Linear(width, width, bias=dense_bias)
        self.activation = activation
        self.norm = norm
        self.input_dropout = nn.Dropout(dropout) if dropout_before_dense else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(width, len(self.labels))

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, n_labels) from hidden states (batch, seq, width)."""
        x = self.input_dropout(self.pool(hidden, attention_mask))
        x = self.activation(self.dense(x))
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(self.dropout(x))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, width): the first token's state, or the mean of the real tokens' states."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (or values, for regression) as ``problem_type`` says."""
        return scores(logits, self.problem_type)


@registry.heads.register("registry_xf.SequenceClassificationHead.v1")
def sequence_classification_head(
    width: Width,
    labels: list[str],
    activation: Activation = "tanh",  # type: ignore[assignment]
    dropout: Probability = 0.1,
    dropout_before_dense: bool = False,
    problem_type: ProblemType | None = None,
    pooling: Pooling = "cls",
    dense_bias: bool = True,
    norm: nn.Module | None = None,
) -> SequenceClassificationHead:
    """A classifier over the first token (or the tokens' mean, ``pooling="mean"``): dense,
    activation, optional norm, dropout, projection to labels."""
    return SequenceClassificationHead(
        width,
        labels,
        activation,
        dropout,
        dropout_before_dense,
        problem_type,
        pooling,
        dense_bias,
        norm,
    )
