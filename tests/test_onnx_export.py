"""export_onnx: onnxruntime gives our embeddings, for any batch and length, with padding."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import minilm_dir, random_batch, requires_minilm

import registry_xf as rx
from registry_xf.cli import main as cli

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxscript", "onnxruntime")),
    reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed",
)

TEXTS = [
    "A man is eating food.",
    "hi",
    "The girl is carrying a baby while the man rides a horse along the beach at dusk.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "A long text that goes on and on. " * 40,
]


def session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def tiny_bert(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    model = rx.load(checkpoints["bert"])
    path = rx.export_onnx(model, tmp_path_factory.mktemp("onnx") / "bert.onnx", pooled=True)
    return model, path


def test_tiny_bert_matches_any_batch_and_length(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model, path = tiny_bert
    run = session(path)
    assert [i.name for i in run.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in run.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    for seed, (batch, seq) in enumerate([(1, 3), (4, 12), (7, 40)]):  # not the example's sizes
        ids, mask = random_batch(seed, batch, seq)
        types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            hidden = model(ids, mask, types).last_hidden_state
            pooled = rx.Pooler("mean")(hidden, mask)
        got_hidden, got_pooled = run.run(
            None,
            {
                "input_ids": ids.numpy(),
                "attention_mask": mask.numpy(),
                "token_type_ids": types.numpy(),
            },
        )
        real = mask.bool().numpy()
        assert cosines(got_hidden[real], hidden.numpy()[real]).min() >= 0.99999
        assert cosines(got_pooled, pooled.numpy()).min() >= 0.99999


def test_roberta_has_no_token_type_input(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = rx.load(checkpoints["roberta"])
    path = tmp_path / "roberta.onnx"
    path.write_bytes(b"old")
    rx.export_onnx(model, path, overwrite=True)
    assert os.listdir(tmp_path) == ["roberta.onnx"]  # replaced whole, nothing left beside
    run = session(path)
    assert [i.name for i in run.get_inputs()] == ["input_ids", "attention_mask"]
    ids, mask = random_batch(3, 3, 9, pad_id=1)
    ids = ids.clamp(min=2).masked_fill(~mask.bool(), 1)
    (hidden,) = run.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.inference_mode():
        expected = model(ids, mask).last_hidden_state.numpy()
    real = mask.bool().numpy()
    assert cosines(hidden[real], expected[real]).min() >= 0.99999


@requires_minilm
def test_minilm_embeddings_match_the_embedder(tmp_path: Path) -> None:
    embedder = rx.Embedder(minilm_dir(), batch_tokens=512)
    path = rx.export_onnx(embedder.model, tmp_path / "minilm.onnx", pooled=True)
    encoded = embedder.tokenizer.pad(embedder.tokenizer.encode(TEXTS))  # padded to the longest
    feed = {k: v.numpy() for k, v in encoded.model_inputs().items() if v is not None}
    (_, got) = session(path).run(None, feed)
    expected = embedder.embed(TEXTS)
    assert encoded.attention_mask.sum(1).min() < encoded.attention_mask.shape[1]  # padding
    assert cosines(got, expected).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised


def test_refuses_what_it_cannot_export(tiny_bert, checkpoints, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, path = tiny_bert
    with pytest.raises(rx.UnsupportedModelError, match="found Linear"):
        rx.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(rx.InputError, match=r"ending in \.onnx"):
        rx.export_onnx(model, tmp_path / "x.bin")
    with pytest.raises(rx.InputError, match="opset"):
        rx.export_onnx(model, tmp_path / "x.onnx", opset=9)
    with pytest.raises(rx.SaveError, match="exists; pass overwrite=True"):
        rx.export_onnx(model, path)
    with pytest.raises(rx.SaveError, match="does not exist"):
        rx.export_onnx(model, tmp_path / "no" / "such" / "x.onnx")
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_cli_export_onnx(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bert.onnx"
    assert cli(["export-onnx", str(out), "--model", str(checkpoints["bert"]), "--pooled"]) == 0
    assert [o.name for o in session(out).get_outputs()] == [
        "last_hidden_state",
        "sentence_embedding",
    ]
    assert cli(["export-onnx", str(out), "--model", str(checkpoints["bert"])]) == 2
    assert "exists; pass overwrite=True" in capsys.readouterr().err
