"""DistilBERT."""

from ..registry import registry
from .base import HFConverter, Setting, attention_rules, rule
from .heads import DISTILBERT_HEAD_LAYOUT

_LAYER = "transformer.layer.{i}"


@registry.converters.register("registry_xf.HFDistilBert.v1")
def distilbert_converter() -> HFConverter:
    """HF ``distilbert`` checkpoints ↔ configs/distilbert.cfg."""
    return HFConverter(
        name="registry_xf.HFDistilBert.v1",
        family="distilbert",
        model_types=("distilbert",),
        hf_architecture="DistilBertModel",
        settings=(
            Setting("vocab_size", "vocab_size"),
            Setting("hidden_width", "dim"),
            Setting("n_layers", "n_layers"),
            Setting("n_heads", "n_heads"),
            Setting("intermediate_width", "hidden_dim"),
            Setting("activation", "activation"),
            Setting("max_positions", "max_position_embeddings"),
            Setting("dropout", "dropout"),
            Setting("attention_dropout", "attention_dropout"),
        ),
        rules=(
            rule("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
            rule("embeddings.positions.weight", "embeddings.position_embeddings.weight"),
            rule("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
            *attention_rules(
                "layers.{i}.attention",
                f"{_LAYER}.attention.q_lin",
                f"{_LAYER}.attention.k_lin",
                f"{_LAYER}.attention.v_lin",
                f"{_LAYER}.attention.out_lin",
            ),
            rule("layers.{i}.attention_norm.{p}", f"{_LAYER}.sa_layer_norm.{{p}}"),
            rule("layers.{i}.feed_forward.up_proj.{p}", f"{_LAYER}.ffn.lin1.{{p}}"),
            rule("layers.{i}.feed_forward.down_proj.{p}", f"{_LAYER}.ffn.lin2.{{p}}"),
            rule("layers.{i}.feed_forward_norm.{p}", f"{_LAYER}.output_layer_norm.{{p}}"),
        ),
        checkpoint_prefixes=("distilbert.",),
        heads=DISTILBERT_HEAD_LAYOUT,
        ignored=(
            r"vocab_transform\.",
            r"vocab_layer_norm\.",
            r"vocab_projector\.",
            r"pre_classifier\.",
            r"classifier\.",
            r"qa_outputs\.",
            r"embeddings\.position_ids\Z",
        ),
    )
