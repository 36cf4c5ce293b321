"""Decoder families Mistral, Qwen2, Phi-3 and Gemma (and Llama's rope scaling) against HF.

Tiny random checkpoints are written with transformers' ``save_pretrained``; norms and
biases are given random, non-default values, so parity cannot hide behind ones and zeros.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, hf_logits, our_logits
from conftest import assert_close_on_real_tokens as assert_close_on_tokens
from conftest import mask_positions as positions

import registry_xf as rx
from registry_xf.registry import registry

ATOL = 1e-5
SEQ = 12
WINDOW = 5  # smaller than SEQ: the sliding window really cuts
CONVERTERS = {
    "mistral": "registry_xf.HFMistral.v1",
    "qwen2": "registry_xf.HFQwen2.v1",
    "phi3": "registry_xf.HFPhi3.v1",
    "gemma": "registry_xf.HFGemma.v1",
}
FAMILIES = list(CONVERTERS)
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # larger than HF's 0.02, so that activations leave GELU's near-linear range: the exact
    # and the tanh GELU then differ by far more than ATOL
    initializer_range=0.1,
)


def tiny_configs() -> dict[str, Callable[..., Any]]:
    import transformers as tf

    def rope(theta: float = 10000.0, **extra: Any) -> dict[str, Any]:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **extra}}

    return {
        "mistral": lambda **kw: tf.MistralConfig(
            **{**COMMON, "sliding_window": WINDOW, **rope(), **kw}
        ),
        "qwen2": lambda **kw: tf.Qwen2Config(**{**COMMON, **rope(1e6), **kw}),
        "phi3": lambda **kw: tf.Phi3Config(
            **{
                **COMMON,
                "num_key_value_heads": 4,
                "sliding_window": WINDOW + 2,
                **rope(partial_rotary_factor=0.5),
                **kw,
            }
        ),
        # head_dim 16, not 32 / 4 = 8; tied output layer; "gelu" means the tanh GELU
        "gemma": lambda **kw: tf.GemmaConfig(
            **{
                **COMMON,
                "head_dim": 16,
                "hidden_act": "gelu",
                "tie_word_embeddings": True,
                **rope(),
                **kw,
            }
        ),
        "llama": lambda **kw: tf.LlamaConfig(**{**COMMON, **rope(), **kw}),
    }


def write_checkpoint(path: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """A randomly initialised HF ``*ForCausalLM`` of ``family``, saved to ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_configs()[family](**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:  # Gemma's norms scale by 1 + w: any value is a test
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders_b")
    return {f: write_checkpoint(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


def hf_lm(path: Path, attn: str = "eager", **kwargs: Any):  # type: ignore[no-untyped-def]
    """The HF reference. Released Gemma configs say "gelu" and mean the tanh GELU: newer
    transformers read it so, older ones (5.17, say) ran the exact GELU. The reference is
    read as the checkpoint's authors meant it, whatever the installed version."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path)
    if config.model_type == "gemma" and config.hidden_act == "gelu":
        config.hidden_act = "gelu_pytorch_tanh"
    return tf.AutoModelForCausalLM.from_pretrained(
        path, config=config, attn_implementation=attn, **kwargs
    ).eval()


def left_padded_batch(seed: int, batch: int = 3, seq: int = SEQ) -> tuple[torch.Tensor, ...]:
    """Ids and a mask with left padding of random lengths and random holes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] >= seq - lengths[:, None]).long()
    holes = (torch.rand(batch, seq, generator=g) < 0.15) & (torch.arange(seq)[None, :] < seq - 1)
    mask = mask * (~holes).long()
    return ids.masked_fill(mask == 0, 0), mask


# ---- parity with HF ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(checkpoints: dict[str, Path], family: str, backend: str) -> None:
    path = checkpoints[family]
    ours = rx.load(path, overrides={"hyper.attention_backend": backend})
    ref = hf_lm(path, backend)
    for seed in range(3):
        ids, mask = left_padded_batch(seed)
        assert_close_on_tokens(our_logits(ours, ids, mask), hf_logits(ref, ids, mask), mask)
    # no mask at all: plain causal attention (the fused kernels' is_causal path)
    ids = left_padded_batch(9)[0]
    full = torch.ones_like(ids)
    torch.testing.assert_close(
        our_logits(ours, ids, None), hf_logits(ref, ids, full), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("qkv", ["separate"])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_separate_projections_match_hf(checkpoints: dict[str, Path], family: str, qkv: str) -> None:
    path = checkpoints[family]
    ours = rx.load(path, overrides={"hyper.qkv": qkv, "hyper.fused_gate_up": False})
    ids, mask = left_padded_batch(3)
    assert_close_on_tokens(our_logits(ours, ids, mask), hf_logits(hf_lm(path), ids, mask), mask)


def test_hyper_values_read_from_config_json(checkpoints: dict[str, Path]) -> None:
    def hyper(family: str) -> dict[str, Any]:
        return dict(rx.config_from_hf(checkpoints[family])["hyper"])

    assert hyper("mistral")["sliding_window"] == WINDOW  # HF's window, used as is
    assert hyper("qwen2")["sliding_window"] is None
    assert hyper("qwen2")["rope_theta"] == 1e6
    phi3 = hyper("phi3")
    assert (phi3["rotary_fraction"], phi3["sliding_window"]) == (0.5, WINDOW + 2)
    gemma = hyper("gemma")
    assert gemma["head_width"] == 16 and gemma["activation"] == "gelu_pytorch_tanh"
    assert gemma["embedding_scale"] == 32**0.5 and gemma["tie_embeddings"] is True
    model = rx.load(checkpoints["gemma"])
    assert model.lm_head.weight is model.decoder.embeddings.word_embeddings.weight


def test_sliding_window_is_hfs_q_minus_k_below_window(checkpoints: dict[str, Path]) -> None:
    """A query sees itself and the WINDOW - 1 keys before it (transformers' masking_utils:
    ``kv_idx > q_idx - sliding_window``): one key more or less changes the logits."""
    path = checkpoints["mistral"]
    ids = left_padded_batch(4)[0]
    expected = hf_logits(hf_lm(path), ids, torch.ones_like(ids))
    for backend in ("sdpa", "eager"):
        overrides = {"hyper.attention_backend": backend}
        got = our_logits(rx.load(path, overrides=overrides), ids, None)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        for window in (WINDOW - 1, WINDOW + 1):
            off = rx.load(path, overrides={**overrides, "hyper.sliding_window": window})
            assert not torch.allclose(our_logits(off, ids, None)[:, WINDOW:], expected[:, WINDOW:])
    # the first WINDOW tokens see every earlier token either way
    torch.testing.assert_close(
        our_logits(rx.load(path, overrides={"hyper.sliding_window": None}), ids, None)[:, :WINDOW],
        expected[:, :WINDOW],
        atol=ATOL,
        rtol=0,
    )


# ---- incremental decoding ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_full_forward(
    checkpoints: dict[str, Path], family: str, backend: str
) -> None:
    model = rx.load(checkpoints[family], overrides={"hyper.attention_backend": backend})
    ids, mask = left_padded_batch(5, seq=SEQ + 4)
    full = our_logits(model, ids, mask)
    prefill = 6
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = []
    with torch.no_grad():
        steps.append(model(ids[:, :prefill], mask[:, :prefill], cache=cache).logits)
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], mask[:, : t + 1], cache=cache).logits)
    assert cache.length == ids.shape[1]
    assert_close_on_tokens(torch.cat(steps, dim=1), full, mask)
    # and HF agrees with both
    assert_close_on_tokens(full, hf_logits(hf_lm(checkpoints[family]), ids, mask), mask)


