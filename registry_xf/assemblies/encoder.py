"""The generic encoder: embeddings, a stack of layers, an optional final norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..layers.attention_mask import AttentionMask
from ..registry import registry
from .base import Assembly, within_size_bound
from .inputs import check_attention_mask, check_ids_like, check_input_ids
from .outputs import ModelOutput


class Encoder(Assembly):
    """A bidirectional transformer encoder (BERT, RoBERTa, ALBERT, ...).

    Families differ only in the components their config gives it. ``attention_bias``
    (T5's relative position bias) is computed once per pass and shared by the layers.
    """

    def __init__(
        self,
        embeddings: nn.Module,
        layers: nn.Module,
        final_norm: nn.Module | None = None,
        attention_bias: nn.Module | None = None,
    ):
        super().__init__()
        self.embeddings = embeddings
        self.layers = layers
        self.final_norm = final_norm
        self.attention_bias = attention_bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_positions: Sequence[int] | None = None,
    ) -> ModelOutput:
        """Encode ``input_ids`` (batch, seq); ``attention_mask`` has 1 for real tokens.

        ``output_positions`` (token positions) makes the last layer compute only those
        positions (from keys and values of all): ``last_hidden_state`` is then (batch,
        len(output_positions), width). A reader of the first token alone (a [CLS] head or
        pooler) saves most of a layer's work."""
        self.check_inputs(input_ids, attention_mask, token_type_ids, positions)
        query_index = self._output_index(output_positions, input_ids.shape[1], input_ids.device)
        self.embeddings.check(input_ids, token_type_ids, positions)
        mask = AttentionMask(attention_mask.bool() if attention_mask is not None else None)
        if self.attention_bias is not None:
            mask.bias = self.attention_bias(input_ids.shape[1], input_ids.shape[1])
        h = self.embeddings(input_ids, token_type_ids, positions)
        states = [h] if output_hidden_states else []
        applied = self.layers.applied()
        for i, layer in enumerate(applied):
            if query_index is not None and i == len(applied) - 1:
                h = layer(h, mask, positions, query_index=query_index)
            else:
                h = layer(h, mask, positions)
            if output_hidden_states:
                states.append(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
            if output_hidden_states:
                states[-1] = h
        return ModelOutput(last_hidden_state=h, hidden_states=states)

    @staticmethod
    def _output_index(
        output_positions: Sequence[int] | None, seq_len: int, device: torch.device
    ) -> torch.Tensor | None:
        if output_positions is None:
            return None
        positions = list(output_positions)
        if not positions or any(
            isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < seq_len for p in positions
        ):
            raise InputError(
                f"output_positions={positions!r}: expected token positions 0 to {seq_len - 1}"
            )
        return torch.tensor(positions, dtype=torch.long, device=device)

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Refuse inputs of the wrong kind or shape before torch sees them."""
        check_input_ids(input_ids, self.embeddings.word_embeddings.weight.device)
        if attention_mask is not None:
            check_attention_mask(
                attention_mask, input_ids.shape, "(batch, seq) as input_ids", input_ids.device
            )
        if token_type_ids is not None:
            check_ids_like("token_type_ids", token_type_ids, input_ids, batch_of_one=False)
        if positions is not None:
            check_ids_like("positions", positions, input_ids, batch_of_one=True)
        limit = self.max_positions
        if limit is not None and input_ids.shape[1] > limit:
            raise InputError(
                f"sequence of {input_ids.shape[1]} tokens is longer than the model's "
                f"{limit} positions; truncate the input (the tokenizer's max_length does that)"
            )

    @property
    def width(self) -> int:
        """Width of the hidden states."""
        return int(self.embeddings.output_width)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.embeddings, "max_positions", None)


@registry.architectures.register("registry_xf.Encoder.v1")
def encoder(
    embeddings: nn.Module,
    layers: nn.Module,
    final_norm: nn.Module | None = None,
    attention_bias: nn.Module | None = None,
) -> Encoder:
    """A transformer encoder from embeddings, a layer stack and an optional final norm;
    ``attention_bias`` adds scores shared by every layer (T5's relative positions)."""
    return within_size_bound(Encoder(embeddings, layers, final_norm, attention_bias))
