"""Decoder families GPT-2, GPT-NeoX (Pythia) and Falcon against HF transformers.

Tiny random ``*ForCausalLM`` checkpoints of every supported layout are written with
``save_pretrained``; norms and biases get random, non-default values, so parity cannot hide
behind ones and zeros. Inputs are left-padded with random holes in the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, hf_logits, our_logits
from conftest import assert_close_on_real_tokens as assert_close_where

import registry_xf as rx
from registry_xf.converters.gpt_neox import grouped_qkv_to_hf, grouped_qkv_to_ours
from registry_xf.registry import registry

ATOL = 1e-5
BATCH, SEQ = 4, 12
# larger than HF's 0.02, so that activations leave GELU's near-linear range: the exact and
# the tanh GELU then differ by far more than ATOL
INIT = 0.1
CONVERTERS = {
    "gpt2": "registry_xf.HFGPT2.v1",
    "gpt_neox": "registry_xf.HFGPTNeoX.v1",
    "falcon": "registry_xf.HFFalcon.v1",
}


def tiny_configs() -> dict[str, Callable[..., Any]]:
    """Per layout variant: a tiny HF config (random weights are made from it)."""
    import transformers as tf

    def gpt2(**kw: Any) -> Any:
        return tf.GPT2Config(
            **{
                "vocab_size": VOCAB,
                "n_embd": 32,
                "n_layer": 2,
                "n_head": 4,
                "n_inner": 37,
                "n_positions": 64,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "resid_pdrop": 0.0,
                "initializer_range": INIT,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **kw,
            }
        )

    def neox(**kw: Any) -> Any:
        # head width 16, a rotary fraction of 0.5: 8 rotated dimensions, 8 left alone
        return tf.GPTNeoXConfig(
            **{
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 37,
                "max_position_embeddings": 64,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 500.0,
                    "partial_rotary_factor": 0.5,
                },
                "initializer_range": INIT,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **kw,
            }
        )

    def falcon(**kw: Any) -> Any:
        return tf.FalconConfig(
            **{
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "ffn_hidden_size": 37,
                "max_position_embeddings": 64,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0},
                "initializer_range": INIT,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **kw,
            }
        )

    return {
        "gpt2": lambda **kw: gpt2(**kw),
        "gpt2-untied": lambda **kw: gpt2(tie_word_embeddings=False, **kw),
        "gpt_neox": lambda **kw: neox(**kw),
        # use_parallel_residual = false, no biases, tied output layer
        "gpt_neox-sequential": lambda **kw: neox(
            use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True, **kw
        ),
        # Falcon-7B: multi-query, parallel attention with one shared norm, no biases
        "falcon-7b": lambda **kw: falcon(
            multi_query=True, parallel_attn=True, new_decoder_architecture=False, **kw
        ),
        # Falcon-40B: new decoder architecture, 2 key/value groups of 2 heads, ln_attn/ln_mlp
        "falcon-40b": lambda **kw: falcon(
            new_decoder_architecture=True, num_kv_heads=2, bias=True, **kw
        ),
        # Falcon-11B: new decoder architecture with one norm
        "falcon-11b": lambda **kw: falcon(
            new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, **kw
        ),
        # the original architecture with multi-head attention, sequential, untied, biases
        "falcon-sequential": lambda **kw: falcon(
            multi_query=False,
            parallel_attn=False,
            new_decoder_architecture=False,
            bias=True,
            tie_word_embeddings=False,
            **kw,
        ),
    }


VARIANTS = sorted(tiny_configs())


def family_of(variant: str) -> str:
    return variant.split("-")[0]


def write_checkpoint(path: Path, variant: str, seed: int = 0, **overrides: Any) -> Path:
    """A randomly initialised HF ``*ForCausalLM`` of ``variant``, saved to ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_configs()[variant](**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.split(".")[-2]
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "ln" in module or "norm" in module:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return path


def hf_model(path: Path, attn: str = "eager"):  # type: ignore[no-untyped-def]
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_decoders_a")
    return {v: write_checkpoint(root / v, v) for v in VARIANTS}


def left_padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids left-padded to random lengths, with a few random holes in the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    lengths = torch.randint(2, SEQ + 1, (BATCH,), generator=g)
    lengths[0] = SEQ
    start = SEQ - lengths
    arange = torch.arange(SEQ)[None, :]
    mask = (arange >= start[:, None]).long()
    holes = (torch.rand(BATCH, SEQ, generator=g) < 0.15) & (arange > start[:, None])
    mask = mask * (~holes).long()
    ids = ids.masked_fill(arange < start[:, None], 0)
    return ids, mask


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_hf(checkpoints: dict[str, Path], variant: str, backend: str) -> None:
    ours = rx.load(checkpoints[variant], overrides={"hyper.attention_backend": backend})
    ref = hf_model(checkpoints[variant])
    assert ours.load_report.ok and not ours.load_report.skipped
    for seed in range(2):
        ids, mask = left_padded_batch(seed)
        assert_close_where(our_logits(ours, ids, mask), hf_logits(ref, ids, mask), mask)
    # one unpadded sequence, without a mask, too
    ids = left_padded_batch(5)[0][:1]
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    torch.testing.assert_close(our_logits(ours, ids, None), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_matches_full_forward(
    checkpoints: dict[str, Path], variant: str, backend: str
) -> None:
    ours = rx.load(checkpoints[variant], overrides={"hyper.attention_backend": backend})
    ids, mask = left_padded_batch(3)
    full = our_logits(ours, ids, mask)
    prefill = 7
    cache = ours.new_cache(BATCH, SEQ)
    with torch.no_grad():
        steps = [ours(ids[:, :prefill], mask[:, :prefill], cache=cache).logits]
        for t in range(prefill, SEQ):
            steps.append(ours(ids[:, t : t + 1], mask[:, : t + 1], cache=cache).logits)
    assert cache.length == SEQ
    assert_close_where(torch.cat(steps, dim=1), full, mask)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_round_trip(checkpoints: dict[str, Path], variant: str, tmp_path: Path) -> None:
    import transformers as tf

    path = checkpoints[variant]
    ours = rx.load(path)
    exported = rx.export_hf(ours, tmp_path / "exported", converter=CONVERTERS[family_of(variant)])
    back, info = tf.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = hf_model(path)
    # the same HF model again: every weight bit for bit, and the same config
    back_state = back.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, back_state[name]), name
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(original.config, key), key
    ids, mask = left_padded_batch(7)
    assert_close_where(hf_logits(back.eval(), ids, mask), our_logits(ours, ids, mask), mask)
    # HF → ours → HF → ours: the same weights, bit for bit
    twice = rx.load(exported)
    twice_state = twice.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, twice_state[name]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_bit_exact(checkpoints: dict[str, Path], variant: str, tmp_path: Path) -> None:
    ours = rx.load(checkpoints[variant])
    saved = rx.save(ours, tmp_path / "saved")
    again = rx.load(saved)
    again_state = again.state_dict()
    assert again_state.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again_state[name]), name
    ids, mask = left_padded_batch(1)
    assert torch.equal(our_logits(ours, ids, mask), our_logits(again, ids, mask))
    # exporting the reloaded model still knows its converter
    rx.export_hf(again, tmp_path / "exported")


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 1), (4, 2), (6, 3), (8, 2)])
def test_grouped_qkv_reordering(n_heads: int, n_kv_heads: int) -> None:
    head_width, width = 3, 5
    rows = (n_heads + 2 * n_kv_heads) * head_width
    weight, bias = torch.randn(rows, width), torch.randn(rows)
    for tensor in (weight, bias):
        ours = grouped_qkv_to_ours(tensor, n_heads, n_kv_heads)
        assert torch.equal(grouped_qkv_to_hf(ours, n_heads, n_kv_heads), tensor)
    # by hand: group g holds query heads g*per .. (g+1)*per - 1, then key g, then value g
    per = n_heads // n_kv_heads
    ours = grouped_qkv_to_ours(weight, n_heads, n_kv_heads)
    grouped = weight.view(n_kv_heads, per + 2, head_width, width)
    q, k, v = ours.split([n_heads * head_width, *[n_kv_heads * head_width] * 2])
    for h in range(n_heads):
        assert torch.equal(q.view(n_heads, head_width, width)[h], grouped[h // per, h % per])
    for g in range(n_kv_heads):
        assert torch.equal(k.view(n_kv_heads, head_width, width)[g], grouped[g, per])
        assert torch.equal(v.view(n_kv_heads, head_width, width)[g], grouped[g, per + 1])


def test_gpt2_hub_layout_loads(tmp_path: Path) -> None:
    """The gpt2 hub checkpoints store bare names and the attention-mask buffers."""
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(tmp_path / "gpt2", "gpt2")
    tensors = load_file(path / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(bare, str(path / "model.safetensors"), metadata={"format": "pt"})
    ours = rx.load(path)
    assert sorted(ours.load_report.skipped) == ["h.0.attn.bias", "h.0.attn.masked_bias"]
    ids, mask = left_padded_batch(2)
    assert_close_where(our_logits(ours, ids, mask), hf_logits(hf_model(path), ids, mask), mask)


@pytest.mark.parametrize(
    ("variant", "setting"),
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
        ("gpt2", {"reorder_and_upcast_attn": True}),
        ("gpt2", {"scale_attn_weights": False}),
        ("falcon-7b", {"alibi": True}),
    ],
)
def test_unsupported_settings_are_refused(
    variant: str, setting: dict[str, Any], tmp_path: Path
) -> None:
    path = write_checkpoint(tmp_path / variant, variant, **setting)
    key = next(iter(setting))
    with pytest.raises(rx.UnsupportedModelError, match=key):
        rx.load(path)


@pytest.mark.parametrize(
    ("family", "hf", "expected"),
    [
        # Pythia's config.json, from before rope_parameters
        (
            "gpt_neox",
            {
                "model_type": "gpt_neox",
                "hidden_size": 768,
                "num_attention_heads": 12,
                "rotary_pct": 0.25,
                "rotary_emb_base": 10000,
                "use_parallel_residual": True,
                "tie_word_embeddings": False,
            },
            {
                "head_width": 64,
                "rotary_fraction": 0.25,
                "rope_theta": 10000.0,
                "rope_scaling": None,
                "residual": "parallel",
                "attention_bias": True,
                "tie_embeddings": False,
            },
        ),
        # Falcon-7B's config.json: no num_kv_heads, no max_position_embeddings
        (
            "falcon",
            {
                "model_type": "falcon",
                "hidden_size": 4544,
                "num_attention_heads": 71,
                "multi_query": True,
                "parallel_attn": True,
                "new_decoder_architecture": False,
                "alibi": False,
                "bias": False,
            },
            {
                "n_kv_heads": 1,
                "head_width": 64,
                "intermediate_width": 18176,
                "layer_kind": "parallel_shared_norm",
                "max_positions": 2048,
                "rope_theta": 10000.0,
                "tie_embeddings": True,
            },
        ),
        # Falcon-40B's: the new decoder architecture, 8 key/value groups
        (
            "falcon",
            {
                "model_type": "falcon",
                "hidden_size": 8192,
                "num_attention_heads": 128,
                "num_kv_heads": 8,
                "new_decoder_architecture": True,
                "alibi": False,
                "bias": False,
            },
            {"n_kv_heads": 8, "head_width": 64, "layer_kind": "parallel"},
        ),
    ],
)
def test_config_json_of_released_models(
    family: str, hf: dict[str, Any], expected: dict[str, Any]
) -> None:
    converter = registry.converters.get(CONVERTERS[family])()
    hyper = converter.hyper_from_hf(hf)
    assert {k: hyper[k] for k in expected} == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip(checkpoints: dict[str, Path], variant: str) -> None:
    """config.json → [hyper] → config.json → [hyper] keeps every value."""
    import json

    converter = registry.converters.get(CONVERTERS[family_of(variant)])()
    hf = json.loads((checkpoints[variant] / "config.json").read_text())
    hyper = converter.hyper_from_hf(hf)
    assert converter.hyper_from_hf(converter.hyper_to_hf(hyper)) == hyper


def test_family_configs_build_the_base_models() -> None:
    from importlib import resources

    expected = {"gpt2": 124_439_808, "gpt_neox": 162_322_944, "falcon": 6_921_720_704}
    for family, n_params in expected.items():
        model = rx.build(str(resources.files("registry_xf.configs") / f"{family}.cfg"))
        assert sum(p.numel() for p in model.parameters()) == n_params, family


def test_gpt_neox_partial_rotary_with_linear_scaling(tmp_path: Path) -> None:
    rope = {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 500.0,
        "partial_rotary_factor": 0.5,
    }
    path = write_checkpoint(tmp_path / "neox", "gpt_neox", rope_parameters=rope)
    ours = rx.load(path)
    ids, mask = left_padded_batch(4)
    assert_close_where(our_logits(ours, ids, mask), hf_logits(hf_model(path), ids, mask), mask)
