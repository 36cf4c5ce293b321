"""ModernBERT: pre-norm layers without biases, alternating local and global attention."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter, Setting, rule
from .heads import HeadLayout

MODERNBERT_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "hidden_size"),
    Setting("n_layers", "num_hidden_layers"),
    Setting("n_heads", "num_attention_heads"),
    Setting("intermediate_width", "intermediate_size"),
    Setting("activation", "hidden_activation"),
    Setting("max_positions", "max_position_embeddings"),
    Setting("norm_eps", "norm_eps"),
    Setting("norm_bias", "norm_bias"),
    Setting("attention_bias", "attention_bias"),
    Setting("mlp_bias", "mlp_bias"),
    Setting("embedding_dropout", "embedding_dropout"),
    Setting("attention_dropout", "attention_dropout"),
    Setting("mlp_dropout", "mlp_dropout"),
    Setting("pad_token_id", "pad_token_id"),
    Setting("classifier_pooling", "classifier_pooling"),
    Setting("classifier_activation", "classifier_activation"),
    Setting("classifier_bias", "classifier_bias"),
    Setting("classifier_dropout", "classifier_dropout"),
    Setting("decoder_bias", "decoder_bias"),
)

_LAYER, _HF_LAYER = "layers.{i}", "layers.{i}"

MODERNBERT_RULES = (
    rule("embeddings.word_embeddings.weight", "embeddings.tok_embeddings.weight"),
    rule("embeddings.norm.{p}", "embeddings.norm.{p}"),
    # Wqkv's rows are [q; k; v] and Wi's [gate; up] (the activated half first): ours too.
    rule(f"{_LAYER}.attention.qkv_proj.{{p}}", f"{_HF_LAYER}.attn.Wqkv.{{p}}"),
    rule(f"{_LAYER}.attention.o_proj.{{p}}", f"{_HF_LAYER}.attn.Wo.{{p}}"),
    rule(f"{_LAYER}.attention_norm.{{p}}", f"{_HF_LAYER}.attn_norm.{{p}}"),
    rule(f"{_LAYER}.feed_forward_norm.{{p}}", f"{_HF_LAYER}.mlp_norm.{{p}}"),
    rule(f"{_LAYER}.feed_forward.gate_up_proj.{{p}}", f"{_HF_LAYER}.mlp.Wi.{{p}}"),
    rule(f"{_LAYER}.feed_forward.down_proj.{{p}}", f"{_HF_LAYER}.mlp.Wo.{{p}}"),
    rule("final_norm.{p}", "final_norm.{p}"),
)

# The heads of HF's task models (after "model."), and buffers some checkpoints carry.
MODERNBERT_IGNORED = (r"head\.", r"classifier\.", r"decoder\.", r".*rotary_emb\..*inv_freq\Z")

_HEAD_NORM = {
    "@layers": "registry_xf.LayerNorm.v1",
    "width": "${hyper.hidden_width}",
    "eps": "${hyper.norm_eps}",
    "bias": "${hyper.norm_bias}",
}

# ModernBertPredictionHead (dense, activation, norm) before every task's classifier.
MODERNBERT_HEAD_LAYOUT = HeadLayout(
    base_prefix="model.",
    rules=(
        rule("head.dense.{p}", "head.dense.{p}"),
        rule("head.norm.{p}", "head.norm.{p}"),
        rule("head.out_proj.{p}", "classifier.{p}"),
        rule("head.classifier.{p}", "classifier.{p}"),
        rule("head.transform.{p}", "head.dense.{p}"),
        rule("head.transform_norm.{p}", "head.norm.{p}"),
        rule("head.decoder.{p}", "decoder.{p}"),
        rule("head.bias", "decoder.bias"),
    ),
    sequence={
        "activation": "${hyper.classifier_activation}",
        "dropout": "${hyper.classifier_dropout}",
        "pooling": "${hyper.classifier_pooling}",
        "dense_bias": "${hyper.classifier_bias}",
        "norm": _HEAD_NORM,
    },
    token={
        "activation": "${hyper.classifier_activation}",
        "dropout": "${hyper.classifier_dropout}",
        "dense_bias": "${hyper.classifier_bias}",
        "norm": _HEAD_NORM,
    },
    mlm={
        "activation": "${hyper.classifier_activation}",
        "layer_norm_eps": "${hyper.norm_eps}",
        "transform_bias": "${hyper.classifier_bias}",
        "norm_bias": "${hyper.norm_bias}",
        "decoder_bias": "${hyper.decoder_bias}",
    },
)

# HF's layer types and ours (the first layer is always its own kind: see the .cfg).
_KINDS = {"full_attention": "global", "sliding_attention": "local"}
_HF_KINDS = {ours: hf for hf, ours in _KINDS.items()}
_HF_DEFAULT_THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}
_HF_THETA_KEYS = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}


def layer_types_from_hf(hf: dict[str, Any]) -> list[str]:
    """HF's per-layer attention kinds: ``layer_types``, else every
    ``global_attn_every_n_layers``-th layer global (HF's rule, from the first)."""
    n_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("global_attn_every_n_layers", 3)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UnsupportedModelError(
                f"config.json: global_attn_every_n_layers must be a positive integer; "
                f"found {every!r}"
            )
        return ["sliding_attention" if i % every else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or set(types) - set(_KINDS):
        raise UnsupportedModelError(
            f"config.json: layer_types must list {n_layers} (num_hidden_layers) values, each "
            f"'full_attention' or 'sliding_attention'; found {types!r}"
        )
    if types[0] != "full_attention":
        raise UnsupportedModelError(
            "config.json: layer_types[0] is 'sliding_attention'; registry_xf reads ModernBERT "
            "checkpoints whose first layer attends globally (all published ones do)"
        )
    return list(types)


def shortest_cycle(kinds: list[str]) -> list[str]:
    """The shortest pattern that repeats to ``kinds`` (the whole list if none does)."""
    for n in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % n] for i in range(len(kinds))):
            return kinds[:n]
    return kinds


