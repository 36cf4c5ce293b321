"""T5 1.0, T5 1.1 and Flan-T5 (HF ``t5``): encoder-decoder weights and settings.

HF's T5 keeps the relative position bias table in the first block of each stack only, and
numbers the sublayers of a block (``layer.0`` attention, ``layer.1`` cross-attention in the
decoder, then the feed-forward layer). ``feed_forward_proj`` says both the activation and
whether the layer is gated (``"gated-gelu"``). Whether the head is scaled is
``scale_decoder_outputs`` in files that transformers 5 writes (which always ties the head);
older files say both with ``tie_word_embeddings`` (false: untied and unscaled). An untied
head on scaled states is exported with the scale folded into it (see ``_fold_head_scale``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from .base import HFConverter, KeyRule, Setting, attention_rules, rule

T5_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "d_model"),
    Setting("n_layers", "num_layers"),
    Setting("head_width", "d_kv"),
    Setting("intermediate_width", "d_ff"),
    Setting("norm_eps", "layer_norm_epsilon"),
    Setting("n_buckets", "relative_attention_num_buckets"),
    Setting("max_distance", "relative_attention_max_distance"),
)


def _t5_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    projection = hf.get("feed_forward_proj", "relu")
    parts = projection.split("-") if isinstance(projection, str) else []
    if not 1 <= len(parts) <= 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(
            [
                ConfigProblem(
                    "feed_forward_proj",
                    "expected an activation, or 'gated-' and one ('relu', 'gated-gelu')",
                    projection,
                    True,
                )
            ],
            source="config.json",
        )
    activation = parts[-1]
    if projection == "gated-gelu":
        activation = "gelu_new"  # what HF's T5 runs for "gated-gelu"
    tied = hf.get("tie_word_embeddings", True) is not False
    scaled = hf.get("scale_decoder_outputs", tied)
    return {
        "n_heads": hf["num_heads"],
        "n_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
        "activation": activation,
        "gated": len(parts) == 2,
        "tie_embeddings": tied,
        "scale_output": bool(scaled),
    }


def _t5_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    activation = hyper["activation"]
    if hyper["gated"]:
        projection = "gated-gelu" if activation == "gelu_new" else f"gated-{activation}"
    else:
        projection = activation
    return {
        "num_heads": hyper["n_heads"],
        "num_decoder_layers": hyper["n_decoder_layers"],
        "feed_forward_proj": projection,
        "tie_word_embeddings": hyper["tie_embeddings"],
        "scale_decoder_outputs": hyper["scale_output"],
        "is_encoder_decoder": True,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def _fold_head_scale(
    hyper: Mapping[str, Any], hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> str | None:
    """An untied head on scaled states (T5 1.0 with a head of its own) as HF reads it:
    ``lm_head.weight`` times d_model^-0.5, untied and unscaled. HF transformers derives the
    scale from ``tie_word_embeddings`` (false: unscaled; version 4 reads nothing else), so
    a file that says untied and scaled is read unscaled there."""
    if hyper.get("tie_embeddings") or not hyper.get("scale_output"):
        return None
    head = tensors["lm_head.weight"]
    factor = hyper["hidden_width"] ** -0.5
    tensors["lm_head.weight"] = (head.float() * factor).to(head.dtype)
    hf_config["tie_word_embeddings"] = False
    hf_config["scale_decoder_outputs"] = False
    return (
        f"the decoder's output scale (d_model^-0.5 = {factor:.6g}) is folded into "
        "lm_head.weight, declared untied and unscaled (tie_word_embeddings and "
        "scale_decoder_outputs false): HF transformers derives the scale from "
        "tie_word_embeddings, so it would read an untied, scaled head unscaled. The "
        "logits agree to float rounding; the head's values are not ours bit for bit"
    )


def _gated(hyper: Any) -> bool:
    return bool(hyper.get("gated"))


def _feed_forward_rules(ours: str, hf: str) -> list[KeyRule]:
    return [
        rule(f"{ours}.gate_up_proj.{{p}}", f"{hf}.wi_0.{{p}}", f"{hf}.wi_1.{{p}}"),
        rule(f"{ours}.gate_proj.{{p}}", f"{hf}.wi_0.{{p}}"),
        rule(f"{ours}.up_proj.{{p}}", f"{hf}.wi_1.{{p}}", when=_gated),
        rule(f"{ours}.up_proj.{{p}}", f"{hf}.wi.{{p}}"),
        rule(f"{ours}.down_proj.{{p}}", f"{hf}.wo.{{p}}"),
    ]


def _attention(ours: str, hf: str) -> list[KeyRule]:
    return attention_rules(ours, f"{hf}.q", f"{hf}.k", f"{hf}.v", f"{hf}.o")


def _stack_rules(ours: str, hf: str, decoder: bool) -> list[KeyRule]:
    """One stack's weights; ``ours`` is the prefix of our stack's names ("" or "encoder.")."""
    block = f"{hf}.block.{{i}}"
    layer = f"{ours}layers.{{i}}"
    ff = 2 if decoder else 1
    rules = [
        rule(
            f"{ours}attention_bias.weight",
            f"{hf}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        *_attention(f"{layer}.attention", f"{block}.layer.0.SelfAttention"),
        rule(f"{layer}.attention_norm.{{p}}", f"{block}.layer.0.layer_norm.{{p}}"),
        *_feed_forward_rules(f"{layer}.feed_forward", f"{block}.layer.{ff}.DenseReluDense"),
        rule(f"{layer}.feed_forward_norm.{{p}}", f"{block}.layer.{ff}.layer_norm.{{p}}"),
        rule(f"{ours}final_norm.{{p}}", f"{hf}.final_layer_norm.{{p}}"),
    ]
    if decoder:
        rules += [
            *_attention(f"{layer}.cross_attention", f"{block}.layer.1.EncDecAttention"),
            rule(f"{layer}.cross_attention_norm.{{p}}", f"{block}.layer.1.layer_norm.{{p}}"),
        ]
    return rules


def _encoder_rules(ours: str) -> list[KeyRule]:
    return [
        rule(f"{ours}embeddings.word_embeddings.weight", "shared.weight"),
        *_stack_rules(ours, "encoder", decoder=False),
    ]


T5_RULES = (
    *_encoder_rules("encoder."),
    *_stack_rules("decoder.", "decoder", decoder=True),
    rule("lm_head.{p}", "lm_head.{p}"),
)

# Copies of the shared table that some files hold, a table the cross-attention never has,
# and the head of a tied model.
T5_IGNORED = (
    r"(encoder|decoder)\.embed_tokens\.weight\Z",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight\Z",
    r"lm_head\.weight\Z",
)


@registry.converters.register("registry_xf.HFT5.v1")
def t5_converter() -> HFConverter:
    """HF ``t5`` checkpoints (T5 1.0, T5 1.1, Flan-T5; tied or untied) ↔ configs/t5.cfg."""
    return HFConverter(
        name="registry_xf.HFT5.v1",
        family="t5",
        model_types=("t5",),
        hf_architecture="T5ForConditionalGeneration",
        settings=T5_SETTINGS,
        rules=T5_RULES,
        architectures={"T5EncoderModel": "registry_xf.HFT5Encoder.v1"},
        ignored=T5_IGNORED,
        extra_from_hf=_t5_from_hf,
        extra_to_hf=_t5_to_hf,
        fold_for_hf=_fold_head_scale,
    )


@registry.converters.register("registry_xf.HFT5Encoder.v1")
def t5_encoder_converter() -> HFConverter:
    """The encoder of HF ``t5`` checkpoints (``T5EncoderModel``, or the encoder of a whole
    model) ↔ configs/t5_encoder.cfg: an Encoder, for embeddings (mean pooling)."""
    return HFConverter(
        name="registry_xf.HFT5Encoder.v1",
        family="t5_encoder",
        model_types=("t5",),
        hf_architecture="T5EncoderModel",
        settings=T5_SETTINGS,
        rules=tuple(_encoder_rules("")),
        ignored=(*T5_IGNORED, r"decoder\..*"),
        extra_from_hf=_t5_encoder_from_hf,
        extra_to_hf=_t5_encoder_to_hf,
    )


def _t5_encoder_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    found = _t5_from_hf(hf)
    return {k: v for k, v in found.items() if k in ("n_heads", "activation", "gated")}


def _t5_encoder_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    whole = {"n_decoder_layers": hyper["n_layers"], "tie_embeddings": True, "scale_output": True}
    found = _t5_to_hf({**hyper, **whole})
    for key in ("num_decoder_layers", "tie_word_embeddings", "scale_decoder_outputs"):
        found.pop(key)
    return {**found, "is_encoder_decoder": False}
