"""Falcon: the original layout (Falcon-7B) and the new decoder architecture (Falcon-40B).

The layer's layout is ``hyper.layer_kind``, one of the kinds that configs/falcon.cfg
declares:

- ``"parallel_shared_norm"``: attention and feed-forward read the same norm of the layer's
  input (``input_layernorm``), in parallel (Falcon-7B; new-architecture models with
  ``num_ln_in_parallel_attn = 1``, Falcon-11B);
- ``"parallel"``: the same with a norm each (``ln_attn``, ``ln_mlp``): the new decoder
  architecture (Falcon-40B, -180B);
- ``"sequential"``: attention, then feed-forward (``parallel_attn = false``): a pre-norm
  layer with ``input_layernorm`` and ``post_attention_layernorm``.

Every layout's fused ``query_key_value`` is grouped per key/value head, ``[q heads of the
group..., k, v]``: multi-query is one group, the original multi-head layout one query head
per group. The converter reorders it to our ``[q; k; v]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..registry import registry
from .base import HFConverter, Setting, rule
from .decoder_like import rope_from_hf, rope_to_hf
from .gpt_neox import grouped_qkv_to_hf, grouped_qkv_to_ours

LAYER_KINDS = ("parallel_shared_norm", "parallel", "sequential")


def _qkv_to_ours(tensor: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
    return grouped_qkv_to_ours(tensor, hyper["n_heads"], hyper["n_kv_heads"])


def _qkv_to_hf(tensor: torch.Tensor, hyper: Mapping[str, Any]) -> torch.Tensor:
    return grouped_qkv_to_hf(tensor, hyper["n_heads"], hyper["n_kv_heads"])


def _two_norms(hyper: Mapping[str, Any]) -> bool:
    return hyper.get("layer_kind") == "parallel"


_L, _H = "decoder.layers.{i}", "h.{i}"

# Names without the "transformer." prefix of FalconForCausalLM (removed where present).
FALCON_RULES = (
    rule("decoder.embeddings.word_embeddings.weight", "word_embeddings.weight"),
    rule(
        f"{_L}.attention.qkv_proj.{{p}}",
        f"{_H}.self_attention.query_key_value.{{p}}",
        to_ours=_qkv_to_ours,
        to_hf=_qkv_to_hf,
    ),
    rule(f"{_L}.attention.o_proj.{{p}}", f"{_H}.self_attention.dense.{{p}}"),
    # the new architecture's two norms have names of their own
    rule(f"{_L}.attention_norm.{{p}}", f"{_H}.ln_attn.{{p}}", when=_two_norms),
    rule(f"{_L}.feed_forward_norm.{{p}}", f"{_H}.ln_mlp.{{p}}", when=_two_norms),
    rule(f"{_L}.attention_norm.{{p}}", f"{_H}.input_layernorm.{{p}}"),
    rule(f"{_L}.feed_forward_norm.{{p}}", f"{_H}.post_attention_layernorm.{{p}}"),
    rule(f"{_L}.feed_forward.up_proj.{{p}}", f"{_H}.mlp.dense_h_to_4h.{{p}}"),
    rule(f"{_L}.feed_forward.down_proj.{{p}}", f"{_H}.mlp.dense_4h_to_h.{{p}}"),
    rule("decoder.final_norm.{p}", "ln_f.{p}"),
    rule("lm_head.weight", "lm_head.weight"),  # untied models only
)

FALCON_SETTINGS = (
    Setting("vocab_size", "vocab_size"),
    Setting("hidden_width", "hidden_size"),
    Setting("n_layers", "num_hidden_layers"),
    Setting("n_heads", "num_attention_heads"),
    Setting("activation", "activation"),
    Setting("max_positions", "max_position_embeddings", 2048),
    Setting("norm_eps", "layer_norm_epsilon"),
    Setting("bias", "bias", False),
    Setting("tie_embeddings", "tie_word_embeddings", True),
)


def _check(hf: dict[str, Any]) -> None:
    if hf.get("alibi"):
        raise UnsupportedModelError(
            "config.json: alibi = true (Falcon-RW's ALiBi positions) is not supported for "
            "falcon; only rotary positions are"
        )
    if hf.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedModelError(
            "config.json: apply_residual_connection_post_layernorm = true is not supported"
        )
    n_norms = hf.get("num_ln_in_parallel_attn")
    if hf.get("new_decoder_architecture"):
        if n_norms == 1 and not hf.get("parallel_attn", True):
            raise UnsupportedModelError(
                "config.json: new_decoder_architecture with num_ln_in_parallel_attn = 1 and "
                "parallel_attn = false is not a working Falcon layout"
            )
    elif n_norms == 2 and hf.get("parallel_attn", True):
        raise UnsupportedModelError(
            "config.json: num_ln_in_parallel_attn = 2 needs new_decoder_architecture = true"
        )


def _falcon_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    if hf.get("new_decoder_architecture"):
        n_kv_heads = hf.get("num_kv_heads") or n_heads
        two_norms = (hf.get("num_ln_in_parallel_attn") or 2) == 2
        kind = "parallel" if two_norms else "parallel_shared_norm"
    else:
        n_kv_heads = 1 if hf.get("multi_query", True) else n_heads
        kind = "parallel_shared_norm" if hf.get("parallel_attn", True) else "sequential"
    return {
        "n_kv_heads": n_kv_heads,
        "head_width": hf["hidden_size"] // n_heads,
        "intermediate_width": hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
        "layer_kind": kind,
        **rope_from_hf(hf),
    }


def _falcon_to_hf(hyper: dict[str, Any]) -> dict[str, Any]:
    kind, n_heads, n_kv_heads = hyper["layer_kind"], hyper["n_heads"], hyper["n_kv_heads"]
    if kind not in LAYER_KINDS:
        raise UnsupportedModelError(f"falcon: unknown layer_kind {kind!r}; one of {LAYER_KINDS}")
    # the original architecture has multi-query (one key/value head) or multi-head attention
    original = kind == "sequential" or (
        kind == "parallel_shared_norm" and n_kv_heads in (1, n_heads)
    )
    if kind == "sequential" and n_kv_heads not in (1, n_heads):
        raise UnsupportedModelError(
            "falcon: a sequential layer needs n_kv_heads = 1 or n_heads (HF's original "
            f"architecture); found {n_kv_heads} key/value heads for {n_heads} heads"
        )
    out: dict[str, Any] = {
        "num_kv_heads": n_kv_heads,
        "ffn_hidden_size": hyper["intermediate_width"],
        "new_decoder_architecture": not original,
        "multi_query": n_kv_heads == 1,
        "parallel_attn": kind != "sequential",
        "alibi": False,
        **rope_to_hf(hyper),
    }
    if not original:
        out["num_ln_in_parallel_attn"] = 2 if kind == "parallel" else 1
    return out


@registry.converters.register("registry_xf.HFFalcon.v1")
def falcon_converter() -> HFConverter:
    """HF ``falcon`` checkpoints (rotary: Falcon-7B, -40B, -180B, -11B) ↔ configs/falcon.cfg."""
    return HFConverter(
        name="registry_xf.HFFalcon.v1",
        family="falcon",
        model_types=("falcon",),
        hf_architecture="FalconForCausalLM",
        settings=FALCON_SETTINGS,
        rules=FALCON_RULES,
        checkpoint_prefixes=("transformer.",),
        # a tied model's copy of the embeddings; rotary buffers
        ignored=(r"lm_head\.weight\Z", r".*\.rotary_emb\.inv_freq\Z"),
        extra_from_hf=_falcon_from_hf,
        extra_to_hf=_falcon_to_hf,
        checks=_check,
    )
