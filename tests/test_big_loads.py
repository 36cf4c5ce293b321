"""Loading without copies: fused parts read as views of the files, separate projections for
models too big to pack, and packing as a named step that settings turn off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from safetensors.torch import save_file

import registry_xf as rx
from registry_xf.errors import ConfigError
from registry_xf.layers import packed_linear
from registry_xf.layers.linear_rows import split_rows
from registry_xf.loading import layout
from registry_xf.loading.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (grouped-query attention) in HF's layout, in three shards."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    path = tmp_path_factory.mktemp("llama") / "llama"
    model.save_pretrained(path, max_shard_size="20KB")
    return path


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def too_big_to_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model counts as too big to pack automatically (as a 0.9B model in bf16 is)."""
    monkeypatch.setattr(layout, "AUTO_PACK_LIMIT_BYTES", 0)
    monkeypatch.setattr(packed_linear, "AUTO_PACK_LIMIT_BYTES", 0)


def test_parts_in_order_are_views_of_the_file(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5, 4), "c": torch.randn(2, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))  # stored in the order a, b, c
    groups = [["a", "b"], ["a", "b", "c"], ["b", "a"], ["a", "c"]]
    with open_checkpoint(tmp_path) as ckpt:
        mapped = ckpt.get("a").untyped_storage().data_ptr()
        joined = ckpt.read_concatenated(groups)
        for names, tensor in zip(groups, joined, strict=True):
            assert tensor is not None
            assert torch.equal(tensor, torch.cat([tensors[n] for n in names]))
            in_place = tensor.untyped_storage().data_ptr() == mapped
            assert in_place == (names in (["a", "b"], ["a", "b", "c"])), names
            assert ckpt.joins_in_place(names) == in_place
        assert not ckpt.joins_in_place(["a", "b"], torch.float16)  # a cast copies
        assert ckpt.loaded_bytes() == 10 * 4 * 4 and ckpt.loaded_bytes(torch.bfloat16) == 80


def test_split_rows_are_views() -> None:
    torch.manual_seed(0)
    fused = torch.nn.Linear(8, 10)
    parts = split_rows(fused, [6, 2, 2])
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), fused(x))
    assert parts[1].weight.data_ptr() == fused.weight[6:].data_ptr()
    with pytest.raises(ValueError, match="do not add up"):
        split_rows(fused, [6, 2])


def test_too_big_to_pack_keeps_separate_views(
    llama_dir: Path, too_big_to_pack: None, tmp_path: Path
) -> None:
    import transformers as tf

    big = rx.load(llama_dir)
    report = big.load_report
    assert report.layout == {"qkv": "separate"}  # gate/up lie in order: fused, mapped
    assert big.config["hyper"]["qkv"] == "separate" and big.config["hyper"]["fused_gate_up"]
    assert "not packed" in report.packing and "automatic limit" in report.packing
    assert "hyper.qkv = 'separate'" in str(report)
    sizes = {f.stat().st_size for f in report.files}
    for layer in big.decoder.layers:
        attention, feed_forward = layer.attention, layer.feed_forward
        assert not hasattr(attention, "qkv_proj") and feed_forward.fused
        for linear in (attention.q_proj, attention.k_proj, feed_forward.gate_up_proj):
            assert linear.weight.untyped_storage().nbytes() in sizes  # the file's map
    fused = rx.load(llama_dir, pack=True)  # packing copies anyway: fused
    assert fused.load_report.layout == {} and hasattr(fused.decoder.layers[0].attention, "qkv_proj")
    assert "packed (pack=true" in fused.load_report.packing
    hf = tf.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(big(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(fused(ids).logits, expected, atol=1e-5, rtol=0)

    rx.save(big, tmp_path / "saved")
    again = rx.load(tmp_path / "saved")
    assert again.config["hyper"]["qkv"] == "separate"
    assert again.state_dict().keys() == big.state_dict().keys()
    for name, value in big.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    exported = rx.export_hf(big, tmp_path / "exported")
    with torch.no_grad():
        back = tf.AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
    torch.testing.assert_close(back, expected, atol=0, rtol=0)


def test_small_models_fuse_by_copy(llama_dir: Path) -> None:
    model = rx.load(llama_dir, pack=False)
    assert model.load_report.layout == {} and model.config["hyper"]["qkv"] == "fused"
    assert hasattr(model.decoder.layers[0].attention, "qkv_proj")
    assert model.load_report.packing == "off (pack=false)"


def test_packing_is_a_named_step(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    auto = rx.load(checkpoints["bert"])
    assert "linear layers packed (automatic" in auto.load_report.packing
    assert "packing for the CPU: " in str(auto.load_report)
    assert (
        "not packed: weights neither"
        in rx.load(checkpoints["bert"], dtype="float16").load_report.packing
    )
    rx.save(auto, tmp_path / "saved")
    config = tmp_path / "saved" / "config.cfg"
    text = config.read_text(encoding="utf8")

    config.write_text(text + "\n[load]\npack = false\n", encoding="utf8")
    off = rx.load(tmp_path / "saved")
    assert off.load_report.packing == "off (pack=false)"
    assert not any(isinstance(m, packed_linear.PackedLinear) for m in off.modules())
    on = rx.load(tmp_path / "saved", pack=True)  # the argument wins
    assert any(isinstance(m, packed_linear.PackedLinear) for m in on.modules())

    config.write_text(text + '\n[load]\npack = "yes"\n', encoding="utf8")
    with pytest.raises(ConfigError, match=r"\[load.pack\] expected true, false or null"):
        rx.load(tmp_path / "saved")
    config.write_text(text + "\n[load]\npacking = true\n", encoding="utf8")
    with pytest.raises(ConfigError, match=r"\[load.packing\] unknown setting"):
        rx.load(tmp_path / "saved")
