"""Hub ids as sources, fetch and its dry run, offline use and the shared cache, against a fake Hub
on loopback (tests/fake_hub.py) that the real huggingface_hub client talks to."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import write_hf_checkpoint
from fake_hub import FakeHub
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf import errors
from registry_xf.cli import main
from registry_xf.loading import hub as rx_hub

TEXTS = ["the cat sat on the mat", "hello world", "a dog ran"]


def tiny_model(directory: Path, seed: int) -> Path:
    write_hf_checkpoint(directory, "bert", seed=seed)
    write_tokenizer(directory)
    return directory


def shard(directory: Path) -> Path:
    """Split model.safetensors into two shards and their index, as save_pretrained does."""
    tensors = load_file(directory / "model.safetensors")
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
    (directory / "model.safetensors").unlink()
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local model directories, the truth each Hub download is compared with."""
    root = tmp_path_factory.mktemp("hub-models")
    return {
        "old": tiny_model(root / "old", seed=1),
        "new": tiny_model(root / "new", seed=2),
        "sharded": shard(tiny_model(root / "sharded", seed=3)),
    }


def set_online(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point the client at ``url``; the suite runs offline, so undo that for this test."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    # sentence-transformers reaches the Hub through the constants read at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )


def set_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: dict[str, Path]
) -> Iterator[FakeHub]:
    server = FakeHub().start()
    server.old_commit = server.add("org/tiny", models["old"], branch="v1")  # type: ignore[attr-defined]
    server.add("org/tiny", models["new"])
    server.add("org/sharded", models["sharded"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    set_online(monkeypatch, server.url)
    try:
        yield server
    finally:
        server.stop()


def hidden(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[2, 5, 17, 30, 3], [2, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        return model(ids, mask).last_hidden_state


def assert_same_model(got: torch.nn.Module, directory: Path) -> None:
    torch.testing.assert_close(hidden(got), hidden(rx.load(directory)), atol=0, rtol=0)


def test_repo_id_spelling() -> None:
    for text in ("org/name", "bert-base-uncased", "org/name@v1.0", "org/name@refs/pr/1"):
        assert rx_hub.looks_like_repo_id(text), text
    for text in ("./org/name", "/abs/path", "a/b/c", "~/model", "x.cfg", "org/m.safetensors"):
        assert not rx_hub.looks_like_repo_id(text), text
    for text in ("org/name@", "org//name", "org/-name", "org/na--me", "", "org/name@ v1"):
        assert not rx_hub.looks_like_repo_id(text), text
    assert rx_hub.split_revision("org/name@v1") == ("org/name", "v1")
    assert rx_hub.split_revision("org/name", "v2") == ("org/name", "v2")
    with pytest.raises(errors.HubError, match="two revisions"):
        rx_hub.split_revision("org/name@v1", "v2")


ID_PART = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,30}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda part: ".." not in part and "--" not in part and not part.endswith((".cfg", ".json"))
)
REVISION = st.from_regex(r"[A-Za-z0-9._/-]{1,40}", fullmatch=True).filter(
    lambda rev: ".." not in rev
)
FUZZ_CASES = int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "200"))


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True)
@given(org=ID_PART, name=ID_PART, revision=st.none() | REVISION)
def test_repo_id_round_trip(org: str, name: str, revision: str | None) -> None:
    source = f"{org}/{name}" + (f"@{revision}" if revision else "")
    assert rx_hub.looks_like_repo_id(source)
    assert rx_hub.split_revision(source) == (f"{org}/{name}", revision or "main")
    for path in (f"./{source}", f"/{source}", f"{org}/{name}/x", f"~/{name}"):
        assert not rx_hub.looks_like_repo_id(path)


@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True)
@given(text=st.text(max_size=60))
def test_any_text_is_judged_without_error(text: str) -> None:
    if rx_hub.looks_like_repo_id(text):
        repo_id, revision = rx_hub.split_revision(text)
        assert "/" not in repo_id.split("/", 1)[-1] and revision
    else:
        with pytest.raises(errors.HubError, match="not a Hub id"):
            rx_hub.split_revision(text)


