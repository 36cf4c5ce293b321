"""Pieces shared by the decoder families: rope settings and Llama-shaped weight names."""

from __future__ import annotations

from typing import Any

from .base import KeyRule, attention_rules, rule

# HF rope parameter names → ours (the rest keep their names).
_ROPE_NAMES = {"rope_type": "type", "original_max_position_embeddings": "original_max_positions"}
_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
)


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` from either HF layout.

    Newer config.json files hold a ``rope_parameters`` dict (with ``rope_theta``); older
    ones ``rope_theta`` and ``rope_scaling`` side by side.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": None}
    scaling: dict[str, Any] = {"type": kind}
    for key, value in params.items():
        if key in _ROPE_NAMES and key != "rope_type":
            scaling[_ROPE_NAMES[key]] = value
        elif key in _ROPE_KEYS and value is not None:
            scaling[key] = value
        elif key not in ("rope_type", "type", "partial_rotary_factor"):
            scaling[key] = value  # unknown keys are kept, so rotary can refuse them loudly
    if kind == "dynamic":
        # Dynamic NTK scaling exists to run past max_position_embeddings: HF's value is
        # where scaling starts, not a limit, so the decoder gets none.
        scaling["original_max_positions"] = hf.get("max_position_embeddings")
        return {"rope_theta": float(theta), "rope_scaling": scaling, "max_positions": None}
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def rope_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    """The HF ``rope_parameters`` for our ``rope_theta`` and ``rope_scaling``."""
    params: dict[str, Any] = {"rope_theta": hyper["rope_theta"], "rope_type": "default"}
    scaling = hyper.get("rope_scaling")
    extra: dict[str, Any] = {}
    if scaling and scaling["type"] == "dynamic":
        extra["max_position_embeddings"] = scaling["original_max_positions"]
    if scaling:
        inverse = {v: k for k, v in _ROPE_NAMES.items()}
        for key, value in scaling.items():
            if not (scaling["type"] == "dynamic" and key == "original_max_positions"):
                params[inverse.get(key, key)] = value
    return {"rope_parameters": params, **extra}


def llama_layer_rules(ours: str, hf: str) -> list[KeyRule]:
    """Weight names of a Llama-shaped layer (pre-norm, q/k/v/o, gate/up/down)."""
    return [
        *attention_rules(
            f"{ours}.attention",
            f"{hf}.self_attn.q_proj",
            f"{hf}.self_attn.k_proj",
            f"{hf}.self_attn.v_proj",
            f"{hf}.self_attn.o_proj",
        ),
        rule(f"{ours}.attention_norm.{{p}}", f"{hf}.input_layernorm.{{p}}"),
        rule(f"{ours}.feed_forward_norm.{{p}}", f"{hf}.post_attention_layernorm.{{p}}"),
        rule(
            f"{ours}.feed_forward.gate_up_proj.{{p}}",
            f"{hf}.mlp.gate_proj.{{p}}",
            f"{hf}.mlp.up_proj.{{p}}",
        ),
        rule(f"{ours}.feed_forward.gate_proj.{{p}}", f"{hf}.mlp.gate_proj.{{p}}"),
        rule(f"{ours}.feed_forward.up_proj.{{p}}", f"{hf}.mlp.up_proj.{{p}}"),
        rule(f"{ours}.feed_forward.down_proj.{{p}}", f"{hf}.mlp.down_proj.{{p}}"),
    ]


LLAMA_RULES = (
    rule("decoder.embeddings.word_embeddings.weight", "model.embed_tokens.weight"),
    *llama_layer_rules("decoder.layers.{i}", "model.layers.{i}"),
    rule("decoder.final_norm.{p}", "model.norm.{p}"),
    rule("lm_head.{p}", "lm_head.{p}"),
)

# Buffers some checkpoints carry; never weights.
DECODER_IGNORED = (r".*\.rotary_emb\.inv_freq\Z", r"lm_head\.weight\Z")
