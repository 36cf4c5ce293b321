"""ALBERT: shared layer groups and factorised embeddings."""

from typing import Any

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter, Setting, rule
from .bert_like import BERT_HEADS, BERT_SETTINGS, bert_embedding_rules, require_absolute_positions
from .heads import ALBERT_HEAD_LAYOUT

_GROUP = "encoder.albert_layer_groups.{i}.albert_layers.0"


def _checks(hf: dict[str, Any]) -> None:
    require_absolute_positions(hf)
    if hf.get("inner_group_num", 1) != 1:
        raise UnsupportedModelError(
            f"config.json: inner_group_num {hf['inner_group_num']} is not supported; supported: 1"
        )


@registry.converters.register("registry_xf.HFAlbert.v1")
def albert_converter() -> HFConverter:
    """HF ``albert`` checkpoints ↔ configs/albert.cfg."""
    return HFConverter(
        name="registry_xf.HFAlbert.v1",
        family="albert",
        model_types=("albert",),
        hf_architecture="AlbertModel",
        settings=(
            *BERT_SETTINGS,
            Setting("embedding_width", "embedding_size"),
            Setting("n_groups", "num_hidden_groups"),
        ),
        rules=(
            *bert_embedding_rules(),
            rule("embeddings.projection.{p}", "encoder.embedding_hidden_mapping_in.{p}"),
            rule(
                "layers.{i}.attention.qkv_proj.{p}",
                f"{_GROUP}.attention.query.{{p}}",
                f"{_GROUP}.attention.key.{{p}}",
                f"{_GROUP}.attention.value.{{p}}",
            ),
            rule("layers.{i}.attention.q_proj.{p}", f"{_GROUP}.attention.query.{{p}}"),
            rule("layers.{i}.attention.k_proj.{p}", f"{_GROUP}.attention.key.{{p}}"),
            rule("layers.{i}.attention.v_proj.{p}", f"{_GROUP}.attention.value.{{p}}"),
            rule("layers.{i}.attention.o_proj.{p}", f"{_GROUP}.attention.dense.{{p}}"),
            rule("layers.{i}.attention_norm.{p}", f"{_GROUP}.attention.LayerNorm.{{p}}"),
            rule("layers.{i}.feed_forward.up_proj.{p}", f"{_GROUP}.ffn.{{p}}"),
            rule("layers.{i}.feed_forward.down_proj.{p}", f"{_GROUP}.ffn_output.{{p}}"),
            rule("layers.{i}.feed_forward_norm.{p}", f"{_GROUP}.full_layer_layer_norm.{{p}}"),
        ),
        checkpoint_prefixes=("albert.",),
        ignored=(*BERT_HEADS, r"predictions\.", r"sop_classifier\."),
        checks=_checks,
        layer_index_setting="n_groups",
        heads=ALBERT_HEAD_LAYOUT,
        extra_to_hf=lambda hyper: {"inner_group_num": 1},
    )
