"""The generic decoder and causal language model.

A decoder is the encoder's stack run causally, with a key/value cache for incremental
decoding and positions that follow the attention mask, so left-padded prompts in a batch
see the same positions as they would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, ConfigProblem, InputError
from ..layers.attention_mask import AttentionMask
from ..layers.cross_attention import EncoderMemory
from ..layers.kv_cache import KVCache
from ..layers.tracing import values_readable
from ..registry import registry
from ..types import PositionCount
from .base import Assembly, within_size_bound
from .inputs import check_attention_mask, check_ids_device, check_ids_like, check_input_ids
from .outputs import ModelOutput


@dataclass
class CausalLMOutput(ModelOutput):
    """Adds ``logits`` (batch, seq or 1, vocab) to the decoder's output."""

    logits: torch.Tensor | None = None


def positions_from_mask(key_mask: torch.Tensor, n_new: int | None) -> torch.Tensor:
    """Positions of the last ``n_new`` tokens (of all, with None): real tokens count from
    0, padding gets 0."""
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions if n_new is None else positions[:, -n_new:]


def _is_int(value: object) -> bool:
    return hasattr(value, "__index__") and not isinstance(value, bool)


class Decoder(Assembly):
    """A causal transformer: embeddings, a stack of layers, a final norm."""

    def __init__(
        self,
        embeddings: nn.Module,
        layers: nn.Module,
        final_norm: nn.Module | None = None,
        max_positions: int | None = None,
        attention_bias: nn.Module | None = None,
    ):
        super().__init__()
        self.embeddings = embeddings
        self.layers = layers
        self.final_norm = final_norm
        self.max_positions = max_positions
        self.attention_bias = attention_bias

    @property
    def width(self) -> int:
        return int(self.embeddings.output_width)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens (at
        most the model's positions: a longer cache could never be filled)."""
        if (
            self.max_positions is not None
            and _is_int(max_length)
            and max_length > self.max_positions
        ):
            raise InputError(
                f"a KV cache of max_length {max_length} is longer than the model's "
                f"{self.max_positions} positions"
            )
        attention = self.layers.applied()[0].attention
        return KVCache(
            len(self.layers.applied()),
            batch_size,
            attention.n_kv_heads,
            attention.head_width,
            max_length,
            device=self.device,
            dtype=self.dtype,
        )

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        cache: KVCache | None,
        n_layers: int | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> None:
        """Refuse inputs of the wrong kind or shape, and a cache that does not fit them,
        before torch sees them. Kinds and shapes only, and a few microseconds: a decoding
        step stays cheap, and the checks trace under torch.compile."""
        check_input_ids(input_ids, None)
        if cache_position is not None:
            self.check_fixed_step(input_ids, attention_mask, cache, cache_position)
            if positions is not None:
                check_ids_like("positions", positions, input_ids, batch_of_one=True)
            assert cache is not None
            n_layers = len(self.layers.applied()) if n_layers is None else n_layers
            cache.check_fits(input_ids.shape[0], 0, input_ids.shape[1], n_layers)
            return
        batch, n_new = input_ids.shape[0], input_ids.shape[1]
        if cache is not None and not isinstance(cache, KVCache):
            raise InputError(
                f"cache must be a KVCache (from model.new_cache); found {type(cache).__name__}"
            )
        if attention_mask is not None:
            n_keys = attention_mask.shape[-1] if getattr(attention_mask, "ndim", 0) else 0
            expected = (batch, n_keys if cache is not None else n_new)
            what = "(batch, cached + new)" if cache is not None else "(batch, seq) as input_ids"
            check_attention_mask(attention_mask, expected, what, input_ids.device)
            if attention_mask.shape[1] < n_new:
                raise InputError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens, fewer than the "
                    f"{n_new} of input_ids: it must cover the cached and the new tokens"
                )
        if positions is not None:
            check_ids_like("positions", positions, input_ids, batch_of_one=True)
        if cache is None:
            if not torch.compiler.is_compiling():
                check_ids_device(input_ids, self.embeddings.word_embeddings.weight.device)
            return
        n_past = attention_mask.shape[1] - n_new if attention_mask is not None else cache.length
        if n_layers is None:
            n_layers = len(self.layers.applied())
        cache.check_fits(batch, n_past, n_new, n_layers)
        # Python values (the cache's counter, devices) are settled while tracing: compiled,
        # they would pin every length
        if torch.compiler.is_compiling():
            return
        if n_past != cache.length:
            raise InputError(
                f"attention_mask covers {n_past + n_new} tokens (cached + new), so {n_past} "
                f"cached ones, but the cache holds {cache.length}: pass the mask of every "
                "token so far, or a fresh cache"
            )
        # A decoding step reads the model's device off the cache (a module's parameter is
        # slow to reach); the cache was checked against the model when it was filled.
        device = cache.device if n_past else self.embeddings.word_embeddings.weight.device
        check_ids_device(input_ids, device)
        if cache.device != device:
            raise InputError(
                f"the KV cache is on {cache.device} and the model on {device}: make the "
                "cache with the model's new_cache after moving the model"
            )

    def check_fixed_step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor,
    ) -> None:
        """What a step of fixed shape needs: a cache, a mask over all of it, and one
        position (a long tensor on the cache's device) per new token."""
        if cache is None:
            raise InputError("cache_position needs a cache to write into (model.new_cache)")
        if not isinstance(cache_position, torch.Tensor) or cache_position.dtype != torch.long:
            found = getattr(cache_position, "dtype", type(cache_position).__name__)
            raise InputError(f"cache_position must be a tensor of torch.long; found {found}")
        expected = (input_ids.shape[1],)
        if tuple(cache_position.shape) != expected or cache_position.device != cache.device:
            raise InputError(
                f"cache_position must have the shape {expected} (one position per new "
                f"token) on the cache's device {cache.device}; found "
                f"{tuple(cache_position.shape)} on {cache_position.device}"
            )
        if attention_mask is None:
            raise InputError(
                "cache_position needs an attention_mask over the whole cache: (batch, "
                f"{cache.max_length}), 1 for the tokens written so far and the new ones"
            )
        check_attention_mask(
            attention_mask,
            (input_ids.shape[0], cache.max_length),
            "(batch, the cache's max_length)",
            input_ids.device,
        )
        if cache_position.numel() and values_readable():
            low, high = (int(x) for x in torch.aminmax(cache_position))
            if low < 0 or high >= cache.max_length:
                raise InputError(
                    f"cache_position {low if low < 0 else high} is outside the cache's "
                    f"{cache.max_length} slots"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        output_hidden_states: bool = False,
        memory: EncoderMemory | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Decode ``input_ids`` (batch, new tokens).

        ``attention_mask`` (1 = real token) covers the cached tokens too: (batch, cached +
        new). ``positions`` default to counting the real tokens. ``memory`` is the
        encoder's output, for layers that cross-attend (an encoder-decoder's decoder).

        ``cache_position`` (new tokens,), on the cache's device, makes a step of fixed
        shape: the new keys and values are written at those slots of ``cache``, the mask
        covers the whole cache (0 for slots not written yet) and attention reads every
        slot, so each step is the same work on tensors of the same shapes, with no value
        needed on the host (what a CUDA graph records; the checks of values are left out
        while it records). The cache's own length counter is left alone: the caller
        knows where it writes.
        """
        layers = self.layers.applied()
        self.check_inputs(input_ids, attention_mask, positions, cache, len(layers), cache_position)
        n_new = input_ids.shape[1]
        # With a mask, the cached length is read from its shape: under torch.compile a
        # shape stays symbolic, where the cache's own counter would compile every length.
        if cache is None:
            n_past = 0
        elif attention_mask is not None:
            n_past = attention_mask.shape[1] - n_new
        else:
            n_past = cache.length
        # any nonzero mask value is one real token (a 2 must not count twice in positions)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        fixed = cache_position is not None
        if positions is None:
            if key_mask is None:
                positions = torch.arange(n_past, n_past + n_new, device=input_ids.device)[None]
                positions = positions.expand(input_ids.shape[0], -1)
            elif fixed:
                positions = positions_from_mask(key_mask, None).index_select(1, cache_position)
            else:
                positions = positions_from_mask(key_mask, n_new)
        if (
            self.max_positions is not None
            and n_new
            and values_readable()  # not while compiling or recording a graph
            and int(positions.max()) >= self.max_positions
        ):
            raise InputError(
                f"position {int(positions.max())} is beyond the model's {self.max_positions} "
                "positions: the prompt (plus new tokens) is too long for this model"
            )
        self.embeddings.check(input_ids, None, positions)
        mask = AttentionMask(key_mask, causal=True, query_positions=cache_position)
        if self.attention_bias is not None:  # fixed: placed by the queries' slots
            placed = (cache_position,) if fixed else ()
            mask.bias = self.attention_bias(n_new, n_past + n_new, *placed)
        extra = {"memory": memory} if memory is not None else {}
        h = self.embeddings(input_ids, None, positions)
        states = [h] if output_hidden_states else []
        for i, layer in enumerate(layers):
            start = cache_position if fixed else n_past
            layer_cache = cache.layer(i, start) if cache is not None else None
            h = layer(h, mask, positions, layer_cache, **extra)
            if output_hidden_states:
                states.append(h)
        if cache is not None and not fixed:
            cache.set_length(n_past + n_new)
        if self.final_norm is not None:
            h = self.final_norm(h)
            if output_hidden_states:
                states[-1] = h
        return ModelOutput(last_hidden_state=h, hidden_states=states)


class CausalLM(Assembly):
    """A decoder with an output projection to vocabulary logits."""

    def __init__(self, decoder: Decoder, tie_embeddings: bool = False, bias: bool = False):
        super().__init__()
        self.decoder = decoder
        vocab, width = decoder.embeddings.word_embeddings.weight.shape
        self.lm_head = nn.Linear(decoder.width, vocab, bias=bias)
        if tie_embeddings:
            if decoder.width != width:
                raise ValueError("tied embeddings need the embedding width to equal the width")
            self.lm_head.weight = decoder.embeddings.word_embeddings.weight
        self.tie_embeddings = tie_embeddings

    @property
    def width(self) -> int:
        return self.decoder.width

    @property
    def max_positions(self) -> int | None:
        return self.decoder.max_positions

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return self.decoder.new_cache(batch_size, max_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        output_hidden_states: bool = False,
        last_only: bool = False,
        cache_position: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits for every position, or only the last one (``last_only``, for generation).
        ``cache_position`` makes a step of fixed shape (see :meth:`Decoder.forward`)."""
        out = self.decoder(
            input_ids,
            attention_mask,
            positions,
            cache,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        h = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        return CausalLMOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            logits=self.lm_head(h),
        )


