"""What assemblies return."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """``last_hidden_state`` (batch, seq, width); ``hidden_states``: the embedding output,
    then each layer's output (kept only when asked for)."""

    last_hidden_state: torch.Tensor
    hidden_states: list[torch.Tensor] = field(default_factory=list)


@dataclass
class HeadOutput(ModelOutput):
    """Adds a task head's ``logits`` to the encoder's output: (batch, n_labels) for sequence
    classification, (batch, seq, n_labels) for token classification, (batch, seq, vocab)
    for a masked-LM head. ``labels`` names the classes, in logit order (None for an LM)."""

    logits: torch.Tensor | None = None
    labels: tuple[str, ...] | None = None