def _rope_thetas(hf: dict[str, Any]) -> dict[str, float]:
    params = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") is not None:
        raise UnsupportedModelError(
            "config.json: rope_scaling is not supported for modernbert (unscaled rotary "
            "positions only)"
        )
    if not isinstance(params, dict) or set(params) - set(_HF_DEFAULT_THETA):
        raise UnsupportedModelError(
            "config.json: rope_parameters must hold 'full_attention' and 'sliding_attention' "
            f"sections for modernbert; found {params!r}"
        )
    thetas = {}
    for kind, default in _HF_DEFAULT_THETA.items():
        section = params.get(kind) or {}
        if not isinstance(section, dict):
            raise UnsupportedModelError(
                f"config.json: rope_parameters.{kind} must be an object; found {section!r}"
            )
        rope_type = section.get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedModelError(
                f"config.json: rope_parameters.{kind}.rope_type {rope_type!r} is not "
                "supported for modernbert; supported: 'default'"
            )
        theta = section.get("rope_theta", hf.get(_HF_THETA_KEYS[kind], default))
        thetas[kind] = float(theta)
    return thetas


def _modernbert_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    types = layer_types_from_hf(hf)
    thetas = _rope_thetas(hf)
    local_attention = hf.get("local_attention", 128)
    return {
        "head_width": hf["hidden_size"] // hf["num_attention_heads"],
        "layer_pattern": [_KINDS[t] for t in shortest_cycle(types)],
        # HF lets a local layer's query see keys up to local_attention // 2 away on each
        # side (inclusive); ours sees keys less than local_window away.
        "local_window": local_attention // 2 + 1,
        "global_rope_theta": thetas["full_attention"],
        "local_rope_theta": thetas["sliding_attention"],
    }


def _modernbert_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    pattern = hyper["layer_pattern"]
    types = [_HF_KINDS[pattern[i % len(pattern)]] for i in range(hyper["n_layers"])]
    pad = hyper.get("pad_token_id")
    out: dict[str, Any] = {
        # HF gives its embedding table this padding row: one past the vocabulary would fail
        "pad_token_id": pad if pad is not None and pad < hyper["vocab_size"] else None,
        "layer_types": types,
        "local_attention": 2 * (hyper["local_window"] - 1),
        "global_rope_theta": hyper["global_rope_theta"],
        "local_rope_theta": hyper["local_rope_theta"],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": hyper["global_rope_theta"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": hyper["local_rope_theta"]},
        },
    }
    if pattern[0] == "global" and all(kind == "local" for kind in pattern[1:]):
        out["global_attn_every_n_layers"] = len(pattern)  # older transformers read this
    return out


@registry.converters.register("registry_xf.HFModernBert.v1")
def modernbert_converter() -> HFConverter:
    """HF ``modernbert`` checkpoints (bare, or with a classification or masked-LM head) ↔
    configs/modernbert.cfg."""
    return HFConverter(
        name="registry_xf.HFModernBert.v1",
        family="modernbert",
        model_types=("modernbert",),
        hf_architecture="ModernBertModel",
        settings=MODERNBERT_SETTINGS,
        rules=MODERNBERT_RULES,
        checkpoint_prefixes=("model.",),
        ignored=MODERNBERT_IGNORED,
        extra_from_hf=_modernbert_from_hf,
        extra_to_hf=_modernbert_to_hf,
        heads=MODERNBERT_HEAD_LAYOUT,
    )
