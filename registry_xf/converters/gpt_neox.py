"""GPT-NeoX and Pythia: parallel residual, partial rotary, per-head interleaved q/k/v."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..registry import registry
from .base import HFConverter, KeyRule, Setting, rule
from .decoder_like import rope_from_hf, rope_to_hf


def grouped_qkv_to_ours(tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Rows grouped per key/value head, ``[q heads of the group..., k, v]`` each, → ``[q; k; v]``.

    This one layout covers GPT-NeoX (one query head per group: ``(n_heads, 3, head_width)``)
    and every Falcon layout (multi-query is a single group). Works for weights and biases.
    """
    per_group = n_heads // n_kv_heads
    head_width = tensor.shape[0] // (n_heads + 2 * n_kv_heads)
    rest = tensor.shape[1:]
    groups = tensor.reshape(n_kv_heads, per_group + 2, head_width, *rest)
    q = groups[:, :per_group].reshape(n_heads * head_width, *rest)
    k = groups[:, per_group].reshape(n_kv_heads * head_width, *rest)
    v = groups[:, per_group + 1].reshape(n_kv_heads * head_width, *rest)
    return torch.cat((q, k, v))


def grouped_qkv_to_hf(tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The inverse of ``grouped_qkv_to_ours``."""
    per_group = n_heads // n_kv_heads
    head_width = tensor.shape[0] // (n_heads + 2 * n_kv_heads)
    rest = tensor.shape[1:]
    q, k, v = tensor.split((n_heads * head_width, n_kv_heads * head_width, n_kv_heads * head_width))
    groups = torch.cat(
        (
            q.reshape(n_kv_heads, per_group, head_width, *rest),
            k.reshape(n_kv_heads, 1, head_width, *rest),
            v.reshape(n_kv_heads, 1, head_width, *rest),
        ),
        dim=1,
    )
    return groups.reshape(tensor.shape)


def _qkv_to_ours(tensor: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
    return grouped_qkv_to_ours(tensor, hyper["n_heads"], hyper["n_heads"])


def _qkv_to_hf(tensor: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
    return grouped_qkv_to_hf(tensor, hyper["n_heads"], hyper["n_heads"])


def _layer_rules(ours: str, hf: str) -> list[KeyRule]:
    qkv = f"{hf}.attention.query_key_value"
    return [
        rule(
            f"{ours}.attention.qkv_proj.{{p}}",
            f"{qkv}.{{p}}",
            to_ours=_qkv_to_ours,
            to_hf=_qkv_to_hf,
        ),
        rule(f"{ours}.attention.o_proj.{{p}}", f"{hf}.attention.dense.{{p}}"),
        rule(f"{ours}.attention_norm.{{p}}", f"{hf}.input_layernorm.{{p}}"),
        rule(f"{ours}.feed_forward_norm.{{p}}", f"{hf}.post_attention_layernorm.{{p}}"),
        rule(f"{ours}.feed_forward.up_proj.{{p}}", f"{hf}.mlp.dense_h_to_4h.{{p}}"),
        rule(f"{ours}.feed_forward.down_proj.{{p}}", f"{hf}.mlp.dense_4h_to_h.{{p}}"),
    ]


# Names without the "gpt_neox." prefix of GPTNeoXForCausalLM (removed where present); the
# untied output projection is "embed_out" (transformers 5 calls the module lm_head, but
# saves and reads it as embed_out).
GPT_NEOX_RULES = (
    rule("decoder.embeddings.word_embeddings.weight", "embed_in.weight"),
    *_layer_rules("decoder.layers.{i}", "layers.{i}"),
    rule("decoder.final_norm.{p}", "final_layer_norm.{p}"),
    rule("lm_head.weight", "embed_out.weight"),
)

GPT_NEOX_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "hidden_size"),
    Setting("n_layers", "num_hidden_layers"),
    Setting("n_heads", "num_attention_heads"),
    Setting("intermediate_width", "intermediate_size"),
    Setting("activation", "hidden_act"),
    Setting("max_positions", "max_position_embeddings"),
    Setting("norm_eps", "layer_norm_eps"),
    Setting("tie_embeddings", "tie_word_embeddings", False),
)


def _gpt_neox_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    fraction = params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    if "rope_theta" not in params and "rope_theta" not in hf:
        hf = {**hf, "rope_theta": hf.get("rotary_emb_base", 10000.0)}
    return {
        "head_width": hf["hidden_size"] // hf["num_attention_heads"],
        "rotary_fraction": float(fraction),
        "residual": "parallel" if hf.get("use_parallel_residual", True) else "pre",
        "attention_bias": bool(hf.get("attention_bias", True)),
        **rope_from_hf(hf),
    }


def _gpt_neox_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    rope = rope_to_hf(hyper)
    rope["rope_parameters"]["partial_rotary_factor"] = hyper["rotary_fraction"]
    return {
        "use_parallel_residual": hyper["residual"] == "parallel",
        "attention_bias": hyper["attention_bias"],
        **rope,
    }


@registry.converters.register("registry_xf.HFGPTNeoX.v1")
def gpt_neox_converter() -> HFConverter:
    """HF ``gpt_neox`` checkpoints (GPT-NeoX-20B, Pythia) ↔ configs/gpt_neox.cfg."""
    return HFConverter(
        name="registry_xf.HFGPTNeoX.v1",
        family="gpt_neox",
        model_types=("gpt_neox",),
        hf_architecture="GPTNeoXForCausalLM",
        settings=GPT_NEOX_SETTINGS,
        rules=GPT_NEOX_RULES,
        checkpoint_prefixes=("gpt_neox.",),
        # the causal-mask buffers of old checkpoints; a tied model's copy of the embeddings
        ignored=(
            r".*\.attention\.(bias|masked_bias)\Z",
            r".*\.rotary_emb\.inv_freq\Z",
            r"embed_out\.weight\Z",
        ),
        extra_from_hf=_gpt_neox_from_hf,
        extra_to_hf=_gpt_neox_to_hf,
    )
