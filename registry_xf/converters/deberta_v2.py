"""DeBERTa-v2 and DeBERTa-v3 (HF ``deberta-v2``): disentangled attention over relative
positions, one table of relative embeddings for the whole stack."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter, Setting, attention_rules, rule
from .bert_like import BERT_SETTINGS
from .heads import DEBERTA_V2_HEAD_LAYOUT

_LAYER = "encoder.layer.{i}"
_TERMS = ("c2p", "p2c")


def relative_terms(hf: dict[str, Any]) -> list[str]:
    """``pos_att_type`` as a list: HF accepts "p2c|c2p" as well as ["p2c", "c2p"]."""
    kinds = hf.get("pos_att_type") or []
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.lower().split("|") if k.strip()]
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise UnsupportedModelError(f"config.json: pos_att_type {kinds!r} is not a list of names")
    unknown = [k for k in kinds if k not in _TERMS]
    if unknown:
        raise UnsupportedModelError(
            f"config.json: pos_att_type {unknown} is not supported; supported: c2p, p2c"
        )
    return [k for k in _TERMS[::-1] if k in kinds]  # HF's usual order: p2c, c2p


def _int(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 1_000_000:
        raise UnsupportedModelError(f"config.json: {key} must be an integer; found {value!r}")
    return value


def _checks(hf: dict[str, Any]) -> None:
    """Refuse what this family's components do not compute, naming the key."""
    if not hf.get("relative_attention", False):
        raise UnsupportedModelError(
            "config.json: relative_attention is false; registry_xf reads DeBERTa-v2 models "
            "with relative attention only (every published checkpoint has it)"
        )
    kernel = _int(hf, "conv_kernel_size", 0)
    if kernel < 0 or kernel > 63 or (kernel and kernel % 2 == 0):
        raise UnsupportedModelError(
            f"config.json: conv_kernel_size {kernel} is not supported; supported: 0 (no "
            "convolution) or an odd size up to 63"
        )
    groups = _int(hf, "conv_groups", 1)
    if kernel and (groups < 1 or hf["hidden_size"] % groups):
        raise UnsupportedModelError(
            f"config.json: conv_groups {groups} does not divide hidden_size {hf['hidden_size']}"
        )
    embedding = hf.get("embedding_size", hf.get("hidden_size"))
    if embedding != hf.get("hidden_size"):
        raise UnsupportedModelError(
            f"config.json: embedding_size {embedding} differs from hidden_size "
            f"{hf.get('hidden_size')}; supported: equal (no embedding projection)"
        )
    head_size = hf.get("attention_head_size")
    if head_size is not None and head_size * hf["num_attention_heads"] != hf["hidden_size"]:
        raise UnsupportedModelError(
            f"config.json: attention_head_size {head_size} times num_attention_heads "
            f"{hf['num_attention_heads']} differs from hidden_size {hf['hidden_size']}; "
            "supported: heads that split the hidden size"
        )
    norm = str(hf.get("norm_rel_ebd", "none")).lower()
    if {n.strip() for n in norm.split("|")} - {"none", "layer_norm"}:
        raise UnsupportedModelError(
            f"config.json: norm_rel_ebd {hf['norm_rel_ebd']!r} is not supported; "
            "supported: 'none', 'layer_norm'"
        )
    buckets = _int(hf, "position_buckets", -1)
    distance = _relative_distance(hf)
    if buckets > 0 and (buckets < 4 or distance <= buckets // 2 + 1):
        raise UnsupportedModelError(
            f"config.json: position_buckets {buckets} with max_relative_positions {distance}: "
            "expected at least 4 buckets and a distance beyond half of them plus one"
        )
    relative_terms(hf)
    legacy = hf.get("legacy", True)
    if not isinstance(legacy, bool):
        raise UnsupportedModelError(
            f"config.json: legacy must be true or false (the masked-LM head's layout); "
            f"found {legacy!r}"
        )


def _relative_distance(hf: dict[str, Any]) -> int:
    """``max_relative_positions``, where -1 (or any value below 1) means
    ``max_position_embeddings``, as HF reads it."""
    distance = _int(hf, "max_relative_positions", -1)
    return distance if distance >= 1 else int(hf.get("max_position_embeddings", 512))


def _absolute_positions(hf: dict[str, Any]) -> bool:
    """HF's ``position_biased_input`` (true by default, false in the published models)."""
    return bool(hf.get("position_biased_input", True))


def _family_for(hf: dict[str, Any]) -> str:
    """Absolute positions added to the embeddings take a config with a positions table."""
    return "deberta_v2_absolute" if _absolute_positions(hf) else "deberta_v2"


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    buckets = _int(hf, "position_buckets", -1)
    return {
        "position_buckets": buckets if buckets > 0 else None,
        "max_relative_positions": _relative_distance(hf),
        "relative_terms": relative_terms(hf),
        "share_att_key": bool(hf.get("share_att_key", False)),
        "norm_relative_embeddings": "layer_norm" in str(hf.get("norm_rel_ebd", "none")).lower(),
        "conv_kernel_size": _int(hf, "conv_kernel_size", 0),
        "conv_groups": _int(hf, "conv_groups", 1),
        "conv_activation": str(hf.get("conv_act") or "tanh"),
    }


def _to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    buckets = hyper.get("position_buckets")
    return {
        "relative_attention": True,
        "position_biased_input": bool(hyper.get("absolute_positions", False)),
        "position_buckets": buckets if buckets else -1,
        "max_relative_positions": hyper["max_relative_positions"],
        "pos_att_type": list(hyper["relative_terms"]),
        "share_att_key": bool(hyper["share_att_key"]),
        "norm_rel_ebd": "layer_norm" if hyper["norm_relative_embeddings"] else "none",
        "pooler_hidden_size": hyper["hidden_width"],
        "conv_kernel_size": hyper["conv_kernel_size"],
        "conv_groups": hyper["conv_groups"],
        "conv_act": hyper["conv_activation"],
    }


@registry.converters.register("registry_xf.HFDebertaV2.v1")
def deberta_v2_converter() -> HFConverter:
    """HF ``deberta-v2`` checkpoints (DeBERTa-v2, DeBERTa-v3) ↔ configs/deberta_v2.cfg."""
    return HFConverter(
        name="registry_xf.HFDebertaV2.v1",
        family="deberta_v2",
        model_types=("deberta-v2",),
        hf_architecture="DebertaV2Model",
        settings=(
            *(s for s in BERT_SETTINGS if s.hyper not in ("type_vocab_size", "layer_norm_eps")),
            Setting("type_vocab_size", "type_vocab_size", 0),
            Setting("layer_norm_eps", "layer_norm_eps", 1e-7),
            Setting("legacy_mlm_head", "legacy", True),
        ),
        rules=(
            rule("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
            rule(
                "embeddings.token_type_embeddings.weight",
                "embeddings.token_type_embeddings.weight",
            ),
            rule("embeddings.positions.weight", "embeddings.position_embeddings.weight"),
            rule("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
            rule("relative_positions.weight", "encoder.rel_embeddings.weight"),
            rule("relative_positions.norm.{p}", "encoder.LayerNorm.{p}"),
            rule("layers.convolution.conv.{p}", "encoder.conv.conv.{p}"),
            rule("layers.convolution.norm.{p}", "encoder.conv.LayerNorm.{p}"),
            *attention_rules(
                "layers.{i}.attention",
                f"{_LAYER}.attention.self.query_proj",
                f"{_LAYER}.attention.self.key_proj",
                f"{_LAYER}.attention.self.value_proj",
                f"{_LAYER}.attention.output.dense",
            ),
            rule(
                "layers.{i}.attention.pos_key_proj.{p}",
                f"{_LAYER}.attention.self.pos_key_proj.{{p}}",
            ),
            rule(
                "layers.{i}.attention.pos_query_proj.{p}",
                f"{_LAYER}.attention.self.pos_query_proj.{{p}}",
            ),
            rule("layers.{i}.attention_norm.{p}", f"{_LAYER}.attention.output.LayerNorm.{{p}}"),
            rule("layers.{i}.feed_forward.up_proj.{p}", f"{_LAYER}.intermediate.dense.{{p}}"),
            rule("layers.{i}.feed_forward.down_proj.{p}", f"{_LAYER}.output.dense.{{p}}"),
            rule("layers.{i}.feed_forward_norm.{p}", f"{_LAYER}.output.LayerNorm.{{p}}"),
        ),
        checkpoint_prefixes=("deberta.",),
        ignored=(
            r"pooler\.",
            r"classifier\.",
            r"cls\.",
            r"lm_predictions\.",
            r"mask_predictions\.",
            r"qa_outputs\.",
            r"embeddings\.position_ids\Z",
        ),
        checks=_checks,
        extra_from_hf=_from_hf,
        extra_to_hf=_to_hf,
        heads=DEBERTA_V2_HEAD_LAYOUT,
        family_for=_family_for,
    )
