"""Llama 1/2/3, Mistral and Qwen2: one layout, settings apart."""

from __future__ import annotations

from typing import Any

from ..registry import registry
from .base import HFConverter, Setting
from .decoder_like import DECODER_IGNORED, LLAMA_RULES, rope_from_hf, rope_to_hf

LLAMA_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "hidden_size"),
    Setting("n_layers", "num_hidden_layers"),
    Setting("n_heads", "num_attention_heads"),
    Setting("intermediate_width", "intermediate_size"),
    Setting("activation", "hidden_act"),
    Setting("max_positions", "max_position_embeddings"),
    Setting("norm_eps", "rms_norm_eps"),
    Setting("tie_embeddings", "tie_word_embeddings"),
)


def _llama_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    return {
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_width": hf.get("head_dim") or hf["hidden_size"] // n_heads,
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        **rope_from_hf(hf),
    }


def _llama_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_key_value_heads": hyper["n_kv_heads"],
        "head_dim": hyper["head_width"],
        "attention_bias": hyper["attention_bias"],
        "mlp_bias": hyper["mlp_bias"],
        **rope_to_hf(hyper),
    }


@registry.converters.register("registry_xf.HFLlama.v1")
def llama_converter() -> HFConverter:
    """HF ``llama`` checkpoints (Llama 1, 2 and 3, with rope scaling) ↔ configs/llama.cfg."""
    return HFConverter(
        name="registry_xf.HFLlama.v1",
        family="llama",
        model_types=("llama",),
        hf_architecture="LlamaForCausalLM",
        settings=LLAMA_SETTINGS,
        rules=LLAMA_RULES,
        ignored=DECODER_IGNORED,
        extra_from_hf=_llama_from_hf,
        extra_to_hf=_llama_to_hf,
    )
