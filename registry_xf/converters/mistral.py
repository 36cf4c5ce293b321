"""Mistral: Llama's layout and settings, with a sliding attention window."""

from __future__ import annotations

from typing import Any

from ..registry import registry
from .base import HFConverter
from .decoder_like import DECODER_IGNORED, LLAMA_RULES, rope_from_hf, rope_to_hf
from .llama import LLAMA_SETTINGS

# MistralConfig's default for a config.json without the key (null means no window).
HF_DEFAULT_WINDOW = 4096


def _mistral_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    return {
        "n_kv_heads": hf.get("num_key_value_heads", 8) or n_heads,
        "head_width": hf.get("head_dim") or hf["hidden_size"] // n_heads,
        # HF masks key k for query q unless q - k < sliding_window: ours is the same rule,
        # so the value carries over unchanged.
        "sliding_window": hf.get("sliding_window", HF_DEFAULT_WINDOW),
        **rope_from_hf(hf),
    }


def _mistral_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_key_value_heads": hyper["n_kv_heads"],
        "head_dim": hyper["head_width"],
        "sliding_window": hyper["sliding_window"],
        **rope_to_hf(hyper),
    }


@registry.converters.register("registry_xf.HFMistral.v1")
def mistral_converter() -> HFConverter:
    """HF ``mistral`` checkpoints (sliding window or none) ↔ configs/mistral.cfg."""
    return HFConverter(
        name="registry_xf.HFMistral.v1",
        family="mistral",
        model_types=("mistral",),
        hf_architecture="MistralForCausalLM",
        settings=LLAMA_SETTINGS,
        rules=LLAMA_RULES,
        ignored=DECODER_IGNORED,
        extra_from_hf=_mistral_from_hf,
        extra_to_hf=_mistral_to_hf,
    )
