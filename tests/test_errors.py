"""Bad input gives a typed registry_xf error that says where the problem is, and leaves
nothing half-done: no half-loaded model, no half-written directory."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, random_batch
from safetensors.torch import load_file, save_file
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.loading.weights import SafetensorsWeights


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def weights_file(directory: Path) -> Path:
    return (directory / "model.safetensors").resolve()


def leftovers(directory: Path) -> list[str]:
    """Everything in ``directory``, hidden temporary directories included."""
    return sorted(p.name for p in directory.iterdir())


# --- checkpoint files --------------------------------------------------------------------


def test_truncated_safetensors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_checkpoint(checkpoints["bert"], tmp_path / "bert")
    data = weights_file(directory).read_bytes()
    weights_file(directory).write_bytes(data[: len(data) // 2])
    with pytest.raises(rx.CheckpointError) as info:
        rx.load(directory)
    assert str(weights_file(directory)) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


@pytest.mark.parametrize("size", [7, 5000])
def test_corrupt_safetensors(checkpoints: dict[str, Path], tmp_path: Path, size: int) -> None:
    directory = copy_checkpoint(checkpoints["bert"], tmp_path / "bert")
    weights_file(directory).write_bytes(random.Random(size).randbytes(size))
    with pytest.raises(rx.CheckpointError) as info:
        rx.load(directory)
    assert str(weights_file(directory)) in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(rx.CheckpointError, match="nor a Hub id") as info:
        rx.load(tmp_path / "no-such-model")
    assert str(tmp_path / "no-such-model") in str(info.value)


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(rx.CheckpointError, match="config.json") as info:
        rx.load(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_config_json_without_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "no-weights"
    directory.mkdir()
    shutil.copy(checkpoints["bert"] / "config.json", directory)
    with pytest.raises(rx.CheckpointError, match="no model.safetensors"):
        rx.load(directory)


class Unpickled:
    """A pickle that creates ``marker`` when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def test_pickles_are_never_loaded(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    only_bin = tmp_path / "only-bin"
    only_bin.mkdir()
    (only_bin / "pytorch_model.bin").write_bytes(pickle.dumps(Unpickled(marker)))
    with pytest.raises(rx.CheckpointError, match="pytorch_model.bin.*never loaded"):
        rx.load(only_bin)
    with pytest.raises(rx.CheckpointError, match="expected a .cfg file or a model directory"):
        rx.load(only_bin / "pytorch_model.bin")

    hf_bin = tmp_path / "hf-bin"  # an HF directory as older transformers wrote them
    hf_bin.mkdir()
    shutil.copy(checkpoints["bert"] / "config.json", hf_bin)
    shutil.copy(only_bin / "pytorch_model.bin", hf_bin)
    with pytest.raises(rx.CheckpointError, match="pytorch_model.bin.*never loaded") as info:
        rx.load(hf_bin)
    assert str(hf_bin.resolve()) in str(info.value)

    config = rx.config_from_hf(checkpoints["bert"])  # a .cfg naming the pickle itself
    config["weights"]["path"] = str(hf_bin / "pytorch_model.bin")
    cfg = tmp_path / "model.cfg"
    config.to_disk(cfg, interpolate=False)
    with pytest.raises(rx.CheckpointError, match="only .safetensors") as info:
        rx.load(cfg)
    assert "pytorch_model.bin" in str(info.value)
    assert not marker.exists()


def test_shard_index_outside_the_model_directory(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    tensors = load_file(checkpoints["bert"] / "model.safetensors")
    save_file(tensors, tmp_path / "outside.safetensors")
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(checkpoints["bert"] / "config.json", directory)
    index = directory / "model.safetensors.index.json"
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        index.write_text(json.dumps({"weight_map": dict.fromkeys(tensors, name)}))
        with pytest.raises(rx.CheckpointError, match="outside the model directory") as info:
            rx.load(directory)
        assert str(index.resolve()) in str(info.value) and repr(name) in str(info.value)
    # a link inside the directory pointing outside it is refused too
    (directory / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index.write_text(json.dumps({"weight_map": dict.fromkeys(tensors, "link.safetensors")}))
    with pytest.raises(rx.CheckpointError, match="outside the model directory"):
        rx.load(directory)


def test_bad_shard_index(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(checkpoints["bert"] / "config.json", directory)
    index = directory / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(rx.CheckpointError, match="not a valid shard index"):
        rx.load(directory)
    index.write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(rx.CheckpointError, match="'missing.safetensors' is missing"):
        rx.load(directory)


def test_sharded_checkpoint_loads(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    tensors = load_file(checkpoints["bert"] / "model.safetensors")
    directory = tmp_path / "sharded"
    directory.mkdir()
    shutil.copy(checkpoints["bert"] / "config.json", directory)
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

    sharded = rx.load(directory)
    single = rx.load(checkpoints["bert"])
    assert len(sharded.load_report.files) == 2
    ids, mask = random_batch()
    with torch.no_grad():
        expected = single(ids, mask).last_hidden_state
        assert torch.equal(sharded(ids, mask).last_hidden_state, expected)

    # the same tensor in two shards is ambiguous: refused
    second = "model-00002-of-00002.safetensors"
    duplicated = {k: tensors[k] for k in [*halves[second], names[0]]}
    save_file(duplicated, directory / second)
    with pytest.raises(rx.CheckpointError, match=f"{names[0]!r} also appears in"):
        rx.load(directory)


# --- weights that do not fit -------------------------------------------------------------


def test_shape_mismatch_names_key_and_shapes(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(rx.LoadError) as info:
        rx.load(checkpoints["bert"], overrides={"hyper.intermediate_width": 40})
    message = str(info.value)
    assert "shape mismatch" in message
    expected = "model expects [40, 32], checkpoint has [37, 32]"
    assert f"layers.0.feed_forward.up_proj.weight: {expected}" in message
    assert "encoder.layer.0.intermediate.dense.weight" in message
    assert str(weights_file(checkpoints["bert"])) in message


def broken_checkpoint(source: Path, target: Path) -> Path:
    """``source`` with one tensor removed and one unknown tensor added."""
    directory = copy_checkpoint(source, target)
    tensors = load_file(directory / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.weight"]
    tensors["encoder.layer.1.extra.weight"] = torch.zeros(3)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_missing_and_unexpected_keys(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = broken_checkpoint(checkpoints["bert"], tmp_path / "broken")
    with pytest.raises(rx.LoadError) as info:
        rx.load(directory)
    message = str(info.value)
    assert "missing" in message and "unexpected" in message
    assert "layers.1.feed_forward.down_proj.weight" in message
    assert "encoder.layer.1.output.dense.weight" in message  # the HF name it comes from
    assert "encoder.layer.1.extra.weight" in message
    assert "pooler.dense.weight" in message  # skipped task heads are reported, not errors


def test_failed_load_assigns_nothing(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = broken_checkpoint(checkpoints["bert"], tmp_path / "broken")
    model = rx.build(rx.config_from_hf(directory))  # on meta
    weights = SafetensorsWeights(directory, rx.registry.converters.get("registry_xf.HFBert.v1")())
    with pytest.raises(rx.LoadError):
        weights.load_into(model)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # not half-loaded

    # the same checkpoint with the differences allowed loads, and only the missing
    # tensor is initialised afresh
    weights = SafetensorsWeights(
        directory,
        weights.converter,
        allow_unexpected=[r"\.extra\."],
        allow_missing=[r"^layers\.1\.feed_forward\.down_proj\.weight$"],
    )
    report = weights.load_into(model)
    assert report.ok and "encoder.layer.1.extra.weight" in report.skipped
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    reference = rx.load(checkpoints["bert"])
    ours, theirs = model.state_dict(), reference.state_dict()
    for name, tensor in theirs.items():
        same = torch.equal(ours[name], tensor)
        assert same == (name != "layers.1.feed_forward.down_proj.weight"), name


def test_allow_lists_through_overrides(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = broken_checkpoint(checkpoints["bert"], tmp_path / "broken")
    with pytest.raises(rx.LoadError) as info:
        rx.load(directory, overrides={"weights.allow_unexpected": [r"\.extra\."]})
    assert "encoder.layer.1.extra.weight" not in str(info.value).split("skipped")[0]
    model = rx.load(
        directory,
        overrides={
            "weights.allow_unexpected": [r"\.extra\."],
            "weights.allow_missing": [r"down_proj"],
        },
    )
    assert model.load_report.ok


# --- configs -----------------------------------------------------------------------------


def written_config(
    checkpoints: dict[str, Path], path: Path, *replacements: tuple[str, str]
) -> Path:
    """The filled config of the tiny BERT, with text replaced, written to ``path``."""
    text = rx.config_from_hf(checkpoints["bert"]).to_str(interpolate=False)
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text, encoding="utf8")
    return path


def test_unknown_registered_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cfg = written_config(
        checkpoints,
        tmp_path / "typo.cfg",
        ('"registry_xf.SelfAttention.v1"', '"registry_xf.SelfAtention.v1"'),
    )
    for attempt in (lambda: rx.load(cfg), lambda: rx.build(cfg)):
        with pytest.raises(rx.ConfigError) as info:
            attempt()
        error = info.value
        assert len(error.problems) == 1
        assert error.problems[0].path == "model.layers.layer.attention.@layers"
        message = str(error)
        assert str(cfg) in message
        assert "'registry_xf.SelfAtention.v1' is not registered in registry 'layers'" in message
        assert "Did you mean 'registry_xf.SelfAttention.v1'" in message


def test_unknown_registry(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cfg = written_config(
        checkpoints, tmp_path / "typo.cfg", ('@architectures = "', '@architecture = "')
    )
    with pytest.raises(rx.ConfigError, match=r"\[model\.@architecture\].*'architectures'"):
        rx.build(cfg)


def test_every_wrong_value_in_one_error(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    cfg = written_config(
        checkpoints,
        tmp_path / "wrong.cfg",
        ("n_heads = ${hyper.n_heads}", 'n_heads = "many"'),
        ("backend = ${hyper.attention_backend}", 'backend = "fast"'),
        ("activation = ${hyper.activation}", 'activation = "gelux"'),
    )
    with pytest.raises(rx.ConfigError) as info:
        rx.load(cfg)
    error = info.value
    by_path = {p.path: str(p) for p in error.problems}
    assert set(by_path) == {
        "model.layers.layer.attention.n_heads",
        "model.layers.layer.attention.backend",
        "model.layers.layer.feed_forward.activation",
    }
    assert "'many'" in by_path["model.layers.layer.attention.n_heads"]
    assert "'sdpa' or 'eager'" in by_path["model.layers.layer.attention.backend"]
    assert "Did you mean 'gelu'" in by_path["model.layers.layer.feed_forward.activation"]
    assert str(error).startswith(f"3 problem(s) in config in {cfg}")

    # the same values given as overrides of [hyper] are found in the same way
    with pytest.raises(rx.ConfigError) as info:
        rx.load(
            checkpoints["bert"],
            overrides={
                "hyper.n_heads": "many",
                "hyper.attention_backend": "fast",
                "hyper.activation": "gelux",
            },
        )
    assert {p.path for p in info.value.problems} == set(by_path)


def test_constructor_errors_name_the_component(checkpoints: dict[str, Path]) -> None:
    # valid types, but an impossible combination: found when the component is built
    with pytest.raises(rx.ConfigError) as info:
        rx.load(checkpoints["bert"], overrides={"hyper.n_heads": 5})
    assert [p.path for p in info.value.problems] == ["model.layers.layer.attention"]
    assert "width 32 is not divisible by n_heads 5" in str(info.value)


def test_unsupported_model_type(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_checkpoint(checkpoints["bert"], tmp_path / "mamba")
    config_json = directory / "config.json"
    hf = json.loads(config_json.read_text())
    config_json.write_text(json.dumps({**hf, "model_type": "mamba"}))
    with pytest.raises(rx.UnsupportedModelError) as info:
        rx.load(directory)
    message = str(info.value)
    assert str(config_json.resolve()) in message and "'mamba'" in message
    for supported in ("albert", "bert", "distilbert", "electra", "roberta", "xlm-roberta"):
        assert supported in message.split("Supported model types:")[1]

    config_json.write_text(json.dumps({**hf, "position_embedding_type": "relative_key"}))
    with pytest.raises(rx.UnsupportedModelError) as info:
        rx.load(directory)
    message = str(info.value)
    assert str(config_json.resolve()) in message
    assert "'relative_key'" in message and "'absolute'" in message

    config_json.write_text("[1, 2]")
    with pytest.raises(rx.CheckpointError, match="expected a JSON object"):
        rx.load(directory)


# --- inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(checkpoints: dict[str, Path]) -> rx.Encoder:
    return rx.load(checkpoints["bert"])


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_out_of_range(bert: rx.Encoder, bad: int) -> None:
    ids = torch.tensor([[2, 5, bad, 3]])
    with pytest.raises(rx.InputError, match=f"token id {bad} is out of range.*{VOCAB} ids"):
        bert(ids)


def test_token_type_ids_out_of_range(bert: rx.Encoder) -> None:
    ids = torch.tensor([[2, 5, 6, 3]])
    for bad in (2, -1):
        with pytest.raises(rx.InputError, match=f"token type id {bad} is out of range"):
            bert(ids, token_type_ids=torch.tensor([[0, 0, bad, 0]]))


def test_badly_shaped_inputs(bert: rx.Encoder) -> None:
    with pytest.raises(rx.InputError, match=r"\(batch, seq\)"):
        bert(torch.tensor([2, 5, 3]))
    with pytest.raises(rx.InputError, match="attention_mask shape"):
        bert(torch.tensor([[2, 5, 3]]), torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sequence_longer_than_positions(checkpoints: dict[str, Path], family: str) -> None:
    model = rx.load(checkpoints[family])
    limit = 64  # both tiny configs: BERT 64 positions, RoBERTa 66 less its padding offset
    assert model.max_positions == limit
    with torch.no_grad():
        model(torch.full((1, limit), 5))
        with pytest.raises(rx.InputError, match=f"{limit + 1} tokens is longer.*{limit} positions"):
            model(torch.full((1, limit + 1), 5))


# --- saving ------------------------------------------------------------------------------


def test_save_refuses_an_existing_directory(bert: rx.Encoder, tmp_path: Path) -> None:
    target = tmp_path / "saved"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    for overwrite in (False, True):  # not a saved model: never replaced
        with pytest.raises(rx.SaveError, match="overwrite=True") as info:
            rx.save(bert, target, overwrite=overwrite)
        assert str(target) in str(info.value) and "keep.txt" in str(info.value)
        assert leftovers(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "old"
        assert leftovers(tmp_path) == ["saved"]  # no temporary directory left

    model_dir = tmp_path / "model"
    rx.save(bert, model_dir)
    with pytest.raises(rx.SaveError, match="overwrite=True"):
        rx.save(bert, model_dir)
    rx.save(bert, model_dir, overwrite=True)  # a saved model is replaced as a whole
    assert "config.cfg" in leftovers(model_dir)
    assert leftovers(tmp_path) == ["model", "saved"]
    ids, mask = random_batch()
    with torch.no_grad():
        expected = bert(ids, mask).last_hidden_state
        assert torch.equal(rx.load(model_dir)(ids, mask).last_hidden_state, expected)


def test_save_of_a_meta_model_writes_nothing(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = rx.build(rx.config_from_hf(checkpoints["bert"]))  # no weights yet
    with pytest.raises(rx.RegistryXFError, match="meta tensor"):
        rx.save(model, tmp_path / "saved")
    assert leftovers(tmp_path) == []


def test_save_failing_midway_leaves_nothing(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = copy_checkpoint(checkpoints["bert"], tmp_path / "source")
    write_tokenizer(source)
    model = rx.load(source)
    assert model.tokenizer is not None
    (source / "tokenizer.json").unlink()  # the tokenizer is written after the weights
    with pytest.raises(rx.CheckpointError, match="tokenizer"):
        rx.save(model, tmp_path / "saved")
    assert leftovers(tmp_path) == ["source"]

    old = tmp_path / "old"
    rx.save(rx.load(checkpoints["bert"]), old)
    before = {name: (old / name).read_bytes() for name in leftovers(old)}
    with pytest.raises(rx.CheckpointError):
        rx.save(model, old, overwrite=True)
    assert {name: (old / name).read_bytes() for name in leftovers(old)} == before
    assert leftovers(tmp_path) == ["old", "source"]


def test_saved_tokenizer_travels(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = copy_checkpoint(checkpoints["bert"], tmp_path / "source")
    write_tokenizer(source)
    saved = rx.save(rx.load(source), tmp_path / "saved")
    shutil.rmtree(source)
    again = rx.load(saved)
    batch = again.tokenizer(["the cat sat"])
    assert batch.input_ids.tolist() == [[2, 5, 6, 7, 3]]


# --- masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_fully_masked_rows_stay_finite(
    checkpoints: dict[str, Path], family: str, backend: str
) -> None:
    model = rx.load(checkpoints[family], overrides={"hyper.attention_backend": backend})
    ids, mask = random_batch(3)
    mask[1] = 0  # a sequence with no real token at all
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
        alone = model(ids[2:], mask[2:]).last_hidden_state
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    assert torch.isfinite(out.last_hidden_state).all()
    # the empty row changes nothing for the others
    torch.testing.assert_close(out.last_hidden_state[2:], alone, atol=1e-5, rtol=0)
    for mode in ("mean", "max", "cls"):
        pooled = rx.Pooler(mode, normalize=True)(out.last_hidden_state, mask)
        assert torch.isfinite(pooled).all(), mode
