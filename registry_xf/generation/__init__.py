"""Text generation: a Generator composed of registered logits processors and stopping
criteria, driven by validated settings."""

from .generator import GenerationStep, Generator, tokenizer_eos_ids
from .processors import (
    LogitsProcessor,
    MinP,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
)
from .settings import GenerationSettings, SettingsError
from .stopping import (
    EOSToken,
    GenerationState,
    MaxNewTokens,
    StoppingCriterion,
    StopStrings,
)

__all__ = [
    "EOSToken",
    "GenerationSettings",
    "GenerationState",
    "GenerationStep",
    "Generator",
    "LogitsProcessor",
    "MaxNewTokens",
    "MinP",
    "RepetitionPenalty",
    "SettingsError",
    "StopStrings",
    "StoppingCriterion",
    "Temperature",
    "TopK",
    "TopP",
    "tokenizer_eos_ids",
]
