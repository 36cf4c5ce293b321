"""Encoder-decoder models (T5): an Encoder and a cross-attending Decoder, and the LM.

The encoder reads the source once; its states and padding mask travel to the decoder's
layers as an ``EncoderMemory``, which also keeps each cross-attention layer's keys and
values, so that a generation computes them once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem, InputError
from ..layers.cross_attention import EncoderMemory
from ..layers.kv_cache import KVCache
from ..registry import registry
from .base import Assembly, within_size_bound
from .decoder import Decoder
from .encoder import Encoder
from .outputs import ModelOutput


@dataclass
class Seq2SeqOutput(ModelOutput):
    """The decoder's states (``last_hidden_state``, ``hidden_states``), the encoder's
    (``encoder_last_hidden_state``, ``encoder_hidden_states``) and, from a ``Seq2SeqLM``,
    ``logits`` (batch, target length or 1, vocab)."""

    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: list[torch.Tensor] | None = None
    logits: torch.Tensor | None = None


class EncoderDecoder(Assembly):
    """An encoder and a decoder whose layers cross-attend to the encoder's states.

    ``share_embeddings`` makes the decoder use the encoder's token embeddings (T5's
    ``shared``).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, share_embeddings: bool = False):
        super().__init__()
        if not any(
            getattr(layer, "cross_attention", None) is not None
            for layer in decoder.layers.applied()
        ):
            raise ValueError("the decoder's layers have no cross_attention")
        if encoder.width != decoder.width:
            raise ValueError(
                f"the encoder's width {encoder.width} differs from the decoder's {decoder.width}"
            )
        self.encoder = encoder
        self.decoder = decoder
        if share_embeddings:
            ours = encoder.embeddings.word_embeddings.weight
            theirs = decoder.embeddings.word_embeddings.weight
            if ours.shape != theirs.shape:
                raise ValueError(
                    f"shared embeddings need equal tables; the encoder's is "
                    f"{tuple(ours.shape)}, the decoder's {tuple(theirs.shape)}"
                )
            decoder.embeddings.word_embeddings.weight = ours
        self.share_embeddings = share_embeddings

    @property
    def width(self) -> int:
        return self.decoder.width

    @property
    def max_positions(self) -> int | None:
        return self.decoder.max_positions

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty self-attention cache of the decoder."""
        return self.decoder.new_cache(batch_size, max_length)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> tuple[EncoderMemory, ModelOutput]:
        """Run the encoder once: the memory the decoder reads, and the encoder's output."""
        out = self.encoder(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return EncoderMemory.of(out.last_hidden_state, attention_mask), out

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        *,
        memory: EncoderMemory | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Encode ``input_ids`` (or reuse ``memory``), then decode ``decoder_input_ids``.

        Masks have 1 for real tokens; ``decoder_attention_mask`` covers cached tokens too.
        ``cache_position`` makes the decoder's step one of fixed shape (see
        :meth:`~registry_xf.assemblies.decoder.Decoder.forward`).
        """
        if decoder_input_ids is None:
            raise InputError("decoder_input_ids are needed: (batch, target length)")
        encoded = None
        if memory is None:
            if input_ids is None:
                raise InputError("pass input_ids (the source) or the memory of encode()")
            memory, encoded = self.encode(
                input_ids, attention_mask, output_hidden_states=output_hidden_states
            )
        if memory.states.shape[0] != decoder_input_ids.shape[0]:
            raise InputError(
                f"decoder_input_ids has {decoder_input_ids.shape[0]} sequences, the source "
                f"{memory.states.shape[0]}"
            )
        out = self.decoder(
            decoder_input_ids,
            decoder_attention_mask,
            cache=cache,
            memory=memory,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        return Seq2SeqOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            encoder_last_hidden_state=memory.states,
            encoder_hidden_states=encoded.hidden_states if encoded is not None else None,
        )


class LogitsBias(nn.Module):
    """A bias added to every position's logits, (1, vocab): BART's and Marian's
    ``final_logits_bias``."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, vocab_size))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.weight


class Seq2SeqLM(EncoderDecoder):
    """An encoder-decoder with an output projection to vocabulary logits.

    ``tie_embeddings`` projects with the decoder's token embeddings; ``scale_output``
    multiplies the decoder's states by width^-0.5 first (T5 1.0 with its tied head).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        share_embeddings: bool = False,
        tie_embeddings: bool = False,
        bias: bool = False,
        scale_output: bool = False,
        logits_bias: bool = False,
    ):
        super().__init__(encoder, decoder, share_embeddings)
        vocab, width = decoder.embeddings.word_embeddings.weight.shape
        self.lm_head = nn.Linear(decoder.width, vocab, bias=bias)
        if tie_embeddings:
            if decoder.width != width:
                raise ValueError("tied embeddings need the embedding width to equal the width")
            self.lm_head.weight = decoder.embeddings.word_embeddings.weight
        self.tie_embeddings = tie_embeddings
        self.output_scale = decoder.width**-0.5 if scale_output else None
        self.logits_bias = LogitsBias(vocab) if logits_bias else None

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        if self.output_scale is not None:
            states = states * self.output_scale
        logits = self.lm_head(states)
        return self.logits_bias(logits) if self.logits_bias is not None else logits

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        *,
        memory: EncoderMemory | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        last_only: bool = False,
        cache_position: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        """As ``EncoderDecoder.forward``, with ``logits`` for every target position, or only
        the last one (``last_only``, for generation)."""
        out = super().forward(
            input_ids,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            memory=memory,
            cache=cache,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        h = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        out.logits = self.logits(h)
        return out


def _check_parts(encoder: Encoder, decoder: Decoder) -> None:
    """Refuse parts that cannot make an encoder-decoder, naming the config path."""
    problems = []
    if not any(getattr(x, "cross_attention", None) for x in decoder.layers.applied()):
        problems.append(
            ConfigProblem(
                "decoder.layers.layer.cross_attention",
                "missing: an encoder-decoder's decoder layers cross-attend to the encoder",
            )
        )
    if encoder.width != decoder.width:
        problems.append(
            ConfigProblem(
                "decoder.embeddings.width",
                f"differs from the encoder's width {encoder.width}",
                decoder.width,
                True,
            )
        )
    if problems:
        raise ConfigError(problems)


@registry.architectures.register("registry_xf.EncoderDecoder.v1")
def encoder_decoder(
    encoder: Encoder, decoder: Decoder, share_embeddings: bool = False
) -> EncoderDecoder:
    """An encoder and a cross-attending decoder; ``share_embeddings`` gives them one table."""
    _check_parts(encoder, decoder)
    return within_size_bound(EncoderDecoder(encoder, decoder, share_embeddings))


@registry.architectures.register("registry_xf.Seq2SeqLM.v1")
def seq2seq_lm(
    encoder: Encoder,
    decoder: Decoder,
    share_embeddings: bool = False,
    tie_embeddings: bool = False,
    bias: bool = False,
    scale_output: bool = False,
    logits_bias: bool = False,
) -> Seq2SeqLM:
    """An encoder-decoder with a language-model head (tied to the token embeddings, or its
    own); ``scale_output`` scales the decoder's states by width^-0.5 (T5's tied head);
    ``logits_bias`` adds a learned bias to the logits (BART's ``final_logits_bias``)."""
    _check_parts(encoder, decoder)
    return within_size_bound(
        Seq2SeqLM(
            encoder, decoder, share_embeddings, tie_embeddings, bias, scale_output, logits_bias
        )
    )