def test_main_and_pinned_revision(hub: FakeHub, models: dict[str, Path]) -> None:
    new = rx.load("org/tiny")
    assert_same_model(new, models["new"])
    commit = hub.old_commit  # type: ignore[attr-defined]
    for old in (rx.load("org/tiny", revision=commit), rx.load(f"org/tiny@{commit}")):
        assert_same_model(old, models["old"])
    requests = len(hub.log)
    assert_same_model(rx.load(f"org/tiny@{commit}"), models["old"])
    assert len(hub.log) == requests  # a cached commit is final: the Hub is not asked
    assert_same_model(rx.load("org/tiny@v1"), models["old"])
    assert not torch.equal(hidden(new), hidden(old))
    assert new.tokenizer is not None
    assert len(new.tokenizer.encode(TEXTS)) == len(TEXTS)


def test_sharded(hub: FakeHub, models: dict[str, Path]) -> None:
    assert_same_model(rx.load("org/sharded"), models["sharded"])
    shards = [p for p in hub.downloads() if "-of-00002.safetensors" in p]
    assert len(shards) == 2


def test_a_saved_model_on_the_hub(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    """A repository holding what registry_xf's save writes (config.cfg, meta.json) loads."""
    saved = rx.save(rx.load(models["old"]), tmp_path / "saved")
    hub.add("org/saved", saved)
    loaded = rx.load("org/saved", local_files_only=False)
    assert loaded.record.origin.kind == "saved" and loaded.tokenizer is not None
    assert_same_model(loaded, models["old"])
    fetched = {p.name for p in rx_hub.download("org/saved").iterdir()}
    assert {"config.cfg", "meta.json", "model.safetensors"} <= fetched


def test_local_directory_wins(
    hub: FakeHub, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "org" / "tiny"
    shutil.copytree(models["old"], local)
    monkeypatch.chdir(tmp_path)
    assert_same_model(rx.load("org/tiny"), models["old"])  # the directory, not main
    with pytest.raises(rx.CheckpointError, match="a local path has no revision"):
        rx.load("org/tiny", revision="v1")
    assert hub.log == []
    assert_same_model(rx.load("org/tiny@v1"), models["old"])  # no such directory: the Hub
    assert hub.downloads()


def test_pickles_never_requested(hub: FakeHub, models: dict[str, Path]) -> None:
    both = {p.name: p.read_bytes() for p in models["new"].iterdir()}
    hub.add("org/both", {**both, "pytorch_model.bin": b"pickle", "tf_model.h5": b"h5"})
    assert_same_model(rx.load("org/both"), models["new"])
    assert hub.requested(".bin") == [] and hub.requested(".h5") == []
    assert hub.requested("/resolve/" + hub.repos["org/both"].refs["main"] + "/model.safetensors")


def test_pickles_only(hub: FakeHub, models: dict[str, Path]) -> None:
    config = (models["new"] / "config.json").read_bytes()
    hub.add("org/pickled", {"config.json": config, "pytorch_model.bin": b"pickle"})
    with pytest.raises(errors.HubNoSafetensorsError) as info:
        rx.load("org/pickled")
    assert "org/pickled" in str(info.value) and "pytorch_model.bin" in str(info.value)
    assert hub.downloads() == []  # decided from the listing: nothing was downloaded


def test_missing_repository_revision_and_file(hub: FakeHub, models: dict[str, Path]) -> None:
    with pytest.raises(errors.HubRepoNotFoundError, match="org/nothing"):
        rx.load("org/nothing")
    with pytest.raises(errors.HubRevisionNotFoundError, match="org/tiny: no revision 'v9'"):
        rx.load("org/tiny@v9")
    weights = (models["new"] / "model.safetensors").read_bytes()
    hub.add("org/no-config", {"model.safetensors": weights})
    with pytest.raises(errors.HubFileNotFoundError, match=r"org/no-config@main: no config.json"):
        rx.load("org/no-config")
    files = {p.name: p.read_bytes() for p in models["sharded"].iterdir()}
    del files["model-00002-of-00002.safetensors"]
    hub.add("org/lost-shard", files)
    with pytest.raises(errors.HubFileNotFoundError, match="model-00002-of-00002.safetensors"):
        rx.load("org/lost-shard")


def test_gated(hub: FakeHub, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("org/gated", models["new"], gated_token="hf_secret")
    with pytest.raises(errors.HubAccessError, match="org/gated@main: config.json: a gated"):
        rx.load("org/gated")
    assert [r.status for r in hub.requested("/config.json")] == [401]
    monkeypatch.setenv("HF_TOKEN", "hf_secret")  # honoured by the client
    assert_same_model(rx.load("org/gated"), models["new"])
    hub.add("org/private", models["new"])
    hub.repos["org/private"].forbidden = True
    with pytest.raises(errors.HubAccessError, match=r"org/private@main: config.json: .*HTTP 403"):
        rx.fetch("org/private", progress=False)


def test_server_dies_mid_download(
    hub: FakeHub, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.file_download as client

    # the client retries a broken download five times, a second apart: skip the waits only
    monkeypatch.setattr(client, "time", SimpleNamespace(sleep=lambda seconds: None))
    hub.break_after = ("model.safetensors", 4096)
    with pytest.raises(errors.HubConnectionError, match="org/tiny@main: model.safetensors"):
        rx.fetch("org/tiny", progress=False)
    assert not hub.running
    storage = Path(rx_hub.cache_dir()) / "models--org--tiny"
    assert not list(storage.rglob("*.safetensors")) and not list(storage.rglob("*.incomplete"))
    with pytest.raises(errors.HubNotCachedError, match="registry-xf fetch org/tiny"):
        rx.load("org/tiny", local_files_only=True)
    snapshot = next((storage / "snapshots").iterdir())
    with pytest.raises(rx.CheckpointError):
        rx.load(snapshot)  # what was written is not a model
    again = FakeHub().start()  # the Hub is back
    again.repos = hub.repos
    set_online(monkeypatch, again.url)
    try:
        assert rx.fetch("org/tiny", progress=False) == snapshot
    finally:
        again.stop()
    set_offline(monkeypatch)
    assert_same_model(rx.load("org/tiny"), models["new"])


def test_offline_after_fetch(
    hub: FakeHub,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = rx.fetch("org/tiny", progress=False)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert rx.fetch("org/tiny", revision="v1", progress=False) != path
    hub.stop()
    requests = len(hub.log)
    # unreachable but cached: the cached snapshot, with a warning
    assert_same_model(rx.load("org/tiny"), models["new"])
    assert "could not be reached" in caplog.text and f"using the cached {path}" in caplog.text
    with pytest.raises(errors.HubConnectionError, match="org/sharded@main: the Hub at"):
        rx.load("org/sharded")
    assert len(hub.log) == requests
    set_offline(monkeypatch)
    assert_same_model(rx.load("org/tiny"), models["new"])
    assert_same_model(rx.load("org/tiny@v1"), models["old"])
    with pytest.raises(errors.HubNotCachedError, match="`registry-xf fetch org/sharded`"):
        rx.load("org/sharded")
    with pytest.raises(errors.HubNotCachedError, match="registry-xf fetch org/tiny --revision v2"):
        rx.load("org/tiny", revision="v2")


def test_dry_run(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "--dry-run", "org/tiny", "org/sharded"]) == 0
    out = capsys.readouterr().out
    plan = rx_hub.plan("org/sharded")
    assert [f.name for f in plan.files][-2:] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    sizes = {f.name: f.size for f in plan.files}
    assert sizes["config.json"] == len(hub.repos["org/sharded"].commits[plan.commit]["config.json"])
    assert f"{len(plan.files)} files, {rx_hub.human_size(plan.total_bytes)}" in out
    assert "model.safetensors " in out and "tokenizer.json" in out
    # only the shard index was read, into memory: nothing downloaded, nothing written
    assert [p.rsplit("/", 1)[-1] for p in hub.downloads()] == ["model.safetensors.index.json"] * 2
    assert not rx_hub.cache_dir().exists() or not any(rx_hub.cache_dir().rglob("*.json"))


def test_cli(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "org/tiny", "--revision", "v1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("org/tiny: ") and Path(out.split(": ", 1)[1]).is_dir()
    assert main(["embed", "--model", "org/tiny@v1", *TEXTS]) == 0
    assert "3 embeddings of width 32 (org/tiny@v1)" in capsys.readouterr().out
    assert main(["fetch", "org/tiny", "org/absent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("registry-xf fetch: error: org/absent: no such repository")


def sentence_transformer(directory: Path) -> Path:
    from sentence_transformers import SentenceTransformer, models

    source = tiny_model(directory.parent / f"{directory.name}-hf", seed=4)
    modules = [models.Transformer(str(source)), models.Pooling(32, "mean"), models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save_pretrained(str(directory))
    return directory


def test_shared_with_sentence_transformers(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    st_dir = sentence_transformer(tmp_path / "st")
    hub.add("org/st-first", st_dir)
    hub.add("org/rx-first", st_dir)
    cache = str(rx_hub.cache_dir())
    reference = SentenceTransformer("org/st-first", cache_folder=cache, device="cpu").encode(TEXTS)
    rx.fetch("org/rx-first", progress=False)
    hub.stop()
    set_offline(monkeypatch)
    ours = rx.Embedder("org/st-first").embed(TEXTS)  # cached by sentence-transformers
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    theirs = SentenceTransformer(
        "org/rx-first", cache_folder=cache, device="cpu", local_files_only=True
    ).encode(TEXTS)  # cached by registry_xf
    np.testing.assert_allclose(theirs, reference, atol=1e-5, rtol=0)


def test_environment_read_at_call_time(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert rx_hub.cache_dir() == tmp_path / "elsewhere"
    assert rx.fetch("org/tiny", progress=False).is_relative_to(tmp_path / "elsewhere")
    monkeypatch.delenv("HF_HUB_CACHE")
    assert rx_hub.cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the client's constant still says online
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    requests = len(hub.log)
    with pytest.raises(errors.HubNotCachedError):
        rx.load("org/tiny")
    assert len(hub.log) == requests  # no connection was made


def test_every_entry_point_takes_a_hub_id(
    hub: FakeHub, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """One path from source to model: build, config_from_hf, Embedder, the CLI's config and
    the spaCy component all take the same Hub id as load."""
    built = rx.build("org/tiny@v1")
    assert all(p.device.type == "meta" for p in built.parameters())
    assert built.record.origin.repo_id == "org/tiny" and built.record.origin.revision == "v1"
    config = rx.config_from_hf("org/tiny", revision="v1")
    assert config["weights"]["path"] == str(rx_hub.download("org/tiny@v1"))
    loaded = rx.load("org/tiny", revision="v1")
    assert_same_model(loaded, models["old"])
    embedder = rx.Embedder("org/tiny@v1")
    expected = rx.Embedder(rx.load(models["old"])).embed(TEXTS)
    assert (embedder.embed(TEXTS) == expected).all()
    assert main(["config", "org/tiny", "--revision", "v1"]) == 0
    assert "registry_xf.HFBert.v1" in capsys.readouterr().out

    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("registry_xf_transformer", config={"model": {"source": "org/tiny@v1"}})
    doc = nlp("the cat sat on the mat")
    assert doc.tensor.shape[0] == len(doc)


def test_a_saved_sentence_transformers_model_on_the_hub_verifies(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A saved model that is also a sentence-transformers folder (config.json, module
    configs beside config.cfg) is fetched whole: every file meta.json records, so that
    verify=True passes on the download and the pooler comes back."""
    from test_st_export import write_dense

    model = rx.load(write_dense(tmp_path / "st", "mean", True, True))
    saved = rx.save(model, tmp_path / "saved")
    hub.add("org/saved-st", saved)
    loaded = rx.load("org/saved-st", local_files_only=False, verify=True)
    assert repr(loaded.pooler) == repr(model.pooler)
    snapshot = rx_hub.download("org/saved-st")
    recorded = set(json.loads((saved / "meta.json").read_text())["sha256"])
    fetched = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert recorded <= fetched, recorded - fetched
