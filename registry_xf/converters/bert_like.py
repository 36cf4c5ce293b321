"""Weight names and settings shared by the BERT-shaped families (BERT, RoBERTa, ELECTRA, ...)."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import KeyRule, Setting, attention_rules, rule

BERT_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "hidden_size"),
    Setting("n_layers", "num_hidden_layers"),
    Setting("n_heads", "num_attention_heads"),
    Setting("intermediate_width", "intermediate_size"),
    Setting("activation", "hidden_act"),
    Setting("max_positions", "max_position_embeddings"),
    Setting("type_vocab_size", "type_vocab_size"),
    Setting("layer_norm_eps", "layer_norm_eps"),
    Setting("dropout", "hidden_dropout_prob"),
    Setting("attention_dropout", "attention_probs_dropout_prob"),
)

# Task heads and stale buffers found in BERT-shaped checkpoints; not part of the encoder.
BERT_HEADS = (
    r"pooler\.",
    r"cls\.",
    r"lm_head\.",
    r"classifier\.",
    r"qa_outputs\.",
    r"embeddings\.position_ids\Z",
    r"embeddings\.token_type_ids\Z",
)


def bert_embedding_rules() -> list[KeyRule]:
    return [
        rule("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
        rule("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
        rule("embeddings.positions.weight", "embeddings.position_embeddings.weight"),
        rule("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
    ]


def bert_layer_rules(ours: str, hf: str) -> list[KeyRule]:
    """Rules for one BERT layer: ours under ``ours`` (``layers.{i}``), HF's under ``hf``."""
    return [
        *attention_rules(
            f"{ours}.attention",
            f"{hf}.attention.self.query",
            f"{hf}.attention.self.key",
            f"{hf}.attention.self.value",
            f"{hf}.attention.output.dense",
        ),
        rule(f"{ours}.attention_norm.{{p}}", f"{hf}.attention.output.LayerNorm.{{p}}"),
        rule(f"{ours}.feed_forward.up_proj.{{p}}", f"{hf}.intermediate.dense.{{p}}"),
        rule(f"{ours}.feed_forward.down_proj.{{p}}", f"{hf}.output.dense.{{p}}"),
        rule(f"{ours}.feed_forward_norm.{{p}}", f"{hf}.output.LayerNorm.{{p}}"),
    ]


BERT_RULES = (*bert_embedding_rules(), *bert_layer_rules("layers.{i}", "encoder.layer.{i}"))


def require_absolute_positions(hf_config: dict[str, Any]) -> None:
    kind = hf_config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise UnsupportedModelError(
            f"config.json: position_embedding_type {kind!r} is not supported; supported: 'absolute'"
        )
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise UnsupportedModelError(
            "config.json: is_decoder/add_cross_attention are set; registry_xf reads this "
            "family as a bidirectional encoder only"
        )
