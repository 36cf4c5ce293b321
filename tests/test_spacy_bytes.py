"""Untrusted names: the spaCy component's from_bytes writes no file outside its own folder,
whatever names the bytes hold, and every name joined onto a path is checked first."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import srsly
from conftest import write_hf_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.loading.paths import safe_join

spacy = pytest.importorskip("spacy")

FACTORY = "registry_xf_transformer"


@pytest.fixture(scope="module")
def pipeline_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, bytes]:
    """A pipeline with the component on a tiny BERT, and the component's bytes."""
    source = write_hf_checkpoint(tmp_path_factory.mktemp("bytes") / "bert", "bert")
    write_tokenizer(source)
    nlp = spacy.blank("en")
    model = {"@architectures": "registry_xf.TransformerModel.v1", "source": str(source)}
    nlp.add_pipe(FACTORY, config={"model": model})
    nlp.initialize()
    return nlp, nlp.get_pipe(FACTORY).to_bytes()


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary-files folder of this test's own, so that what is left there is visible."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def fresh_component(pipeline_bytes: tuple[object, bytes]):  # type: ignore[no-untyped-def]
    nlp, _ = pipeline_bytes
    return spacy.blank("en").from_config(nlp.config).get_pipe(FACTORY)  # type: ignore[attr-defined]


def test_bytes_round_trip_with_plain_names(pipeline_bytes: tuple[object, bytes]) -> None:
    nlp, data = pipeline_bytes
    files = srsly.msgpack_loads(data)
    assert sorted(files) == [
        "model/config.cfg",
        "model/meta.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ]
    restored = fresh_component(pipeline_bytes).from_bytes(data)
    doc_a = nlp.get_pipe(FACTORY)(nlp.make_doc("the cat sat"))  # type: ignore[attr-defined]
    doc_b = restored(nlp.make_doc("the cat sat"))  # type: ignore[attr-defined]
    assert (doc_a.tensor == doc_b.tensor).all()


def escaping_names(tmp_path: Path) -> dict[str, Path]:
    """Names that would write outside the folder, and where each would land."""
    outside = tmp_path / "outside"
    return {
        "../escaped.txt": tmp_path / "escaped.txt",
        "model/../../escaped2.txt": tmp_path / "escaped2.txt",
        "../../../../../../../../../../" + str(outside / "deep.txt"): outside / "deep.txt",
        str(outside / "absolute.txt"): outside / "absolute.txt",
    }


@pytest.mark.parametrize("case", range(4))
def test_from_bytes_refuses_names_that_leave_its_folder(
    pipeline_bytes: tuple[object, bytes], private_tmp: Path, tmp_path: Path, case: int
) -> None:
    name, landing = list(escaping_names(private_tmp).items())[case]
    landing.parent.mkdir(parents=True, exist_ok=True)
    files = srsly.msgpack_loads(pipeline_bytes[1])
    # last, so that the good files are written (and must be removed again) before it
    crafted = srsly.msgpack_dumps({**files, name: b"written by untrusted bytes"})
    with pytest.raises(rx.UnsafePathError) as info:
        fresh_component(pipeline_bytes).from_bytes(crafted)
    assert repr(name) in str(info.value)
    assert not landing.exists()
    assert os.listdir(private_tmp) == (["outside"] if landing.parent.name == "outside" else [])


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("C:/windows/x.txt", "drive letter"),
        ("model\\..\\..\\x.txt", "backslash"),
        ("model/\x00.txt", "NUL"),
        ("model//config.cfg", "empty"),
        ("./model/x", "'.'"),
        ("", "empty"),
    ],
)
def test_from_bytes_refuses_odd_names(
    pipeline_bytes: tuple[object, bytes], private_tmp: Path, name: str, problem: str
) -> None:
    files = {**srsly.msgpack_loads(pipeline_bytes[1]), name: b"x"}
    with pytest.raises(rx.UnsafePathError, match=problem):
        fresh_component(pipeline_bytes).from_bytes(srsly.msgpack_dumps(files))
    assert os.listdir(private_tmp) == []


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1 not msgpack",
        srsly.msgpack_dumps(["model/config.cfg"]),
        srsly.msgpack_dumps({"model/config.cfg": "text, not bytes"}),
        srsly.msgpack_dumps({"model": b"a file", "model/config.cfg": b"and a folder"}),
        srsly.msgpack_dumps({}),
    ],
)
def test_from_bytes_refuses_bytes_of_another_shape(
    pipeline_bytes: tuple[object, bytes], private_tmp: Path, data: bytes
) -> None:
    with pytest.raises(rx.CheckpointError, match="from_bytes|registry_xf_transformer"):
        fresh_component(pipeline_bytes).from_bytes(data)
    assert os.listdir(private_tmp) == []


def test_safe_join_does_not_follow_a_link_out(tmp_path: Path) -> None:
    """A link already inside the root (not something bytes can make) is not followed out."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "model").symlink_to(tmp_path)
    with pytest.raises(rx.UnsafePathError, match="through a link"):
        safe_join(root, "model/config.cfg")


PARTS = st.sampled_from(["a", "b.txt", "..", ".", "", "C:", "\\", "x\\..", "\x00", "/", "ü"])


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="ab./\\:\x00C", max_size=12),
        st.lists(PARTS, max_size=5).map("/".join),
    )
)
def test_safe_join_stays_inside_or_refuses(name: str) -> None:
    root = Path(tempfile.gettempdir()) / "registry_xf_safe_join_root"
    try:
        joined = safe_join(root, name)
    except rx.UnsafePathError as e:
        assert repr(name) in str(e)
        return
    base = root.resolve()
    assert joined.resolve().is_relative_to(base) and joined != base
    assert ".." not in joined.relative_to(base).parts


def test_sentence_transformers_module_paths_are_checked(tmp_path: Path) -> None:
    source = write_hf_checkpoint(tmp_path / "st", "bert")
    outside = tmp_path / "pooling-elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "../pooling-elsewhere", "type": "x.Pooling"},
    ]
    (source / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(rx.UnsafePathError, match="pooling-elsewhere") as info:
        rx.load(source)
    assert str(source / "modules.json") in str(info.value)
    shutil.move(outside, source / "1_Pooling")
    modules[1]["path"] = "1_Pooling"
    (source / "modules.json").write_text(json.dumps(modules))
    assert rx.load(source).pooler is not None


def test_to_disk_replaces_only_its_own_model_folder(
    pipeline_bytes: tuple[object, bytes], tmp_path: Path
) -> None:
    component = pipeline_bytes[0].get_pipe(FACTORY)  # type: ignore[attr-defined]
    component.to_disk(tmp_path / "pipe")
    component.to_disk(tmp_path / "pipe")  # again: its own model is replaced
    assert sorted(os.listdir(tmp_path / "pipe")) == ["model"]
    (tmp_path / "other" / "model").mkdir(parents=True)
    (tmp_path / "other" / "model" / "notes.txt").write_text("mine")
    with pytest.raises(rx.SaveError, match="notes.txt"):
        component.to_disk(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(rx.SaveError, match="is a file"):
        component.to_disk(tmp_path / "file")
    assert (tmp_path / "other" / "model" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["file", "other", "pipe"]