def test_cached_decoding_compiles_to_one_graph_per_phase(checkpoints: dict[str, Path]) -> None:
    """Under torch.compile (whole graph, dynamic shapes) the cache and the masks trace
    without a break, the prompt and the decoding steps compile once each, and the logits
    are the eager ones."""
    import torch._dynamo

    model = rx.load(checkpoints["mistral"], pack=False)  # a sliding window, left padding
    ids, mask = left_padded_batch(7, seq=SEQ + 4)
    prefill = 6
    eager_cache = model.new_cache(ids.shape[0], ids.shape[1])
    compiled_cache = model.new_cache(ids.shape[0], ids.shape[1])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
            args = (ids[:, start:end].contiguous(), mask[:, :end].contiguous())
            expected = model(*args, cache=eager_cache).logits
            got = compiled(*args, cache=compiled_cache).logits
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert compiled_cache.length == ids.shape[1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


# ---- HF round trip, save and load -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip(checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    import transformers as tf

    ours = rx.load(checkpoints[family])
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = tf.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert ours.config["weights"]["converter"]["@converters"] == CONVERTERS[family]
    assert type(back).__name__ == registry.converters.get(CONVERTERS[family])().hf_architecture
    ids, mask = left_padded_batch(7)
    expected = hf_logits(hf_lm(checkpoints[family]), ids, mask)
    assert_close_on_tokens(hf_logits(back.eval(), ids, mask), expected, mask)
    # HF → ours → HF → ours: the same weights, bit for bit, and the same [hyper]
    twice = rx.load(exported)
    again = twice.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again[name]), name
    assert dict(twice.config["hyper"]) == dict(ours.config["hyper"])


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_exact(checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    ours = rx.load(checkpoints[family])
    loaded = rx.load(rx.save(ours, tmp_path / "saved"))
    again = loaded.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again[name]), name
    ids, mask = left_padded_batch(8)
    assert torch.equal(our_logits(loaded, ids, mask), our_logits(ours, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_converter_config_round_trip(family: str) -> None:
    """config.json → [hyper] → config.json → the same [hyper]."""
    converter = registry.converters.get(CONVERTERS[family])()
    hyper = converter.hyper_from_hf(tiny_configs()[family]().to_dict())
    assert converter.hyper_from_hf(converter.hyper_to_hf(hyper)) == hyper


# ---- rope scaling (Llama) ---------------------------------------------------------------

ROPE_SCALINGS: dict[str, dict[str, Any]] = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_llama_rope_scaling_matches_hf(kind: str, tmp_path: Path) -> None:
    rope = {"rope_theta": 10000.0, **ROPE_SCALINGS[kind]}
    # dynamic scaling starts beyond max_position_embeddings: the prompt goes past it
    max_positions = 16 if kind == "dynamic" else 64
    path = write_checkpoint(
        tmp_path / kind, "llama", rope_parameters=rope, max_position_embeddings=max_positions
    )
    ours = rx.load(path)
    assert ours.config["hyper"]["rope_scaling"]["type"] == kind
    if kind == "dynamic":
        # HF's max_position_embeddings is where dynamic scaling starts, not a limit
        assert ours.max_positions is None
    ids, mask = left_padded_batch(11, seq=24 if kind == "dynamic" else SEQ)
    assert int(positions(mask).max()) >= 16 or kind != "dynamic"
    for backend in ("sdpa", "eager"):
        assert_close_on_tokens(
            our_logits(ours, ids, mask), hf_logits(hf_lm(path, backend), ids, mask), mask
        )


# ---- refused ----------------------------------------------------------------------------


def _edit_config(path: Path, **changes: Any) -> Path:
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("kind", ["longrope", "su", "yarn"])
def test_phi3_longrope_is_refused(tmp_path: Path, kind: str) -> None:
    path = write_checkpoint(tmp_path / "phi3", "phi3")
    factors = [1.0] * 2
    _edit_config(
        path,
        rope_parameters={
            "rope_type": kind,
            "rope_theta": 10000.0,
            "short_factor": factors,
            "long_factor": factors,
        },
    )
    with pytest.raises(rx.UnsupportedModelError, match="not supported") as err:
        rx.load(path)
    assert "default" in str(err.value) and "llama3" in str(err.value)
    assert "config.json" in str(err.value)


def test_unknown_rope_scaling_is_refused(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "llama", "llama")
    _edit_config(path, rope_parameters={"rope_type": "foo", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(rx.RegistryXFError, match="'foo'") as err:
        rx.load(path)
    assert all(kind in str(err.value) for kind in ("linear", "dynamic", "llama3", "yarn"))


def test_qwen2_sliding_window_on_some_layers_is_refused(tmp_path: Path) -> None:
    path = write_checkpoint(
        tmp_path / "qwen2", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    with pytest.raises(rx.UnsupportedModelError, match="some layers"):
        rx.load(path)


def test_qwen2_sliding_window_on_every_layer_matches_hf(tmp_path: Path) -> None:
    path = write_checkpoint(
        tmp_path / "qwen2", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0
    )
    ours = rx.load(path)
    assert ours.config["hyper"]["sliding_window"] == 4
    ids, mask = left_padded_batch(12)
    assert_close_on_tokens(our_logits(ours, ids, mask), hf_logits(hf_lm(path), ids, mask), mask)


def test_gemma_bidirectional_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    path = Path(shutil.copytree(checkpoints["gemma"], tmp_path / "gemma"))
    _edit_config(path, use_bidirectional_attention=True)
    with pytest.raises(rx.UnsupportedModelError, match="bidirectional"):
        rx.load(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_longer_than_max_positions(checkpoints: dict[str, Path], family: str) -> None:
    model = rx.load(checkpoints[family])
    ids = torch.randint(3, VOCAB, (1, COMMON["max_position_embeddings"] + 1))
    with pytest.raises(rx.InputError, match="beyond"):
        model(ids)
    model(ids[:, :-1])  # exactly max_positions is fine
