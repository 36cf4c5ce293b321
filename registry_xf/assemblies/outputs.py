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
