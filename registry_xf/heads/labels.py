"""What classification heads share: label names and how logits become scores."""

from __future__ import annotations

from typing import Literal

import torch

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]


def check_labels(labels: list[str]) -> tuple[str, ...]:
    """Label names, one per output; at least one, none repeated."""
    if not labels:
        raise ValueError("a classification head needs at least one label")
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise ValueError(f"label names must differ; repeated: {', '.join(repeated)}")
    return tuple(str(name) for name in labels)


def scores(logits: torch.Tensor, problem_type: ProblemType | None) -> torch.Tensor:
    """Scores as HF's classification pipelines compute them: the raw value for regression,
    a sigmoid per label for multi-label heads and single-output heads, else a softmax."""
    if problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification" or logits.shape[-1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)
