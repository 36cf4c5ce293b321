"""Gemma (1): Llama's weight names; (1 + w) norms, scaled embeddings, GeGLU, tied head."""

from __future__ import annotations

import math
from typing import Any

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter, Setting
from .decoder_like import DECODER_IGNORED, LLAMA_RULES, rope_from_hf, rope_to_hf

# The activation is handled apart: Gemma's config.json says "gelu" for the tanh one.
GEMMA_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "hidden_size"),
    Setting("n_layers", "num_hidden_layers"),
    Setting("n_heads", "num_attention_heads"),
    Setting("intermediate_width", "intermediate_size"),
    Setting("max_positions", "max_position_embeddings"),
    Setting("norm_eps", "rms_norm_eps"),
    Setting("tie_embeddings", "tie_word_embeddings"),
)


def _check_gemma(hf: dict[str, Any]) -> None:
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "config.json: use_bidirectional_attention is not supported (Gemma is read as a "
            "causal decoder)"
        )


def _activation(hf: dict[str, Any]) -> str:
    # As GemmaConfig in transformers 5: hidden_act, where "gelu" (the released configs'
    # value) means the tanh approximation. Old configs' hidden_activation names the same.
    name = hf.get("hidden_act") or hf.get("hidden_activation") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if name == "gelu" else name


def _gemma_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    return {
        "n_kv_heads": hf.get("num_key_value_heads", 16) or n_heads,  # GemmaConfig's default
        # 256 in every Gemma, whatever hidden_size / num_attention_heads is
        "head_width": hf.get("head_dim", 256) or hf["hidden_size"] // n_heads,
        "activation": _activation(hf),
        "attention_bias": bool(hf.get("attention_bias", False)),
        # HF multiplies by hidden_size ** 0.5 (in float32, then the model's dtype), as ours
        "embedding_scale": hf["hidden_size"] ** 0.5,
        **rope_from_hf(hf),
    }


def _gemma_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    expected = hyper["hidden_width"] ** 0.5
    if not math.isclose(hyper["embedding_scale"], expected, rel_tol=1e-9):
        raise UnsupportedModelError(
            f"Gemma's embedding scale is sqrt(hidden_width) = {expected} in HF's model; "
            f"this model has {hyper['embedding_scale']}, which config.json cannot express"
        )
    return {
        "num_key_value_heads": hyper["n_kv_heads"],
        "head_dim": hyper["head_width"],
        "hidden_act": hyper["activation"],
        "attention_bias": hyper["attention_bias"],
        **rope_to_hf(hyper),
    }


@registry.converters.register("registry_xf.HFGemma.v1")
def gemma_converter() -> HFConverter:
    """HF ``gemma`` checkpoints (Gemma 1) ↔ configs/gemma.cfg."""
    return HFConverter(
        name="registry_xf.HFGemma.v1",
        family="gemma",
        model_types=("gemma",),
        hf_architecture="GemmaForCausalLM",
        settings=GEMMA_SETTINGS,
        rules=LLAMA_RULES,
        ignored=DECODER_IGNORED,
        extra_from_hf=_gemma_from_hf,
        extra_to_hf=_gemma_to_hf,
        checks=_check_gemma,
    )
