"""Every encoder family against HF transformers: outputs, HF round trip, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, hf_encoder, random_batch

import registry_xf as rx

ATOL = 1e-5


def pad_id(family: str) -> int:
    return 1 if family in ("roberta", "xlm-roberta", "camembert") else 0


def hf_outputs(model, ids, mask, types=None):  # type: ignore[no-untyped-def]
    kwargs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    if types is not None:
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("qkv", ["fused", "separate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_hf(checkpoints: dict[str, Path], family: str, backend: str, qkv: str) -> None:
    path = checkpoints[family]
    ours = rx.load(path, overrides={"hyper.attention_backend": backend, "hyper.qkv": qkv})
    ref = hf_encoder(path, "eager" if backend == "eager" else "sdpa")
    for seed in range(3):
        ids, mask = random_batch(seed, pad_id=pad_id(family))
        types = None
        if family in ("bert", "albert", "electra"):
            types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(seed))
        expected = hf_outputs(ref, ids, mask, types)
        with torch.no_grad():
            got = ours(ids, mask, token_type_ids=types, output_hidden_states=True)
        torch.testing.assert_close(
            got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0
        )
        assert len(got.hidden_states) == len(expected.hidden_states)
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip(checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    import transformers as tf

    ours = rx.load(checkpoints[family])
    exported = rx.export_hf(ours, tmp_path / "exported")
    back, info = tf.AutoModel.from_pretrained(exported, output_loading_info=True)
    # Only HF's pooler (a task head outside the encoder) is not carried over.
    assert all(k.startswith("pooler.") for k in info["missing_keys"]), info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = random_batch(7, pad_id=pad_id(family))
    expected = hf_outputs(hf_encoder(checkpoints[family], "sdpa"), ids, mask)
    again = hf_outputs(back.eval(), ids, mask)
    torch.testing.assert_close(
        again.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0
    )
    # HF → ours → HF → ours: the same weights, bit for bit
    twice = rx.load(exported)
    again_state = twice.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again_state[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_exact(checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    ours = rx.load(checkpoints[family])
    saved = rx.save(ours, tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.cfg",
        "meta.json",
        "model.safetensors",
    ]
    loaded = rx.load(saved)
    ids, mask = random_batch(3, pad_id=pad_id(family))
    with torch.no_grad():
        assert torch.equal(ours(ids, mask).last_hidden_state, loaded(ids, mask).last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_filled_config_round_trips_through_text(checkpoints: dict[str, Path], family: str) -> None:
    config = rx.config_from_hf(checkpoints[family])
    text = config.to_str(interpolate=False)
    again = rx.read_config(text)
    assert again.to_str(interpolate=False) == text
    a, b = rx.build(config), rx.build(again)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    assert repr(a) == repr(b)