@registry.architectures.register("registry_xf.Decoder.v1")
def decoder(
    embeddings: nn.Module,
    layers: nn.Module,
    final_norm: nn.Module | None = None,
    max_positions: PositionCount | None = None,
    attention_bias: nn.Module | None = None,
) -> Decoder:
    """A causal decoder; ``max_positions`` bounds the positions it accepts;
    ``attention_bias`` adds scores shared by every layer (T5's relative positions); it is
    called with the numbers of queries and keys, and in a step of fixed shape with the
    queries' slots as well."""
    refuse_token_merging(layers)
    return within_size_bound(Decoder(embeddings, layers, final_norm, max_positions, attention_bias))


def refuse_token_merging(layers: nn.Module) -> None:
    """Token Merging averages tokens of different positions into one, which a causal
    decoder cannot allow: each position may only see those before it."""
    if getattr(layers, "token_merging", None) is not None:
        raise ConfigError(
            [
                ConfigProblem(
                    "layers.token_merging",
                    "Token Merging is for encoders only: merging tokens breaks a decoder's "
                    "causal order (a merged token mixes earlier and later positions); remove it",
                )
            ]
        )


@registry.architectures.register("registry_xf.CausalLM.v1")
def causal_lm(decoder: Decoder, tie_embeddings: bool = False, bias: bool = False) -> CausalLM:
    """A decoder with a language-model head (tied to the token embeddings, or its own)."""
    return within_size_bound(CausalLM(decoder, tie_embeddings, bias))
