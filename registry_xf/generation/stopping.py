"""Stopping criteria: after each step, which sequences are done.

A criterion is called as ``criterion(state)`` with the :class:`GenerationState` after a
step's tokens were added, and returns a bool tensor (batch,): True where that sequence is
done. The generator combines them with "or" and stops a sequence at its first True (the
token that finished it is kept); sequences done earlier are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol

import torch
from pydantic import Field

from ..registry import registry


@dataclass
class GenerationState:
    """Where generation stands after a step.

    ``input_ids`` (batch, prompt_length + new) hold the left-padded prompts and the new
    tokens (sequences already done get padding); ``finished`` (batch,) marks sequences
    done before this step; ``decode`` turns ids into text (None without a tokenizer).
    """

    input_ids: torch.Tensor
    prompt_length: int
    finished: torch.Tensor
    decode: Callable[[Sequence[int]], str] | None = None
    _texts: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def new_ids(self) -> torch.Tensor:
        """The new tokens so far, (batch, n_new)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def n_new(self) -> int:
        return self.input_ids.shape[1] - self.prompt_length

    def new_text(self, row: int) -> str:
        """The decoded new tokens of sequence ``row`` (decoded once per step)."""
        if self.decode is None:
            raise ValueError("decoding text needs a tokenizer")
        if row not in self._texts:
            self._texts[row] = self.decode(self.new_ids[row].tolist())
        return self._texts[row]


class StoppingCriterion(Protocol):
    def __call__(self, state: GenerationState) -> torch.Tensor: ...


class MaxNewTokens:
    """Done after ``max_new_tokens`` new tokens."""

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def __call__(self, state: GenerationState) -> torch.Tensor:
        return torch.full_like(state.finished, state.n_new >= self.max_new_tokens)

    def __repr__(self) -> str:
        return f"MaxNewTokens({self.max_new_tokens})"


class EOSToken:
    """Done once a sequence's newest token is one of ``eos_token_ids``."""

    def __init__(self, eos_token_ids: Sequence[int]):
        self.eos_token_ids = list(eos_token_ids)
        # the ids as a tensor on the device last asked for: copying them there at every
        # step would make the host wait for the device each time
        self._on_device: torch.Tensor | None = None

    def __call__(self, state: GenerationState) -> torch.Tensor:
        if not self.eos_token_ids or state.n_new == 0:
            return torch.zeros_like(state.finished)
        device = state.input_ids.device
        if self._on_device is None or self._on_device.device != device:
            self._on_device = torch.tensor(self.eos_token_ids, device=device)
        return torch.isin(state.input_ids[:, -1], self._on_device)

    def __repr__(self) -> str:
        return f"EOSToken({self.eos_token_ids})"


class StopStrings:
    """Done once a sequence's decoded new text contains one of the ``stop`` strings."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]

    def __call__(self, state: GenerationState) -> torch.Tensor:
        done = torch.zeros_like(state.finished)
        if not self.stop:
            return done
        for row in range(done.shape[0]):
            if state.finished[row]:
                continue
            text = state.new_text(row)
            done[row] = any(s in text for s in self.stop)
        return done

    def cut(self, text: str) -> str:
        """``text`` up to (not including) its first stop string."""
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(found)] if found else text

    def __repr__(self) -> str:
        return f"StopStrings({self.stop})"


@registry.stopping_criteria.register("registry_xf.MaxNewTokens.v1")
def max_new_tokens(max_new_tokens: Annotated[int, Field(ge=1)]) -> MaxNewTokens:
    """Stop every sequence after ``max_new_tokens`` new tokens."""
    return MaxNewTokens(max_new_tokens)


@registry.stopping_criteria.register("registry_xf.EOSToken.v1")
def eos_token(eos_token_ids: list[int]) -> EOSToken:
    """Stop a sequence at any of ``eos_token_ids`` (kept as its last new token)."""
    return EOSToken(eos_token_ids)


@registry.stopping_criteria.register("registry_xf.StopStrings.v1")
def stop_strings(stop: list[str]) -> StopStrings:
    """Stop a sequence once its new text contains one of ``stop`` (needs a tokenizer)."""
    return StopStrings(stop)
