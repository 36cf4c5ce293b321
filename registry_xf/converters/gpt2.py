"""GPT-2: learned positions, pre-norm LayerNorm, Conv1D weights (stored transposed)."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter, KeyRule, Setting, rule


def _conv1d(ours: str, hf: str) -> list[KeyRule]:
    """A ``Conv1D`` (weight stored as (in, out)) ↔ our ``nn.Linear`` (out, in)."""
    return [
        rule(f"{ours}.weight", f"{hf}.weight", transpose=True),
        rule(f"{ours}.bias", f"{hf}.bias"),
    ]


# Names without the "transformer." prefix of GPT2LMHeadModel (removed where present), as
# the original gpt2 checkpoints store them. c_attn's columns are q, k, v: once transposed,
# they are the rows [q; k; v] of our fused projection.
GPT2_RULES = (
    rule("decoder.embeddings.word_embeddings.weight", "wte.weight"),
    rule("decoder.embeddings.positions.weight", "wpe.weight"),
    rule("decoder.layers.{i}.attention_norm.{p}", "h.{i}.ln_1.{p}"),
    *_conv1d("decoder.layers.{i}.attention.qkv_proj", "h.{i}.attn.c_attn"),
    *_conv1d("decoder.layers.{i}.attention.o_proj", "h.{i}.attn.c_proj"),
    rule("decoder.layers.{i}.feed_forward_norm.{p}", "h.{i}.ln_2.{p}"),
    *_conv1d("decoder.layers.{i}.feed_forward.up_proj", "h.{i}.mlp.c_fc"),
    *_conv1d("decoder.layers.{i}.feed_forward.down_proj", "h.{i}.mlp.c_proj"),
    rule("decoder.final_norm.{p}", "ln_f.{p}"),
    rule("lm_head.weight", "lm_head.weight"),  # untied models only
)

GPT2_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "n_embd"),
    Setting("n_layers", "n_layer"),
    Setting("n_heads", "n_head"),
    Setting("activation", "activation_function"),
    Setting("max_positions", "n_positions"),
    Setting("norm_eps", "layer_norm_epsilon"),
    Setting("tie_embeddings", "tie_word_embeddings", True),
)

# config.json settings that change the computation in ways the config cannot express.
_UNSUPPORTED = {
    "scale_attn_by_inverse_layer_idx": (False, "attention scaled by the layer index"),
    "reorder_and_upcast_attn": (False, "reordered, upcast attention"),
    "scale_attn_weights": (True, "unscaled attention scores"),
    "add_cross_attention": (False, "cross-attention"),
}


def _check(hf: dict[str, Any]) -> None:
    for key, (supported, what) in _UNSUPPORTED.items():
        if bool(hf.get(key, supported)) != supported:
            raise UnsupportedModelError(
                f"config.json: {key} = {hf[key]} ({what}) is not supported for gpt2"
            )


def _gpt2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return {"intermediate_width": hf.get("n_inner") or 4 * hf["n_embd"]}


def _gpt2_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    return {"n_inner": hyper["intermediate_width"]}


@registry.converters.register("registry_xf.HFGPT2.v1")
def gpt2_converter() -> HFConverter:
    """HF ``gpt2`` checkpoints (GPT-2 and its fine-tunes, DistilGPT-2) ↔ configs/gpt2.cfg."""
    return HFConverter(
        name="registry_xf.HFGPT2.v1",
        family="gpt2",
        model_types=("gpt2",),
        hf_architecture="GPT2LMHeadModel",
        settings=GPT2_SETTINGS,
        rules=GPT2_RULES,
        checkpoint_prefixes=("transformer.",),
        # the causal-mask buffers of old checkpoints; a tied model's copy of the embeddings
        ignored=(r".*\.attn\.(bias|masked_bias)\Z", r"lm_head\.weight\Z"),
        extra_from_hf=_gpt2_from_hf,
        extra_to_hf=_gpt2_to_hf,
        checks=_check,
    )
