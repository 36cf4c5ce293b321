"""Saves: a killed save leaves the old model or the new one at the path, never none; the next
save or load cleans up after it; overwrite=True replaces only what registry_xf wrote; path
and permission errors are typed and leave nothing behind; files are flushed before the swap."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.loading import atomic
from registry_xf.loading.save import is_saved_model

HERE = Path(__file__).resolve().parent
FUZZ_CASES = max(50, int(os.environ.get("REGISTRY_XF_FUZZ_CASES", "50")))


def leftovers(directory: Path) -> list[str]:
    """Hidden entries that saves left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if ".registry_xf-" in p.name)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_models(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Two saved tiny BERTs with a tokenizer, ``a`` and ``b``, whose weights all differ."""
    root = tmp_path_factory.mktemp("two")
    source = shutil.copytree(checkpoints["bert"], root / "source")
    write_tokenizer(source)
    model = rx.load(source, pack=False)
    a = rx.save(model, root / "a")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    b = rx.save(model, root / "b")
    return {"a": a, "b": b}


class Worker:
    """tests/save_worker.py, started once: saves in forked children, killed on demand."""

    def __init__(self, a: Path, b: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "save_worker.py"), str(a), str(b)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **command: object) -> dict:  # type: ignore[type-arg]
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the save worker died"
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(two_models: dict[str, Path]) -> Iterator[Worker]:
    found = Worker(two_models["a"], two_models["b"])
    try:
        yield found
    finally:
        found.close()


def kill_saves(
    worker: Worker,
    two_models: dict[str, Path],
    root: Path,
    cases: int,
    seed: int,
    *,
    exchange: bool,
) -> dict[str, int]:
    """Save ``a`` and ``b`` in turn over one path, killing each save at a random moment
    spread over a save's measured duration; check the path after every save."""
    expected = {name: parameters(rx.load(path, pack=False)) for name, path in two_models.items()}
    target = root / "model"
    shutil.copytree(two_models["a"], target)
    current = "a"
    timings = [
        worker.ask(op="save", model=m, target=str(target), delay=60.0, exchange=exchange)
        for m in "bab"
    ]
    assert not any(t["killed"] or t["status"] for t in timings), timings
    duration = statistics.median(t["seconds"] for t in timings)
    rng = random.Random(seed)
    counts = {"finished": 0, "killed, old kept": 0, "killed, new in place": 0, "leftovers": 0}
    for case in range(cases):
        new = "b" if current == "a" else "a"
        delay = duration * 1.2 * (case + rng.random()) / cases  # stratified over the save
        answer = worker.ask(
            op="save", model=new, target=str(target), delay=delay, exchange=exchange
        )
        where = f"case {case} (kill after {delay * 1000:.1f} ms of a {duration * 1000:.1f} ms save)"
        if not answer["killed"]:
            assert answer["status"] == 0, f"{where}: the save failed"
            assert leftovers(root) == [], f"{where}: a finished save left {leftovers(root)}"
        counts["leftovers"] += bool(leftovers(root))
        if exchange:  # the path holds a whole model before anything repairs it
            assert is_saved_model(target), f"{where}: {sorted(os.listdir(root))}"
            assert not any("-old-" in name for name in leftovers(root)), where
        loaded = parameters(rx.load(target, pack=False))  # cleans up, may put back the old
        assert leftovers(root) == [], f"{where}: load left {leftovers(root)}"
        if same(loaded, expected[new]):
            key = "killed, new in place" if answer["killed"] else "finished"
            current = new
        else:
            assert same(loaded, expected[current]), f"{where}: neither the old nor the new model"
            assert answer["killed"], f"{where}: a finished save left the old model"
            key = "killed, old kept"
        counts[key] += 1
        assert sorted(os.listdir(root)) == ["model"], where
    final = "b" if current == "a" else "a"
    answer = worker.ask(op="save", model=final, target=str(target), delay=60.0, exchange=exchange)
    assert not answer["killed"] and answer["status"] == 0
    assert sorted(os.listdir(root)) == ["model"]
    assert same(parameters(rx.load(target, pack=False)), expected[final])
    return counts


def test_kill_9_during_saves_leaves_old_or_new_model(
    worker: Worker, two_models: dict[str, Path], tmp_path: Path
) -> None:
    counts = kill_saves(worker, two_models, tmp_path, FUZZ_CASES, seed=11, exchange=True)
    # (a finished save is checked by kill_saves' last save: how many of the killed ones
    # finished first depends on how busy the machine is)
    assert counts["killed, old kept"] > 0, counts
    assert counts["leftovers"] > 0, counts  # kills did land while a save was under way


def test_kill_9_during_fallback_saves_is_repaired_by_load(
    worker: Worker, two_models: dict[str, Path], tmp_path: Path
) -> None:
    """Without RENAME_EXCHANGE, a kill between the two renames leaves the path empty for a
    moment; the next load puts the old model back."""
    counts = kill_saves(worker, two_models, tmp_path, 20, seed=12, exchange=False)
    assert counts["killed, old kept"] > 0, counts


def test_load_puts_back_a_model_moved_aside(two_models: dict[str, Path], tmp_path: Path) -> None:
    """The state a kill between the fallback's two renames leaves: no model at the path,
    the old one under its hidden name, the new one half written."""
    target = tmp_path / "model"
    shutil.copytree(two_models["a"], atomic._hidden_name(target, "old"))
    (atomic._new_hidden(target, "new") / "model.safetensors").write_bytes(b"partial")
    expected = parameters(rx.load(two_models["a"], pack=False))
    assert same(parameters(rx.load(target, pack=False)), expected)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_cleaning_spares_a_running_save(
    worker: Worker, two_models: dict[str, Path], tmp_path: Path
) -> None:
    target = shutil.copytree(two_models["a"], tmp_path / "model")
    held = worker.ask(op="hold", target=str(target))
    running = Path(held["tmp"])
    try:
        assert running.parent == tmp_path and (running / "model.safetensors").is_file()
        atomic.clean_leftovers(target)
        rx.load(target, pack=False)
        assert (running / "model.safetensors").is_file()  # a live save is left alone
    finally:
        worker.ask(op="kill", pid=held["pid"])
    assert leftovers(tmp_path) == [running.name]
    rx.save(rx.load(two_models["b"], pack=False), target, overwrite=True)  # save cleans too
    assert leftovers(tmp_path) == []


# --- what overwrite=True may replace ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny(two_models: dict[str, Path]) -> torch.nn.Module:
    return rx.load(two_models["a"], pack=False)


def test_overwrite_replaces_a_saved_model_or_an_empty_folder(
    tiny: torch.nn.Module, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rx.SaveError, match="exists; pass overwrite=True"):
        rx.save(tiny, empty)
    rx.save(tiny, empty, overwrite=True)
    saved = rx.save(tiny, tmp_path / "saved")
    (saved / "notes.txt").write_text("mine")  # still a saved model: replaced as a whole
    rx.save(tiny, saved, overwrite=True)
    assert not (saved / "notes.txt").exists() and not saved.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["empty", "saved"]


@pytest.mark.parametrize(
    "contents",
    [
        {"notes.txt": "mine"},
        {"config.cfg": "[model]\n"},  # no meta.json of ours
        {"config.cfg": "[model]\n", "meta.json": '{"name": "mine"}'},
        {"config.cfg": "[model]\n", "meta.json": "not json"},
    ],
)
def test_overwrite_refuses_a_folder_that_is_not_a_saved_model(
    tiny: torch.nn.Module, tmp_path: Path, contents: dict[str, str]
) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    for name, text in contents.items():
        (target / name).write_text(text)
    with pytest.raises(rx.SaveError, match="not a model saved by registry_xf") as info:
        rx.save(tiny, target, overwrite=True)
    assert str(target) in str(info.value) and sorted(contents)[0] in str(info.value)
    assert {p.name: p.read_text() for p in target.iterdir()} == contents
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_save_and_export_hf_replace_only_their_own(tiny: torch.nn.Module, tmp_path: Path) -> None:
    saved = rx.save(tiny, tmp_path / "saved")
    exported = rx.export_hf(tiny, tmp_path / "exported")
    rx.export_hf(tiny, exported, overwrite=True)
    with pytest.raises(rx.SaveError, match="not an HF directory written by registry_xf.export_hf"):
        rx.export_hf(tiny, saved, overwrite=True)
    with pytest.raises(rx.SaveError, match="not a model saved by registry_xf"):
        rx.save(tiny, exported, overwrite=True)
    hf_made = tmp_path / "hf-made"  # an HF directory that transformers wrote
    shutil.copytree(exported, hf_made)
    from safetensors.torch import load_file, save_file

    save_file(load_file(hf_made / "model.safetensors"), hf_made / "model.safetensors")
    with pytest.raises(rx.SaveError, match="not an HF directory"):
        rx.export_hf(tiny, hf_made, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["exported", "hf-made", "saved"]


# --- path and permission errors ----------------------------------------------------------


def test_target_that_is_a_file(tiny: torch.nn.Module, tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(rx.SaveError, match="is a file") as info:
            rx.save(tiny, target, overwrite=overwrite)
        assert str(target) in str(info.value)
    assert target.read_text() == "a file" and os.listdir(tmp_path) == ["model"]


def test_parent_that_is_a_file(tiny: torch.nn.Module, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "model", tmp_path / "file" / "deeper" / "model"):
        with pytest.raises(rx.SaveError, match="is a file, not a folder") as info:
            rx.save(tiny, target)
        assert str(tmp_path / "file") in str(info.value)
    assert os.listdir(tmp_path) == ["file"]


def test_missing_parents_are_made_and_removed_again_on_failure(
    checkpoints: dict[str, Path], tiny: torch.nn.Module, tmp_path: Path
) -> None:
    saved = rx.save(tiny, tmp_path / "a" / "b" / "model")
    assert rx.load(saved, pack=False) is not None
    meta_model = rx.build(rx.config_from_hf(checkpoints["bert"]))  # no weights: cannot save
    with pytest.raises(rx.RegistryXFError, match="meta tensor"):
        rx.save(meta_model, tmp_path / "c" / "d" / "model")
    source = shutil.copytree(checkpoints["bert"], tmp_path / "source")
    write_tokenizer(source)
    failing = rx.load(source, pack=False)
    (source / "tokenizer.json").unlink()  # fails inside the save, after the folders exist
    with pytest.raises(rx.CheckpointError, match="tokenizer"):
        rx.save(failing, tmp_path / "e" / "f" / "model")
    assert sorted(os.listdir(tmp_path)) == ["a", "source"]


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK, effective_ids=True):
        return Path("/sys")
    try:  # root writes anywhere but in kernel filesystems
        os.mkdir("/sys/registry_xf_probe")
    except OSError:
        return Path("/sys")
    os.rmdir("/sys/registry_xf_probe")
    pytest.skip("no folder that this process cannot write")


def test_read_only_folder(tiny: torch.nn.Module, tmp_path: Path) -> None:
    folder = _read_only_folder(tmp_path)
    try:
        for target in (folder / "model", folder / "deeper" / "model"):
            with pytest.raises(rx.SaveError) as info:
                rx.save(tiny, target)
            assert str(folder) in str(info.value)
            assert not os.path.lexists(target) and not os.path.lexists(folder / "deeper")
        assert not leftovers(folder)
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)


# --- flushing, links, hashes -------------------------------------------------------------


def test_every_file_and_folder_is_flushed_before_the_swap(
    tiny: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real fsync and rename, observed: what was flushed when the swap happened."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename2 = os.fsync, atomic._rename2

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename2(source: Path, target: Path, flags: int) -> bool:
        events.append(("swap", str(source)))
        return real_rename2(source, target, flags)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the flushed files")
    saved = rx.save(tiny, tmp_path / "model")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_rename2", rename2)
    rx.save(tiny, saved, overwrite=True)
    swap = next(i for i, (kind, _) in enumerate(events) if kind == "swap")
    hidden = Path(events[swap][1])
    flushed = {Path(path) for kind, path in events[:swap] if kind == "fsync"}
    assert {hidden / name for name in os.listdir(saved)} | {hidden} <= flushed
    assert ("fsync", str(tmp_path)) in events[swap:]  # the parent, after the swap


def test_a_link_to_a_saved_model_is_followed(tiny: torch.nn.Module, tmp_path: Path) -> None:
    real = rx.save(tiny, tmp_path / "v1")
    link = tmp_path / "current"
    link.symlink_to("v1")
    rx.save(tiny, link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == "v1"
    assert sorted(os.listdir(tmp_path)) == ["current", "v1"] and real.is_dir()


def test_hashes_catch_a_flipped_byte_that_loading_cannot(
    tiny: torch.nn.Module, tmp_path: Path
) -> None:
    saved = rx.save(tiny, tmp_path / "model")
    meta = json.loads((saved / "meta.json").read_text())
    files = sorted(p.name for p in saved.iterdir() if p.name != "meta.json")
    assert sorted(meta["sha256"]) == files
    rx.load(saved, verify=True, pack=False)
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # a byte of tensor data, not of the header
    weights.write_bytes(bytes(data))
    flipped = parameters(rx.load(saved, pack=False))  # safetensors has no checksum
    assert not same(flipped, parameters(tiny))
    with pytest.raises(rx.CheckpointError, match="sha256") as info:
        rx.load(saved, verify=True)
    assert f"{weights}: sha256" in str(info.value)
    (saved / "tokenizer.json").unlink()
    with pytest.raises(rx.CheckpointError, match="2 file") as info:
        rx.load(saved, verify=True)
    assert f"{weights}: sha256" in str(info.value)
    assert f"{saved / 'tokenizer.json'}: missing" in str(info.value)


def test_verify_needs_a_saved_directory(tiny: torch.nn.Module, tmp_path: Path) -> None:
    exported = rx.export_hf(tiny, tmp_path / "hf")
    with pytest.raises(rx.CheckpointError, match="verify=True needs a directory written by"):
        rx.load(exported, verify=True)
    saved = rx.save(tiny, tmp_path / "model")
    meta = json.loads((saved / "meta.json").read_text())
    meta["sha256"] = {"../outside": "0" * 64}
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(rx.UnsafePathError, match=r"goes up a folder"):
        rx.load(saved, verify=True)
    del meta["sha256"]
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(rx.CheckpointError, match="records no file hashes"):
        rx.load(saved, verify=True)


def test_threads_saving_over_one_path_take_turns(
    two_models: dict[str, Path], tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    models = {name: rx.load(path, pack=False) for name, path in two_models.items()}
    target = rx.save(models["a"], tmp_path / "model")
    with ThreadPoolExecutor(4) as pool:
        done = list(
            pool.map(lambda i: rx.save(models["ab"[i % 2]], target, overwrite=True), range(8))
        )
    assert done == [target] * 8 and sorted(os.listdir(tmp_path)) == ["model"]
    loaded = parameters(rx.load(target, verify=True, pack=False))
    assert any(same(loaded, parameters(m)) for m in models.values())


NAMES = st.text(alphabet="abcmetaj.sonfg_", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..")
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.sets(NAMES, min_size=1, max_size=4), meta=st.sampled_from([None, "{}", "[1]", "x"]))
def test_overwrite_never_deletes_a_folder_of_other_files(
    tiny: torch.nn.Module, tmp_path: Path, names: set[str], meta: str | None
) -> None:
    """Whatever a folder holds, unless it is a saved model, overwrite=True leaves it be."""
    target = Path(tempfile.mkdtemp(dir=tmp_path))
    contents = {name: f"{name} {i}" for i, name in enumerate(sorted(names))}
    if meta is not None:
        contents["meta.json"] = meta
    for name, text in contents.items():
        (target / name).write_text(text)
    with pytest.raises(rx.SaveError, match="is not a model saved by registry_xf"):
        rx.save(tiny, target, overwrite=True)
    assert {p.name: p.read_text() for p in target.iterdir()} == contents
    assert not leftovers(tmp_path)


def test_verify_follows_a_hub_snapshots_links_into_its_blobs_only(
    tiny: torch.nn.Module, tmp_path: Path
) -> None:
    """A Hub cache snapshot holds links into its entry's blobs folder: verify reads through
    them, but a link that leads anywhere else is still refused."""
    from registry_xf.errors import UnsafePathError

    saved = rx.save(tiny, tmp_path / "model")
    entry = tmp_path / "hub" / "models--org--tiny"
    snapshot = entry / "snapshots" / ("0" * 40)
    (entry / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in saved.iterdir():
        blob = entry / "blobs" / path.name
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    rx.load(snapshot, verify=True, pack=False)
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(saved / "tokenizer.json", outside)
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="leads outside"):
        rx.load(snapshot, verify=True, pack=False)
