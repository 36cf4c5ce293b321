"""Logits processors: each takes the next-token scores and returns changed scores.

A processor is called as ``processor(input_ids, scores, attention_mask)``: ``input_ids``
(batch, length) are every token so far (the left-padded prompt and the new tokens),
``attention_mask`` (batch, length) is 1 at real tokens, ``scores`` (batch, vocab) are the
float32 scores of the next token. Removed tokens get ``-inf``. The semantics are those of
HF transformers' processors of the same names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Protocol

import torch
from pydantic import Field

from ..registry import registry
from .settings import SettingsError

# Plain division is exact (as HF's) from here up: scores below 3e34 in size stay finite.
SAFE_TEMPERATURE = 1e-4


class LogitsProcessor(Protocol):
    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class Temperature:
    """Divide the scores by ``temperature`` (below 1 sharpens, above 1 flattens).

    Below ``SAFE_TEMPERATURE`` the quotient could leave float32's range (1e-45 rounds to
    0 in float32; a score of 40 over 1e-37 is inf) and softmax would give NaN. There each
    row's distance to its best score is divided instead: the same distribution, with the
    best token(s) at 0 and every other token at a large negative score or -inf.
    """

    def __init__(self, temperature: float):
        if not (math.isfinite(temperature) and temperature > 0):
            raise SettingsError(f"temperature must be finite and > 0 (found {temperature})")
        self.temperature = temperature

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.temperature >= SAFE_TEMPERATURE:
            return scores / self.temperature
        below_best = scores - scores.amax(dim=-1, keepdim=True)
        # 0 / 0 where the temperature rounds to 0 in float32: the best tokens stay at 0
        return torch.where(below_best == 0, below_best, below_best / self.temperature)

    def __repr__(self) -> str:
        return f"Temperature({self.temperature})"


class TopK:
    """Keep the ``k`` highest scores (and any tied with the k-th), remove the rest."""

    def __init__(self, k: int):
        if k < 1:
            raise SettingsError(f"top-k needs k >= 1 (found {k})")
        self.k = k

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class TopP:
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to ``p``.

    As HF's ``TopPLogitsWarper``: tokens are removed, least likely first, while the
    probability removed stays at most ``1 - p``; the most likely token always stays.
    """

    def __init__(self, p: float):
        if not 0 < p <= 1:
            raise SettingsError(f"top-p needs 0 < p <= 1 (found {p})")
        self.p = p

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ascending, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))

    def __repr__(self) -> str:
        return f"TopP({self.p})"


class MinP:
    """Remove tokens less likely than ``p`` times the most likely token's probability."""

    def __init__(self, p: float):
        if not 0 <= p <= 1:
            raise SettingsError(f"min-p needs 0 <= p <= 1 (found {p})")
        self.p = p

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < self.p * probs.amax(dim=-1, keepdim=True)
        # the most likely token always stays
        remove.scatter_(-1, scores.argmax(dim=-1, keepdim=True), False)
        return scores.masked_fill(remove, float("-inf"))

    def __repr__(self) -> str:
        return f"MinP({self.p})"


class RepetitionPenalty:
    """Penalise every token already present (prompt and new tokens, padding aside).

    As HF's ``RepetitionPenaltyLogitsProcessor`` (Keskar et al., 2019): the score of a
    present token is divided by ``penalty`` where positive and multiplied where negative,
    so ``penalty`` > 1 makes repeats less likely.
    """

    def __init__(self, penalty: float):
        if not (math.isfinite(penalty) and penalty > 0):
            raise SettingsError(f"repetition penalty must be finite and > 0 (found {penalty})")
        self.penalty = penalty

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weight = (
            attention_mask.to(scores.dtype)
            if attention_mask is not None
            else torch.ones(input_ids.shape, dtype=scores.dtype, device=scores.device)
        )
        counts = torch.zeros_like(scores).scatter_add_(-1, input_ids, weight)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(counts > 0, penalised, scores)

    def __repr__(self) -> str:
        return f"RepetitionPenalty({self.penalty})"


class NoRepeatNGram:
    """Never complete an n-gram of ``n`` tokens that the sequence already holds.

    As HF's ``NoRepeatNGramLogitsProcessor`` (fairseq's ``no_repeat_ngram_size``): the
    last ``n - 1`` tokens are matched against every earlier window of ``n - 1`` tokens, and
    the token that followed each match is removed. The prompt counts (an encoder-decoder's
    decoder ids start with the start token); windows that reach into padding do not.
    """

    def __init__(self, n: int):
        if n < 1:
            raise SettingsError(f"no_repeat_ngram_size must be >= 1 (found {n})")
        self.n = n

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, length = self.n, input_ids.shape[-1]
        if length < n:  # no complete n-gram yet
            return scores
        windows = input_ids.unfold(-1, n, 1)  # (batch, length - n + 1, n)
        prefix = input_ids[:, length - n + 1 :]  # the n - 1 tokens the next one follows
        match = (windows[..., :-1] == prefix[:, None, :]).all(-1)
        if attention_mask is not None:
            real = attention_mask.bool()
            match &= real.unfold(-1, n, 1).all(-1)
            match &= real[:, length - n + 1 :].all(-1, keepdim=True)
        # counted, not scattered as bools: a window that does not match must not undo a ban
        hits = torch.zeros_like(scores).scatter_add_(-1, windows[..., -1], match.to(scores.dtype))
        return scores.masked_fill(hits > 0, float("-inf"))

    def __repr__(self) -> str:
        return f"NoRepeatNGram({self.n})"


