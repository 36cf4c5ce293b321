"""The registry-xf command, run in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from confection import Config
from tiny_tokenizer import write_tokenizer

import registry_xf as rx
from registry_xf.cli import main
from registry_xf.registry import REGISTRY_NAMES

TEXTS = ["the cat sat on the mat", "hello world", "a dog ran", "the dog is on the mat"]


@pytest.fixture(scope="module")
def bert_with_tokenizer(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "bert"
    shutil.copytree(checkpoints["bert"], directory)
    write_tokenizer(directory)
    return directory


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY_NAMES:
        assert f"{name}:" in out
    assert "registry_xf.SelfAttention.v1" in out and "registry_xf.HFBert.v1" in out
    line = next(line for line in out.splitlines() if "registry_xf.MeanPooler.v1" in line)
    assert "Average of the real tokens" in line  # the first line of its documentation


def test_list_one_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "layers"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layers:\n")
    assert "registry_xf.SelfAttention.v1" in out and "test_plugin.ScaledLayerNorm.v1" in out
    assert "registry_xf.HFBert.v1" not in out and "activations:" not in out

    assert main(["list", "layer"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Did you mean 'layers'" in captured.err


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "registry_xf.SelfAttention.v1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('@layers = "registry_xf.SelfAttention.v1"\n')
    assert "registry_xf.layers.attention.self_attention(" in out
    assert "n_kv_heads" in out and "backend" in out
    assert "Self-attention (MHA" in out


def test_show_misspelt_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "registry_xf.SelfAtention.v1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "registry-xf show: error:" in captured.err
    assert "Did you mean 'registry_xf.SelfAttention.v1'" in captured.err


def test_config_with_overrides(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", str(checkpoints["bert"]), "--hyper.n_layers", "1"]) == 0
    out = capsys.readouterr().out
    config = Config().from_str(out, interpolate=False)
    assert config["hyper"]["n_layers"] == 1
    assert config["model"]["layers"]["n_layers"] == 1  # variables substituted
    assert "${" not in out
    assert config["model"]["layers"]["layer"]["attention"]["qkv_bias"] is True  # filled
    assert config["weights"]["path"] == str(checkpoints["bert"].resolve())
    # what it prints builds the model it describes
    model = rx.build(out)
    assert len(model.layers) == 1

    assert main(["config", str(checkpoints["bert"]), "--keep-variables", "--hyper.n_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "n_layers = ${hyper.n_layers}" in out
    assert Config().from_str(out)["model"]["layers"]["n_layers"] == 3


def test_config_of_saved_model_and_cfg(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = rx.save(rx.load(checkpoints["distilbert"]), tmp_path / "saved")
    assert main(["config", str(saved)]) == 0
    from_saved = Config().from_str(capsys.readouterr().out)
    assert from_saved["weights"]["path"] == "model.safetensors"
    assert main(["config", str(saved / "config.cfg"), "--hyper.n_layers", "1"]) == 0
    assert Config().from_str(capsys.readouterr().out)["hyper"]["n_layers"] == 1


def test_config_errors(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", str(checkpoints["bert"]), "--hyper.n_layer", "1"]) == 2
    err = capsys.readouterr().err
    assert "[hyper.n_layer]" in err and "Did you mean 'hyper.n_layers'" in err
    assert main(["config", str(tmp_path / "nothing-here")]) == 2
    assert "not a file, a directory or an installed model package" in capsys.readouterr().err
    assert main(["list", "--hyper.n_layers", "1"]) == 2
    assert "takes no config overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["config", str(checkpoints["bert"]), "--hyper.n_layers"])
    assert info.value.code == 2
    assert "has no value" in capsys.readouterr().err


def test_embed_to_npy(
    bert_with_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.npy"
    argv = ["embed", *TEXTS, "--model", str(bert_with_tokenizer), "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {len(TEXTS)} embeddings of width 32 to {out}" in capsys.readouterr().out
    vectors = np.load(out)
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]  # no temporary file left
    expected = rx.Embedder(rx.load(bert_with_tokenizer)).embed(TEXTS)
    np.testing.assert_allclose(vectors, expected, atol=1e-6, rtol=0)
    assert not np.allclose(vectors[0], vectors[1])

    # texts from a file, a small token budget (several batches), an override
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(TEXTS[:2]) + "\n\n")
    argv = ["embed", "--file", str(listing), "--model", str(bert_with_tokenizer)]
    argv += ["--out", str(out), "--batch-tokens", "8", "--hyper.attention_backend", "eager"]
    assert main(argv) == 0
    np.testing.assert_allclose(np.load(out), expected[:2], atol=1e-5, rtol=0)


def test_embed_prints_similarities(
    bert_with_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", *TEXTS[:3], "--model", str(bert_with_tokenizer)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 embeddings of width 32")
    assert "cosine similarity" in out and "closest pair" in out


def test_embed_errors(
    bert_with_tokenizer: Path, checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", "--model", str(bert_with_tokenizer)]) == 2
    assert "nothing to embed" in capsys.readouterr().err
    assert main(["embed", "text", "--model", str(checkpoints["bert"])]) == 2
    assert "no tokenizer" in capsys.readouterr().err
