"""Marian (HF ``marian``, the opus-mt models): BART's layer names, fixed positions.

The sinusoidal tables some files hold (``embed_positions``) are computed, not loaded.
Only checkpoints whose encoder and decoder share one vocabulary are read (every opus-mt
model); ``decoder_vocab_size`` differing from ``vocab_size`` is refused.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError, ConfigProblem
from ..registry import registry
from .bart import BART_SETTINGS, bart_layer_rules
from .base import HFConverter, rule


def _marian_checks(hf: dict[str, Any]) -> None:
    decoder_vocab = hf.get("decoder_vocab_size")
    shared = hf.get("share_encoder_decoder_embeddings", True)
    if (decoder_vocab is not None and decoder_vocab != hf.get("vocab_size")) or not shared:
        raise ConfigError(
            [
                ConfigProblem(
                    "decoder_vocab_size",
                    "only Marian models with one vocabulary shared by encoder and decoder "
                    "are supported (vocab_size, share_encoder_decoder_embeddings true)",
                    decoder_vocab,
                    True,
                )
            ],
            source="config.json",
        )


def _marian_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    scaled = bool(hf.get("scale_embedding", False))
    return {
        "embedding_scale": math.sqrt(hf["d_model"]) if scaled else None,
        "tie_embeddings": hf.get("tie_word_embeddings", True) is not False,
    }


def _marian_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    vocab = hyper["vocab_size"]
    return {
        "scale_embedding": hyper.get("embedding_scale") is not None,
        "tie_word_embeddings": hyper["tie_embeddings"],
        "share_encoder_decoder_embeddings": True,
        "decoder_vocab_size": vocab,
        "is_encoder_decoder": True,
        "decoder_start_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
        "eos_token_id": 0,
        "forced_eos_token_id": None,
    }


MARIAN_RULES = (
    rule("encoder.embeddings.word_embeddings.weight", "model.shared.weight"),
    *bart_layer_rules("encoder", "model.encoder", decoder=False),
    *bart_layer_rules("decoder", "model.decoder", decoder=True),
    rule("logits_bias.weight", "final_logits_bias"),
    rule("lm_head.{p}", "lm_head.{p}"),
)

MARIAN_IGNORED = (
    r"model\.(encoder|decoder)\.embed_tokens\.weight\Z",
    r"model\.(encoder|decoder)\.embed_positions\.weight\Z",
    r"lm_head\.weight\Z",
)


@registry.converters.register("registry_xf.HFMarian.v1")
def marian_converter() -> HFConverter:
    """HF ``marian`` checkpoints (``MarianMTModel``, shared vocabulary) ↔ configs/marian.cfg."""
    return HFConverter(
        name="registry_xf.HFMarian.v1",
        family="marian",
        model_types=("marian",),
        hf_architecture="MarianMTModel",
        settings=BART_SETTINGS,
        rules=MARIAN_RULES,
        ignored=MARIAN_IGNORED,
        extra_from_hf=_marian_from_hf,
        extra_to_hf=_marian_to_hf,
        checks=_marian_checks,
    )
