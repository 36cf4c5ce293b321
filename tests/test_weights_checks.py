"""What loading checks in a checkpoint's header before it reads a byte of data: every
tensor's dtype and shape, each part of a fused matrix on its own; how a checkpoint of
mixed floating dtypes loads; and shard links in the Hugging Face cache layout."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from safetensors_files import (
    DTYPE_BITS,
    GATE_UP,
    QKV,
    llama_tensors,
    read_raw,
    relabel,
    write_llama,
    write_raw,
)

import registry_xf as rx
from registry_xf.loading.checkpoint import (
    DTYPE_KINDS,
    FLOAT_DTYPES,
    open_checkpoint,
    stored_shapes,
)

NOT_FLOAT = [d for d in DTYPE_BITS if d not in FLOAT_DTYPES]
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def logits(model: rx.Decoder) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_every_safetensors_dtype_has_a_kind() -> None:
    assert set(DTYPE_KINDS) == set(DTYPE_BITS)
    assert {d for d, kind in DTYPE_KINDS.items() if kind == "float"} == set(FLOAT_DTYPES)


# --- dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [O_PROJ, QKV[1], GATE_UP[0]], ids=["plain", "qkv", "gate_up"])
@pytest.mark.parametrize("dtype", NOT_FLOAT)
def test_a_weight_stored_as_a_non_float_is_a_typed_error(
    tmp_path: Path, dtype: str, name: str
) -> None:
    write_llama(tmp_path)
    relabel(tmp_path / "model.safetensors", name, dtype)
    with pytest.raises(rx.LoadError) as info:
        rx.load(tmp_path)
    message = str(info.value)
    assert f"{name} in {tmp_path / 'model.safetensors'} is stored as {dtype}" in message
    assert "expects a floating-point tensor (F64, F32, F16, BF16)" in message
    assert "wrong dtype" in message and "0 tensors loaded" in message


@pytest.mark.parametrize("dtype", ["XYZ", "f32", "", "FLOAT32", 5, None, ["F32"]])
def test_a_dtype_safetensors_does_not_define_is_a_typed_error(
    tmp_path: Path, dtype: object
) -> None:
    write_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    header, data = read_raw(file)
    header[QKV[1]]["dtype"] = dtype
    write_raw(file, header, data)
    with pytest.raises(rx.CheckpointError) as info:
        rx.load(tmp_path)
    assert str(file) in str(info.value)
    if dtype is not None:
        assert f"{QKV[1]!r} has dtype {dtype!r}" in str(info.value)


# --- shapes of fused parts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes",
    [
        {QKV[1]: [32, 1]},  # broadcast into the key rows before this was checked
        {QKV[0]: [16, 32], QKV[1]: [32, 32]},  # rows traded: the joined shape is right
        {GATE_UP[0]: [20, 32], GATE_UP[1]: [28, 32]},
        {QKV[2]: [16, 32, 1]},
        {QKV[2]: []},
        {QKV[1]: [16, 33]},
        {QKV[1]: [0, 32]},
    ],
    ids=["key-32x1", "q-k-traded", "gate-up-traded", "extra-dim", "scalar", "columns", "empty"],
)
def test_each_fused_part_is_checked_against_the_config(
    tmp_path: Path, shapes: dict[str, list[int]]
) -> None:
    write_llama(tmp_path)
    for name, shape in shapes.items():
        relabel(tmp_path / "model.safetensors", name, "F32", shape)
    with pytest.raises(rx.LoadError) as info:
        rx.load(tmp_path)
    message = str(info.value)
    assert "shape mismatch" in message
    for name, shape in shapes.items():
        assert f"part {name} in {tmp_path / 'model.safetensors'} has shape {shape}" in message
    assert "made of parts of [32, 16, 16]" in message or "parts of [24, 24]" in message


def test_separate_projections_are_checked_one_by_one(tmp_path: Path) -> None:
    write_llama(tmp_path)
    relabel(tmp_path / "model.safetensors", QKV[1], "F32", [32, 1])
    with pytest.raises(rx.LoadError, match=r"k_proj.weight: model expects \[16, 32\]"):
        rx.load(tmp_path, overrides={"hyper.qkv": "separate"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(llama_tensors())),
    dtype=st.sampled_from(sorted(DTYPE_BITS)),
    shape=st.one_of(st.none(), st.lists(st.integers(0, 40), max_size=3)),
)
def test_a_tensor_loads_only_with_a_float_dtype_and_the_config_shape(
    name: str, dtype: str, shape: list[int] | None
) -> None:
    reference = llama_tensors()
    expected_shape = list(reference[name].shape)
    shape = expected_shape if shape is None else shape
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_llama(directory, reference)
        relabel(directory / "model.safetensors", name, dtype, shape)
        should_load = DTYPE_KINDS[dtype] == "float" and shape == expected_shape
        if not should_load:
            with pytest.raises((rx.LoadError, rx.CheckpointError)):
                rx.load(directory)
            return
        model = rx.load(directory)
    # a float tensor relabelled as another float is only seen as data: it loads, cast
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    cast = model.load_report.cast
    assert cast == (
        [] if dtype == "F32" else [f"{name} in {directory}/model.safetensors: {dtype} -> float32"]
    )
    if dtype == "F32":
        with tempfile.TemporaryDirectory() as tmp:
            write_llama(Path(tmp), reference)
            assert torch.equal(logits(model), logits(rx.load(tmp)))


# --- mixed floating dtypes ---------------------------------------------------------------


def test_one_float16_tensor_in_a_float32_checkpoint(tmp_path: Path) -> None:
    tensors = llama_tensors()
    tensors[QKV[1]] = tensors[QKV[1]].half()
    write_llama(tmp_path / "mixed", tensors)
    # the same values, all stored as float32
    write_llama(tmp_path / "uniform", {k: v.float() for k, v in tensors.items()})

    model = rx.load(tmp_path / "mixed")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.load_report.cast == [
        f"{QKV[1]} in {tmp_path / 'mixed' / 'model.safetensors'}: F16 -> float32"
    ]
    assert "cast to the model's floating dtype" in str(model.load_report)
    assert torch.equal(logits(model), logits(rx.load(tmp_path / "uniform")))


def test_the_dtype_of_most_bytes_wins(tmp_path: Path) -> None:
    tensors = llama_tensors(dtype=torch.bfloat16)
    norms = [k for k in tensors if k.endswith("norm.weight")]
    for k in norms:
        tensors[k] = tensors[k].float()  # as some checkpoints keep their norms
    write_llama(tmp_path, tensors)
    model = rx.load(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sorted(c.split(" ")[0] for c in model.load_report.cast) == sorted(norms)
    assert torch.isfinite(logits(model).float()).all()
    # a dtype asked for casts everything, and nothing is reported as cast
    asked = rx.load(tmp_path, dtype="float32")
    assert {p.dtype for p in asked.parameters()} == {torch.float32}
    assert asked.load_report.cast == []


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(sorted(FLOAT_DTYPES)), min_size=12, max_size=12))
def test_mixed_checkpoints_load_as_one_dtype_and_run(dtypes: list[str]) -> None:
    tensors = llama_tensors()
    stored = dict(zip(sorted(tensors), dtypes, strict=True))
    for name, dtype in stored.items():
        tensors[name] = tensors[name].to(FLOAT_DTYPES[dtype])
    nbytes: dict[str, int] = {}
    for name, dtype in stored.items():
        nbytes[dtype] = nbytes.get(dtype, 0) + tensors[name].nbytes
    most = max(nbytes.values())
    widest = max((d for d in nbytes if nbytes[d] == most), key=lambda d: FLOAT_DTYPES[d].itemsize)
    with tempfile.TemporaryDirectory() as tmp:
        write_llama(Path(tmp), tensors)
        model = rx.load(tmp)
    assert {p.dtype for p in model.parameters()} == {FLOAT_DTYPES[widest]}
    assert sorted(c.split(" ")[0] for c in model.load_report.cast) == sorted(
        name for name, dtype in stored.items() if dtype != widest
    )
    out = logits(model)
    assert out.dtype == FLOAT_DTYPES[widest] and torch.isfinite(out.float()).all()


# --- the Hugging Face cache layout -------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, files: dict[str, bytes]) -> Path:
    """``files`` laid out as huggingface_hub caches a download: contents in
    ``models--org--tiny/blobs/<sha256>``, relative links to them in the snapshot.
    Returns the snapshot directory."""
    repo = root / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        (blobs / digest).write_bytes(content)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


def sharded_files(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:5],
        "model-00002-of-00002.safetensors": names[5:],
    }
    files = {"config.json": (tmp_path / "plain" / "config.json").read_bytes()}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
        files[shard] = (tmp_path / shard).read_bytes()
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    return files


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_hub_cache_snapshots_load(tmp_path: Path, layout: str) -> None:
    tensors = write_llama(tmp_path / "plain")
    if layout == "sharded":
        files = sharded_files(tmp_path, tensors)
    else:
        files = {
            n: (tmp_path / "plain" / n).read_bytes() for n in ("config.json", "model.safetensors")
        }
    snapshot = hub_cache(tmp_path / "cache", files)
    assert all((snapshot / n).is_symlink() for n in files)
    model = rx.load(snapshot)
    assert model.load_report.ok and len(model.load_report.files) == (
        2 if layout == "sharded" else 1
    )
    assert all(f.parent == snapshot for f in model.load_report.files)  # named as in the snapshot
    assert torch.equal(logits(model), logits(rx.load(tmp_path / "plain")))


def test_hub_cache_links_elsewhere_are_refused(tmp_path: Path) -> None:
    tensors = write_llama(tmp_path / "plain")
    files = sharded_files(tmp_path, tensors)
    snapshot = hub_cache(tmp_path / "cache", files)
    # the same links in a folder that is not a cache repository are refused
    other = tmp_path / "not-a-cache" / "snapshots" / COMMIT
    other.mkdir(parents=True)
    shutil.copytree(snapshot.parent.parent / "blobs", other.parent.parent / "blobs")
    for name in files:
        (other / name).symlink_to(Path("..", "..", "blobs", (snapshot / name).resolve().name))
    with pytest.raises(rx.CheckpointError, match="outside the model directory"):
        rx.load(other)

    index = snapshot / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    first = "model-00001-of-00002.safetensors"
    blob = (snapshot / first).resolve()

    def refused(names: dict[str, str]) -> None:
        index.unlink()
        index.write_text(json.dumps({"weight_map": {**weight_map, **names}}))
        with pytest.raises(rx.CheckpointError, match="outside the model directory") as info:
            rx.load(snapshot)
        assert "refused" in str(info.value)

    # names that leave the directory, even to reach a blob, and absolute names
    refused(dict.fromkeys(weight_map, f"../../blobs/{blob.name}"))
    refused(dict.fromkeys(weight_map, str(blob)))
    # a link out of both the snapshot and the blobs
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(files[first])
    (snapshot / "elsewhere.safetensors").symlink_to(outside)
    refused({k: "elsewhere.safetensors" for k, v in weight_map.items() if v == first})


def test_saved_models_are_checked_the_same_way(tmp_path: Path) -> None:
    write_llama(tmp_path / "hf")
    rx.save(rx.load(tmp_path / "hf"), tmp_path / "saved")
    file = tmp_path / "saved" / "model.safetensors"
    qkv = "decoder.layers.0.attention.qkv_proj.weight"
    relabel(file, qkv, "U32")
    with pytest.raises(rx.LoadError, match=f"{qkv} in {file} is stored as U32"):
        rx.load(tmp_path / "saved")
    relabel(file, qkv, "F32", [64, 1])
    with pytest.raises(rx.LoadError, match=r"model expects \[64, 32\], checkpoint has \[64, 1\]"):
        rx.load(tmp_path / "saved")


def test_a_header_rewritten_in_place_is_read_again(tmp_path: Path) -> None:
    """Parsed headers are kept between loads, by their bytes: a header changed in place
    (same file, same size, within the file system's clock tick) is not taken for the old."""
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(4.0).reshape(4, 1), "b": torch.ones(2)}, file)
    with open_checkpoint(file) as ckpt:
        assert ckpt.get("a").dtype == torch.float32
    assert stored_shapes(file) == {"a": (4, 1), "b": (2,)}
    data = file.read_bytes()
    edited = data.replace(b'"dtype":"F32","shape":[4,1]', b'"dtype":"I32","shape":[1,4]')
    assert edited != data and len(edited) == len(data)
    with open(file, "r+b") as handle:  # the same inode, written at once
        handle.write(edited)
    with open_checkpoint(file) as ckpt:
        assert ckpt.get("a").dtype == torch.int32
        assert ckpt.get("a").shape == (1, 4)
    assert stored_shapes(file) == {"a": (1, 4), "b": (2,)}


def test_safetensors_checks_a_header_changed_after_it_accepted_it(tmp_path: Path) -> None:
    """A header safetensors accepted is not checked again at the next load; one changed in
    place (overlapping tensors, which only safetensors' own checks catch) is."""
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, file)
    for _ in range(2):  # the second open finds the header accepted
        with open_checkpoint(file) as ckpt:
            assert ckpt.get("b").tolist() == [1.0, 1.0]
    data = file.read_bytes()
    edited = data.replace(b'"data_offsets":[8,16]', b'"data_offsets":[0, 8]')
    assert edited != data and len(edited) == len(data)
    file.write_bytes(edited)
    with pytest.raises(rx.CheckpointError, match="model.safetensors"):
        with open_checkpoint(file):
            pass
