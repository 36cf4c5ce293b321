"""Qwen2: Llama's layout with query/key/value biases (configs/qwen2.cfg sets them)."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter
from .decoder_like import DECODER_IGNORED, LLAMA_RULES, rope_from_hf, rope_to_hf
from .llama import LLAMA_SETTINGS


def _layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's attention, as Qwen2Config works it out (sliding from max_window_layers)."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    first_sliding = hf.get("max_window_layers", 28)
    return [
        "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
        for i in range(hf["num_hidden_layers"])
    ]


def _check_qwen2(hf: dict[str, Any]) -> None:
    kinds = set(_layer_types(hf))
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise UnsupportedModelError(
            f"config.json: Qwen2 layer types {sorted(kinds)} are not supported "
            "(supported: full_attention, sliding_attention)"
        )
    if len(kinds) > 1:
        raise UnsupportedModelError(
            "config.json: a sliding attention window on some layers only "
            f"(use_sliding_window with max_window_layers = {hf.get('max_window_layers')}) "
            "is not supported: every layer must use the window, or none"
        )
    if kinds == {"sliding_attention"} and hf.get("sliding_window") is None:
        raise UnsupportedModelError("config.json: sliding layers without a sliding_window")


def _qwen2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    sliding = _layer_types(hf)[:1] == ["sliding_attention"]
    return {
        "n_kv_heads": hf.get("num_key_value_heads", 32) or n_heads,  # Qwen2Config's default
        "head_width": hf.get("head_dim") or hf["hidden_size"] // n_heads,
        # same rule as HF's: key k is seen from query q when q - k < sliding_window
        "sliding_window": hf.get("sliding_window", 4096) if sliding else None,
        **rope_from_hf(hf),
    }


def _qwen2_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    window = hyper["sliding_window"]
    return {
        "num_key_value_heads": hyper["n_kv_heads"],
        "head_dim": hyper["head_width"],
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": 0 if window is not None else hyper["n_layers"],
        "layer_types": ["sliding_attention" if window is not None else "full_attention"]
        * hyper["n_layers"],
        **rope_to_hf(hyper),
    }


@registry.converters.register("registry_xf.HFQwen2.v1")
def qwen2_converter() -> HFConverter:
    """HF ``qwen2`` checkpoints (Qwen2, Qwen2.5) ↔ configs/qwen2.cfg."""
    return HFConverter(
        name="registry_xf.HFQwen2.v1",
        family="qwen2",
        model_types=("qwen2",),
        hf_architecture="Qwen2ForCausalLM",
        settings=LLAMA_SETTINGS,
        rules=LLAMA_RULES,
        ignored=DECODER_IGNORED,
        extra_from_hf=_qwen2_from_hf,
        extra_to_hf=_qwen2_to_hf,
        checks=_check_qwen2,
    )