class MinNewTokens:
    """Remove the end-of-sequence tokens until ``min_new_tokens`` new tokens are made.

    ``prompt_length`` is the (padded) length of what precedes the new tokens in
    ``input_ids``: the prompt of a causal model, the decoder's start token of an
    encoder-decoder. As HF's ``MinNewTokensLengthLogitsProcessor``.
    """

    def __init__(self, min_new_tokens: int, eos_token_ids: Sequence[int], prompt_length: int):
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = list(eos_token_ids)
        self.prompt_length = prompt_length

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_length >= self.min_new_tokens:
            return scores
        scores = scores.clone()
        scores[:, self.eos_token_ids] = float("-inf")
        return scores

    def __repr__(self) -> str:
        return f"MinNewTokens({self.min_new_tokens}, eos={self.eos_token_ids})"


class SuppressTokens:
    """Never generate any of ``token_ids`` (HF's ``suppress_tokens``, and the
    single-token ``bad_words_ids`` that Marian's checkpoints give for their padding)."""

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = sorted(set(token_ids))

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.token_ids] = float("-inf")
        return scores

    def __repr__(self) -> str:
        return f"SuppressTokens({self.token_ids})"


class ForcedToken:
    """Make ``token_ids`` the only candidates (the first, when scores tie: HF's argmax)
    when ``input_ids`` holds ``at_length`` tokens.

    BART's ``forced_bos_token_id`` is the first new token of an encoder-decoder (its
    decoder ids are then the start token alone: ``at_length`` 1);
    ``forced_eos_token_id`` is the last one that ``max_new_tokens`` allows
    (``at_length`` = prompt length + max_new_tokens - 1). As HF's
    ``ForcedBOSTokenLogitsProcessor`` and ``ForcedEOSTokenLogitsProcessor``.
    """

    def __init__(self, token_ids: Sequence[int], at_length: int):
        self.token_ids = list(token_ids)
        self.at_length = at_length

    def __call__(
        self,
        input_ids: torch.Tensor,
        scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.shape[-1] != self.at_length:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids] = 0.0
        return forced

    def __repr__(self) -> str:
        return f"ForcedToken({self.token_ids}, at_length={self.at_length})"


def next_tokens(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    processors: Sequence[LogitsProcessor],
    sampling: bool,
    rng: torch.Generator | None,
    finished: torch.Tensor,
    pad: int,
) -> torch.Tensor:
    """One step's tokens: the processors applied to the last position's logits, then a
    sample or the most likely token; sequences already finished get ``pad``."""
    scores = logits.float()
    for processor in processors:
        scores = processor(ids, scores, mask)
    if sampling:
        token = torch.multinomial(scores.softmax(-1), 1, generator=rng).squeeze(-1)
    else:
        token = scores.argmax(-1)
    return torch.where(~finished, token, torch.full_like(token, pad))


@registry.logits_processors.register("registry_xf.Temperature.v1")
def temperature(temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)]) -> Temperature:
    """Divide the scores by ``temperature`` before sampling."""
    return Temperature(temperature)


@registry.logits_processors.register("registry_xf.TopK.v1")
def top_k(k: Annotated[int, Field(ge=1)]) -> TopK:
    """Keep only the ``k`` most likely tokens."""
    return TopK(k)


@registry.logits_processors.register("registry_xf.TopP.v1")
def top_p(p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]) -> TopP:
    """Keep the most likely tokens whose probabilities sum to ``p`` (nucleus sampling)."""
    return TopP(p)


@registry.logits_processors.register("registry_xf.MinP.v1")
def min_p(p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]) -> MinP:
    """Keep the tokens at least ``p`` times as likely as the most likely one."""
    return MinP(p)


@registry.logits_processors.register("registry_xf.RepetitionPenalty.v1")
def repetition_penalty(
    penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)],
) -> RepetitionPenalty:
    """Divide positive and multiply negative scores of tokens already present by ``penalty``."""
    return RepetitionPenalty(penalty)


@registry.logits_processors.register("registry_xf.NoRepeatNGram.v1")
def no_repeat_ngram(n: Annotated[int, Field(ge=1)]) -> NoRepeatNGram:
    """Remove every token that would repeat an n-gram of ``n`` tokens already present."""
    return NoRepeatNGram(n)


@registry.logits_processors.register("registry_xf.MinNewTokens.v1")
def min_new_tokens(
    min_new_tokens: Annotated[int, Field(ge=0)],
    eos_token_ids: list[Annotated[int, Field(ge=0)]],
    prompt_length: Annotated[int, Field(ge=0)],
) -> MinNewTokens:
    """Remove the end-of-sequence tokens until ``min_new_tokens`` new tokens are made."""
    return MinNewTokens(min_new_tokens, eos_token_ids, prompt_length)


@registry.logits_processors.register("registry_xf.SuppressTokens.v1")
def suppress_tokens(token_ids: list[Annotated[int, Field(ge=0)]]) -> SuppressTokens:
    """Never generate any of ``token_ids``."""
    return SuppressTokens(token_ids)


@registry.logits_processors.register("registry_xf.ForcedToken.v1")
def forced_token(
    token_ids: list[Annotated[int, Field(ge=0)]], at_length: Annotated[int, Field(ge=1)]
) -> ForcedToken:
    """Force one of ``token_ids`` as the next token when the ids so far are ``at_length``
    long (BART's forced first and last tokens)."""
    return ForcedToken(token_ids, at_length)
