"""The settings of one generation call, checked before any work is done."""

from __future__ import annotations

import operator
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RegistryXFError, did_you_mean


class SettingsError(RegistryXFError, ValueError):
    """Generation settings that are unknown, misspelt or out of range."""


MAX_NEW_TOKENS = 2**20  # a bound on what one call may allocate
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 to 2**64 - 1
MIN_PENALTY, MAX_PENALTY = 1e-6, 1e6  # beyond, penalised scores leave float32's range


def _plain_number(value: Any) -> Any:
    """A numpy integer as a Python int; a bool refused (it is never meant as a number)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError("expected a number, found a bool")
    if not isinstance(value, int) and hasattr(value, "__index__") and hasattr(value, "dtype"):
        return operator.index(value)
    return value


class GenerationSettings(BaseModel):
    """How to generate: length, sampling, penalties and when to stop.

    ``temperature`` None or 0 decodes greedily (the most likely token each step); above 0
    it samples, and ``top_k``, ``top_p`` and ``min_p`` narrow what may be sampled.
    ``eos_token_ids`` None takes the model's (from its HF ``generation_config.json`` or
    ``config.json``, else the tokenizer's end-of-sequence token); ``[]`` never stops at an
    end-of-sequence token. ``no_repeat_ngram_size`` n > 0 never repeats an n-gram (prompt
    included; 0: off); ``min_new_tokens`` holds the end-of-sequence tokens back until that
    many new tokens are made; None takes the model's (from its HF generation config), as
    for ``eos_token_ids``. ``stop`` strings end a sequence once its new text contains one;
    the text returned is cut before it. ``seed`` makes sampling reproducible.

    Ranges: ``max_new_tokens`` 1 to 2**20; ``temperature`` finite and >= 0 (a tiny one
    samples among the tokens tied, or nearly, with the most likely); ``repetition_penalty``
    from 1e-6 to 1e6; ``seed`` 0 to 2**64 - 1 (torch's seed range, used as given);
    ``eos_token_ids`` >= 0 (the generator checks them against the vocabulary). Integers
    may be Python or numpy integers; a bool is refused wherever a number is expected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_PENALTY, le=MAX_PENALTY, allow_inf_nan=False
    )
    no_repeat_ngram_size: int | None = Field(default=None, ge=0, le=MAX_NEW_TOKENS)
    min_new_tokens: int | None = Field(default=None, ge=0, le=MAX_NEW_TOKENS)
    eos_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @field_validator(
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "min_new_tokens",
        "seed",
        mode="before",
    )
    @classmethod
    def _number(cls, value: Any) -> Any:
        return _plain_number(value)

    @field_validator("eos_token_ids", mode="before")
    @classmethod
    def _one_eos(cls, value: Any) -> Any:
        value = _plain_number(value)
        if isinstance(value, int):
            return [value]
        if isinstance(value, (list, tuple)):
            return [_plain_number(v) for v in value]
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("a stop string cannot be empty")
        return value

    @model_validator(mode="after")
    def _sampling_only(self) -> GenerationSettings:
        if not self.sampling:
            given = [n for n in ("top_k", "top_p", "min_p") if getattr(self, n) is not None]
            if given:
                raise ValueError(
                    f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only "
                    "when sampling: set temperature > 0 "
                    "(temperature None or 0 decodes greedily)"
                )
        return self

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled (temperature > 0) rather than chosen greedily."""
        return bool(self.temperature)

    def __init__(self, **values: Any):
        unknown = [k for k in values if k not in type(self).model_fields]
        if unknown:
            names = list(type(self).model_fields)
            raise SettingsError(
                " ".join(
                    f"unknown generation setting {k!r}." + did_you_mean(k, names) for k in unknown
                )
                + f" Settings: {', '.join(names)}."
            )
        try:
            super().__init__(**values)
        except ValidationError as e:
            problems = []
            for err in e.errors(include_url=False):
                where = ".".join(str(p) for p in err["loc"])
                msg = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"{where}: {msg} (found {err['input']!r})" if where else msg)
            raise SettingsError("bad generation settings: " + "; ".join(problems)) from None

    def updated(self, **overrides: Any) -> GenerationSettings:
        """These settings with ``overrides`` (checked like the constructor's arguments)."""
        if not overrides:
            return self
        return type(self)(**{**self.model_dump(exclude_unset=True), **overrides})
