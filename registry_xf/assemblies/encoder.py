"""The generic encoder: embeddings, a stack of layers, an optional final norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem, InputError
from ..layers.attention import SelfAttention
from ..layers.attention_mask import AttentionMask
from ..layers.disentangled_attention import RelativeEmbeddings
from ..layers.unpadding import Unpadded
from ..registry import registry
from .base import Assembly, within_size_bound
from .inputs import check_attention_mask, check_ids_like, check_input_ids
from .outputs import ModelOutput


class Encoder(Assembly):
    """A bidirectional transformer encoder (BERT, RoBERTa, ALBERT, ...).

    Families differ only in the components their config gives it. ``attention_bias``
    (T5's relative position bias) is computed once per pass and shared by the layers, as
    is ``relative_positions`` (DeBERTa's relative embeddings, read by its attention).
    With ``unpad``, a padded batch runs its layers on the real tokens alone (attention
    excepted, see ``layers.unpadding``): less arithmetic for batches of mixed lengths, and
    zeros in the outputs at padding.
    """

    def __init__(
        self,
        embeddings: nn.Module,
        layers: nn.Module,
        final_norm: nn.Module | None = None,
        attention_bias: nn.Module | None = None,
        unpad: bool = False,
        relative_positions: nn.Module | None = None,
    ):
        super().__init__()
        self.embeddings = embeddings
        self.layers = layers
        self.final_norm = final_norm
        self.attention_bias = attention_bias
        self.unpad = unpad
        self.relative_positions = relative_positions
        self._foreign_attention: list[str] | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        output_positions: Sequence[int] | None = None,
        unpad: bool | None = None,
    ) -> ModelOutput:
        """Encode ``input_ids`` (batch, seq); ``attention_mask`` has 1 for real tokens.

        ``output_positions`` (token positions) makes the last layer compute only those
        positions (from keys and values of all): ``last_hidden_state`` is then (batch,
        len(output_positions), width). A reader of the first token alone (a [CLS] head or
        pooler) saves most of a layer's work. ``unpad`` overrides the model's own setting
        for this call (True: the real tokens alone where every attention is
        ``SelfAttention``; outputs at padding are then zeros)."""
        self.check_inputs(input_ids, attention_mask, token_type_ids, positions)
        query_index = self._output_index(output_positions, input_ids.shape[1], input_ids.device)
        self.embeddings.check(input_ids, token_type_ids, positions)
        mask = AttentionMask(attention_mask.bool() if attention_mask is not None else None)
        if self.attention_bias is not None:
            mask.bias = self.attention_bias(input_ids.shape[1], input_ids.shape[1])
        if self.relative_positions is not None:
            mask.relative = self.relative_positions(input_ids.shape[1], input_ids.shape[1])
        h = self.embeddings(input_ids, token_type_ids, positions)
        states = [h] if output_hidden_states else []
        layers = self.layers.applied()
        merging = getattr(self.layers, "token_merging", None)  # a stack of a plugin: none
        if merging is not None and merging.enabled and self._merges(merging, mask, input_ids):
            merged = merging.start(input_ids, mask, positions)
        else:
            merging = merged = None
        # Merging works on the padded batch: the layers run unpadded only without it.
        unpadded = None if merged else self._unpadded(attention_mask, unpad)
        if unpadded is not None:
            mask.unpadded = unpadded
            h = unpadded.pack(h)
        # The last layer computes the output positions alone, unless tokens moved.
        last_only = query_index is not None and not merged and unpadded is None
        for i, layer in enumerate(layers):
            if last_only and i == len(layers) - 1:
                h = layer(h, mask, positions, query_index=query_index)
            else:
                h = layer(h, mask, merged.positions if merged else positions)
            if merged and merging.merges_after(i, len(layers)):
                h, merged, mask = merging.merge(h, merged, mask)
            if output_hidden_states:
                states.append(merging.unmerge(h, merged) if merged else h)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if merged:
            h = merging.unmerge(h, merged)  # every original token, in order
        if output_hidden_states and self.final_norm is not None:
            states[-1] = h
        if unpadded is not None:
            h = unpadded.unpack(h)
            states = states[:1] + [unpadded.unpack(state) for state in states[1:]]
        if query_index is not None and not last_only:
            h = h.index_select(1, query_index)
        return ModelOutput(last_hidden_state=h, hidden_states=states)

    @staticmethod
    def _merges(merging: nn.Module, mask: AttentionMask, input_ids: torch.Tensor) -> bool:
        """Whether Token Merging takes this batch: not where it would merge no token (a
        batch of short texts then runs as without merging, unpadded where it may)."""
        if torch.compiler.is_compiling():
            return True  # one graph for every batch
        return merging.merges_any(mask.key_mask, input_ids.shape[1])

    def _unpadded(self, attention_mask: torch.Tensor | None, unpad: bool | None) -> Unpadded | None:
        """Where the real tokens are, if the layers should run on them alone: with
        ``unpad`` (the call's, else the model's) where every layer's attention is
        ``SelfAttention``, eagerly, when the mask hides some tokens."""
        if unpad is None:
            unpad = self.unpad
        elif unpad and not self.unpad:
            if self._foreign_attention is None:  # once per model: it does not change
                self._foreign_attention = foreign_attention(self.layers)
            unpad = not self._foreign_attention
        if not unpad or attention_mask is None or torch.compiler.is_compiling():
            return None
        if bool(attention_mask.all()):
            return None
        return Unpadded.from_mask(attention_mask.bool())

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
    unpad: bool = False,
    relative_positions: nn.Module | None = None,
) -> Encoder:
    """A transformer encoder from embeddings, a layer stack and an optional final norm;
    ``attention_bias`` adds scores shared by every layer (T5's relative positions);
    ``unpad`` runs a padded batch's layers on its real tokens alone (attention must be
    ``SelfAttention``, which puts them back in place for the attention itself);
    ``relative_positions`` is a table the layers' attention reads (DeBERTa's)."""
    if unpad:
        others = foreign_attention(layers)
        if others:
            raise ConfigError(
                [
                    ConfigProblem(
                        "unpad",
                        "needs every layer's attention to be registry_xf.SelfAttention "
                        f"(which handles unpadded tokens); found {', '.join(others)}",
                        True,
                        True,
                    )
                ]
            )
    check_token_merging(layers, relative_positions)
    return within_size_bound(
        Encoder(embeddings, layers, final_norm, attention_bias, unpad, relative_positions)
    )


def foreign_attention(layers: nn.Module) -> list[str]:
    """The class names of the layers' attention modules other than ``SelfAttention`` (which
    alone handles unpadded tokens)."""
    return sorted(
        {
            type(module.attention).__name__
            for module in layers.modules()
            if isinstance(getattr(module, "attention", None), nn.Module)
            and not isinstance(module.attention, SelfAttention)
        }
    )


def check_token_merging(layers: nn.Module, relative_positions: nn.Module | None) -> None:
    """Refuse Token Merging where merged tokens could not be attended to as they should:
    every layer's attention must add the shared bias (proportional attention) and read
    positions per token, as ``SelfAttention`` does, and relative positions must follow the
    merged tokens (``RelativeEmbeddings``)."""
    if getattr(layers, "token_merging", None) is None:
        return
    others = sorted(
        {
            type(module.attention).__name__
            for module in layers.modules()
            if isinstance(getattr(module, "attention", None), nn.Module)
            and not isinstance(module.attention, SelfAttention)
        }
    )
    if relative_positions is not None and not isinstance(relative_positions, RelativeEmbeddings):
        others.append(f"relative_positions {type(relative_positions).__name__}")
    if others:
        raise ConfigError(
            [
                ConfigProblem(
                    "layers.token_merging",
                    f"the stack {type(layers).__name__} cannot merge tokens here: it needs "
                    "registry_xf.SelfAttention (or a subclass) in every layer and, for "
                    "relative positions, registry_xf.RelativeEmbeddings; found "
                    + ", ".join(others),
                )
            ]
        )
