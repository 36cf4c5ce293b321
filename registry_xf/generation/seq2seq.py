"""The decoding loop of an encoder-decoder (T5): the source is encoded once, then the
decoder runs one token per step from its start token.

The decoder's self-attention keeps its keys and values in the static ``KVCache``; the
cross-attention's keys and values of the encoded source are computed at the first step
and kept in the ``EncoderMemory`` for every later one. Logits processors and stopping
criteria see the decoder's ids (start token, then the new tokens), as HF's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from .cuda_graph import DecodingGraph, launch_then_read
from .processors import LogitsProcessor, next_tokens
from .settings import GenerationSettings
from .stopping import GenerationState, StoppingCriterion

# (tokens, active, finished) of one step; the Generator wraps it in a GenerationStep
Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` encodes a source and decodes from memory (a Seq2SeqLM)."""
    return callable(getattr(model, "encode", None)) and hasattr(model, "encoder")


def decoder_ids(model: Any, fallback_pad: int) -> tuple[int, int]:
    """(decoder start id, padding id) from the model's ``[generation]`` config (what the
    checkpoint's config files say); the padding id defaults to ``fallback_pad`` and the
    start id to the padding id, as in T5."""
    config = getattr(model, "config", None)
    generation = config.get("generation") if isinstance(config, Mapping) else None
    generation = generation if isinstance(generation, Mapping) else {}
    pad = generation.get("pad_token_id", fallback_pad)
    return int(generation.get("decoder_start_token_id", pad)), int(pad)


def start_decoding(
    model: Any,
    source: torch.Tensor,
    source_mask: torch.Tensor,
    start_ids: torch.Tensor,
    cache: Any,
) -> tuple[torch.Tensor, Any]:
    """Encode the sources and run the decoder's start tokens: (the logits of the first new
    token, the encoder's memory with every cross-attention layer's keys and values).

    One function, so that under ``torch.compile`` it is one graph: the prompt's."""
    memory, _ = model.encode(source, source_mask)
    out = model(decoder_input_ids=start_ids, memory=memory, cache=cache, last_only=True)
    return out.logits[:, -1], memory


def decoding_step(
    model: Any,
    token: torch.Tensor,
    mask: torch.Tensor | None,
    memory: Any,
    cache: Any,
    cache_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits after one new token per sequence. ``mask`` (batch, tokens so far), when
    given, gives the cached length by its shape, which stays symbolic under
    ``torch.compile`` (one graph for every step); eagerly the cache's count does. With
    ``cache_position`` the step has a fixed shape (``mask`` covers the whole cache)."""
    out = model(
        decoder_input_ids=token[:, None],
        decoder_attention_mask=mask,
        memory=memory,
        cache=cache,
        last_only=True,
        cache_position=cache_position,
    )
    return out.logits[:, -1]


def seq2seq_steps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    s: GenerationSettings,
    *,
    processors: Sequence[LogitsProcessor],
    criteria: Sequence[StoppingCriterion],
    pad_id: int,
    decode: Callable[[Sequence[int]], str] | None,
    start: Callable[..., tuple[torch.Tensor, Any]] = start_decoding,
    step: Callable[..., torch.Tensor] = decoding_step,
    steady: Callable[[bool], AbstractContextManager] | None = None,
    step_mask: bool = False,
    graphs: bool = False,
) -> Iterator[Step]:
    """Encode the right-padded sources once, then decode one token per step.

    ``start`` and ``step`` are :func:`start_decoding` and :func:`decoding_step`, or their
    compiled forms (which need ``step_mask``: the mask of every token so far, given to
    each step); ``steady(after_first_step)`` is the context each step runs in. A
    sequence that is done keeps being fed padding (its results are dropped) until every
    sequence is done, as in the causal loop.

    ``graphs``: the steps after the start have a fixed shape, recorded in a CUDA graph
    on a CUDA device (a graph per call: it reads this call's encoder memory), and each
    is launched before the previous one's tokens are read back.
    """
    start_id, pad = decoder_ids(model, pad_id)
    device = model.device
    batch, width = len(prompts), max(len(p) for p in prompts)
    source = torch.full((batch, width), pad, dtype=torch.long)
    source_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        source[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        source_mask[row, : len(prompt)] = 1
    source, source_mask = source.to(device), source_mask.to(device)
    total = 1 + s.max_new_tokens
    ids = torch.full((batch, total), pad, dtype=torch.long, device=device)
    ids[:, 0] = start_id
    mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    mask[:, 0] = 1
    rng = None
    if s.sampling and s.seed is not None:
        rng = torch.Generator(device=device).manual_seed(s.seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = model.new_cache(batch, total)
    with torch.inference_mode():
        logits, memory = start(model, source, source_mask, ids[:, :1], cache)
    graph = None
    if graphs:

        def fixed_step(
            tokens: torch.Tensor, whole: torch.Tensor, cache: Any, position: torch.Tensor
        ) -> torch.Tensor:
            return step(model, tokens[:, 0], whole, memory, cache, position)

        graph = DecodingGraph(fixed_step, cache, mask, record=device.type == "cuda")
    for n in range(s.max_new_tokens):
        length = 1 + n
        active = ~finished
        token = next_tokens(
            logits, ids[:, :length], mask[:, :length], processors, s.sampling, rng, finished, pad
        )
        ids[:, length] = token
        mask[:, length] = 1
        state = GenerationState(ids[:, : length + 1], 1, finished, decode)
        done = torch.zeros_like(finished)
        for criterion in criteria:
            done |= criterion(state).to(device=device, dtype=torch.bool)
        finished = finished | done
        if graph is not None:
            launch = n + 1 < s.max_new_tokens
            logits, read = launch_then_read(graph, token, active, finished, length, launch)
            yield read
            if bool(read[2].all()):
                return
            continue
        yield token, active, finished
        if bool(finished.all()):
            return
        context = steady(n > 0) if steady is not None else nullcontext()
        with torch.inference_mode(), context:
            step_masked = mask[:, : length + 1] if step_mask else None
            logits = step(model, token, step_masked, memory, cache)
