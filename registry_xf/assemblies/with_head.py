"""An encoder with a task head on top: a classifier, a tagger or a masked-LM."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import registry
from .base import Assembly, within_size_bound
from .encoder import Encoder
from .outputs import HeadOutput


class EncoderWithHead(Assembly):
    """``encoder`` (any encoder assembly) followed by ``head`` (from the heads registry).

    A head with ``tie_embeddings`` (masked-LM) shares its decoder weight with the encoder's
    token embeddings, as the HF checkpoints that tie them do. The model reads like its
    encoder where callers only want hidden states (``width``, ``max_positions``,
    ``last_hidden_state``), so embedding pipelines work on it too.
    """

    def __init__(self, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        if getattr(head, "tie_embeddings", False):
            embeddings = encoder.embeddings.word_embeddings.weight
            decoder = head.decoder
            if tuple(decoder.weight.shape) != tuple(embeddings.shape):
                raise ValueError(
                    f"head.tie_embeddings: the head's decoder is {tuple(decoder.weight.shape)} "
                    f"but the token embeddings are {tuple(embeddings.shape)}; give the head "
                    "the embedding width and vocabulary size, or tie_embeddings = false"
                )
            decoder.weight = embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        head_positions_only: bool = False,
    ) -> HeadOutput:
        """The encoder's output for ``input_ids`` (batch, seq) with the head's logits.

        ``head_positions_only`` lets the last layer compute only the positions the head
        reads (``head.reads_positions``, e.g. the first token): the same logits for less
        work, with ``last_hidden_state`` holding those positions only."""
        reads = getattr(self.head, "reads_positions", None) if head_positions_only else None
        out = self.encoder(
            input_ids,
            attention_mask,
            token_type_ids,
            positions,
            output_hidden_states=output_hidden_states,
            output_positions=reads,
        )
        logits = self.head(out.last_hidden_state, attention_mask)
        return HeadOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            logits=logits,
            labels=self.labels,
        )

    @property
    def task(self) -> str:
        """``"sequence_classification"``, ``"token_classification"`` or ``"masked_lm"``."""
        return str(getattr(self.head, "task", type(self.head).__name__))

    @property
    def labels(self) -> tuple[str, ...] | None:
        """Label names in logit order (classification heads), else None."""
        return getattr(self.head, "labels", None)

    @property
    def problem_type(self) -> str | None:
        return getattr(self.head, "problem_type", None)

    @property
    def width(self) -> int:
        return self.encoder.width

    @property
    def max_positions(self) -> int | None:
        return self.encoder.max_positions


@registry.architectures.register("registry_xf.EncoderWithHead.v1")
def encoder_with_head(encoder: Encoder, head: nn.Module) -> EncoderWithHead:
    """An encoder and a task head (``@heads``) on its hidden states."""
    return within_size_bound(EncoderWithHead(encoder, head))
