"""Phi-3: fused qkv_proj and gate_up_proj, stored in registry_xf's own fused layouts."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..layers.rope_scaling import SUPPORTED
from ..registry import registry
from .base import HFConverter, rule
from .decoder_like import DECODER_IGNORED, rope_from_hf, rope_to_hf
from .llama import LLAMA_SETTINGS

_LAYER = "decoder.layers.{i}"
_HF_LAYER = "model.layers.{i}"

PHI3_RULES = (
    rule("decoder.embeddings.word_embeddings.weight", "model.embed_tokens.weight"),
    # HF's rows are [q; k; v] and [gate; up], as ours: no reordering.
    rule(f"{_LAYER}.attention.qkv_proj.{{p}}", f"{_HF_LAYER}.self_attn.qkv_proj.{{p}}"),
    rule(f"{_LAYER}.attention.o_proj.{{p}}", f"{_HF_LAYER}.self_attn.o_proj.{{p}}"),
    rule(f"{_LAYER}.attention_norm.{{p}}", f"{_HF_LAYER}.input_layernorm.{{p}}"),
    rule(f"{_LAYER}.feed_forward_norm.{{p}}", f"{_HF_LAYER}.post_attention_layernorm.{{p}}"),
    rule(f"{_LAYER}.feed_forward.gate_up_proj.{{p}}", f"{_HF_LAYER}.mlp.gate_up_proj.{{p}}"),
    rule(f"{_LAYER}.feed_forward.down_proj.{{p}}", f"{_HF_LAYER}.mlp.down_proj.{{p}}"),
    rule("decoder.final_norm.{p}", "model.norm.{p}"),
    rule("lm_head.{p}", "lm_head.{p}"),
)


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


def _check_phi3(hf: dict[str, Any]) -> None:
    params = _rope_params(hf)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind != "default":
        raise UnsupportedModelError(
            f"config.json: Phi-3 rope scaling {kind!r} is not supported (HF reads 'su' and "
            "'yarn' in a Phi-3 config.json as 'longrope', which registry_xf does not "
            "implement). Supported rope types for phi3: default (no scaling); "
            f"registry_xf's rope scaling types ({', '.join(SUPPORTED)}) are those of "
            "Llama-style checkpoints"
        )


def _phi3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    fraction = _rope_params(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    return {
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_width": hf.get("head_dim") or hf["hidden_size"] // n_heads,
        # same rule as HF's: key k is seen from query q when q - k < sliding_window
        "sliding_window": hf.get("sliding_window"),
        "rotary_fraction": float(fraction if fraction is not None else 1.0),
        "rope_theta": rope_from_hf(hf)["rope_theta"],
    }


def _phi3_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    rope = rope_to_hf(hyper)
    rope["rope_parameters"]["partial_rotary_factor"] = hyper["rotary_fraction"]
    return {
        "num_key_value_heads": hyper["n_kv_heads"],
        "head_dim": hyper["head_width"],
        "sliding_window": hyper["sliding_window"],
        # Phi3Config's default pad_token_id (32000) is out of range for smaller
        # vocabularies; the ids live in the tokenizer's files
        "pad_token_id": None,
        **rope,
    }


@registry.converters.register("registry_xf.HFPhi3.v1")
def phi3_converter() -> HFConverter:
    """HF ``phi3`` checkpoints (Phi-3, unscaled rope; not "longrope") ↔ configs/phi3.cfg."""
    return HFConverter(
        name="registry_xf.HFPhi3.v1",
        family="phi3",
        model_types=("phi3",),
        hf_architecture="Phi3ForCausalLM",
        settings=LLAMA_SETTINGS,
        rules=PHI3_RULES,
        ignored=DECODER_IGNORED,
        extra_from_hf=_phi3_from_hf,
        extra_to_hf=_phi3_to_hf,
        checks=_check_phi3,
    )
