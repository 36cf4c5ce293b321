"""BART (HF ``bart``): a post-norm encoder-decoder with learned positions.

HF's names sit under ``model.`` in ``BartForConditionalGeneration``; the logits bias is the
``final_logits_bias`` buffer. Both position tables have two rows before the first
position's (HF's offset 2), kept as they are.
"""

from __future__ import annotations

import math
from typing import Any

from ..registry import registry
from .base import HFConverter, KeyRule, Setting, attention_rules, rule

BART_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "d_model"),
    Setting("n_layers", "encoder_layers"),
    Setting("n_decoder_layers", "decoder_layers"),
    Setting("n_heads", "encoder_attention_heads"),
    Setting("n_decoder_heads", "decoder_attention_heads"),
    Setting("intermediate_width", "encoder_ffn_dim"),
    Setting("decoder_intermediate_width", "decoder_ffn_dim"),
    Setting("activation", "activation_function"),
    Setting("max_positions", "max_position_embeddings"),
)


def _bart_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    scaled = bool(hf.get("scale_embedding", False))
    return {
        "embedding_scale": math.sqrt(hf["d_model"]) if scaled else None,
        "tie_embeddings": hf.get("tie_word_embeddings", True) is not False,
    }


def _bart_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    return {
        "scale_embedding": hyper.get("embedding_scale") is not None,
        "tie_word_embeddings": hyper["tie_embeddings"],
        "is_encoder_decoder": True,
        "decoder_start_token_id": 2,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "forced_eos_token_id": None,
    }


def bart_layer_rules(ours: str, hf: str, decoder: bool) -> list[KeyRule]:
    """The layers of one stack (BART's and Marian's names)."""
    layer, block = f"{ours}.layers.{{i}}", f"{hf}.layers.{{i}}"
    rules = [
        *attention_rules(
            f"{layer}.attention",
            f"{block}.self_attn.q_proj",
            f"{block}.self_attn.k_proj",
            f"{block}.self_attn.v_proj",
            f"{block}.self_attn.out_proj",
        ),
        rule(f"{layer}.attention_norm.{{p}}", f"{block}.self_attn_layer_norm.{{p}}"),
        rule(f"{layer}.feed_forward.up_proj.{{p}}", f"{block}.fc1.{{p}}"),
        rule(f"{layer}.feed_forward.down_proj.{{p}}", f"{block}.fc2.{{p}}"),
        rule(f"{layer}.feed_forward_norm.{{p}}", f"{block}.final_layer_norm.{{p}}"),
    ]
    if decoder:
        rules += [
            *attention_rules(
                f"{layer}.cross_attention",
                f"{block}.encoder_attn.q_proj",
                f"{block}.encoder_attn.k_proj",
                f"{block}.encoder_attn.v_proj",
                f"{block}.encoder_attn.out_proj",
            ),
            rule(f"{layer}.cross_attention_norm.{{p}}", f"{block}.encoder_attn_layer_norm.{{p}}"),
        ]
    return rules


def _stack_rules(ours: str, hf: str, decoder: bool) -> list[KeyRule]:
    return [
        rule(f"{ours}.embeddings.positions.weight", f"{hf}.embed_positions.weight"),
        rule(f"{ours}.embeddings.norm.{{p}}", f"{hf}.layernorm_embedding.{{p}}"),
        *bart_layer_rules(ours, hf, decoder),
    ]


BART_RULES = (
    rule("encoder.embeddings.word_embeddings.weight", "model.shared.weight"),
    *_stack_rules("encoder", "model.encoder", decoder=False),
    *_stack_rules("decoder", "model.decoder", decoder=True),
    rule("logits_bias.weight", "final_logits_bias"),
    rule("lm_head.{p}", "lm_head.{p}"),
)

# Copies of the shared table, and the head of a tied model.
BART_IGNORED = (r"model\.(encoder|decoder)\.embed_tokens\.weight\Z", r"lm_head\.weight\Z")


@registry.converters.register("registry_xf.HFBart.v1")
def bart_converter() -> HFConverter:
    """HF ``bart`` checkpoints (``BartForConditionalGeneration``) ↔ configs/bart.cfg."""
    return HFConverter(
        name="registry_xf.HFBart.v1",
        family="bart",
        model_types=("bart",),
        hf_architecture="BartForConditionalGeneration",
        settings=BART_SETTINGS,
        rules=BART_RULES,
        ignored=BART_IGNORED,
        extra_from_hf=_bart_from_hf,
        extra_to_hf=_bart_to_hf,
    )
