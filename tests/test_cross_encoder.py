"""Cross-encoder rerankers against sentence-transformers' CrossEncoder on tiny checkpoints.

Tiny BertForSequenceClassification checkpoints (one label: a relevance score; three labels)
are written once per module with the test tokenizer; scores, rankings and truncation must
match sentence-transformers, and bad inputs must get typed errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_heads import write_task_checkpoint

import registry_xf as rx
from registry_xf.cli import main

ATOL = 1e-5
QUERIES = ["the cat", "hello world", "a dog ran on the mat", "is it"]
DOCUMENTS = [
    "the cat sat on the mat",
    "dog",
    "hello, world! the dog and the cat ran on and on and on the mat, is it?",
    "",
    "mat mat mat",
    "the world is the world and the cat is the cat " * 4,
]
PAIRS = [(q, d) for q in QUERIES for d in DOCUMENTS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross_encoder")
    one = write_task_checkpoint(
        root / "one",
        "bert",
        "sequence_classification",
        id2label={0: "LABEL_0"},
        label2id={"LABEL_0": 0},
        num_labels=1,
        initializer_range=0.3,
    )
    three = write_task_checkpoint(
        root / "three", "bert", "sequence_classification", seed=1, initializer_range=0.3
    )
    return {"one": one, "three": three}


def st_cross_encoder(path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(path), device="cpu", local_files_only=True, **kwargs)


def test_one_label_scores_match_sentence_transformers(checkpoints: dict[str, Path]) -> None:
    ours = rx.CrossEncoder(checkpoints["one"], batch_tokens=64)  # several batches
    assert ours.activation_name == "Sigmoid" and ours.num_labels == 1
    got = ours.score(PAIRS)
    expected = st_cross_encoder(checkpoints["one"]).predict(PAIRS, batch_size=5)
    assert got.shape == (len(PAIRS),) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    assert np.ptp(got) > 0.05  # the pairs really get different scores


def test_three_labels_match_with_and_without_softmax(checkpoints: dict[str, Path]) -> None:
    ours = rx.CrossEncoder(checkpoints["three"])
    reference = st_cross_encoder(checkpoints["three"])
    assert ours.activation_name == "Identity"  # sentence-transformers: raw logits
    got = ours.score(PAIRS)
    assert got.shape == (len(PAIRS), 3)
    np.testing.assert_allclose(got, reference.predict(PAIRS), atol=ATOL, rtol=0)
    probabilities = ours.score(PAIRS, apply_softmax=True)
    expected = reference.predict(PAIRS, apply_softmax=True)
    np.testing.assert_allclose(probabilities, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)


def test_rank_matches_sentence_transformers(checkpoints: dict[str, Path]) -> None:
    ours = rx.CrossEncoder(checkpoints["one"])
    reference = st_cross_encoder(checkpoints["one"])
    for query in QUERIES:
        got = ours.rank(query, DOCUMENTS, top_k=4)
        expected = reference.rank(query, DOCUMENTS, top_k=4)
        assert [r.index for r in got] == [int(e["corpus_id"]) for e in expected]
        np.testing.assert_allclose(
            [r.score for r in got], [float(e["score"]) for e in expected], atol=ATOL, rtol=0
        )
        assert all(r.document == DOCUMENTS[r.index] for r in got)
    assert len(ours.rank("cat", DOCUMENTS)) == len(DOCUMENTS)
    assert len(ours.rank("cat", DOCUMENTS, top_k=100)) == len(DOCUMENTS)


def test_truncation_matches_sentence_transformers(checkpoints: dict[str, Path]) -> None:
    """Pairs longer than max_length lose tokens from the longer text first."""
    long_pairs = [(" ".join(["cat"] * 30), "the mat " * 3), ("dog ran", "hello world " * 20)]
    ours = rx.CrossEncoder(checkpoints["one"], max_length=16)
    reference = st_cross_encoder(checkpoints["one"], max_length=16)
    np.testing.assert_allclose(
        ours.score(long_pairs), reference.predict(long_pairs), atol=ATOL, rtol=0
    )
    # the model's positions cap the length (sentence-transformers caps it the same way)
    assert (
        rx.CrossEncoder(checkpoints["one"]).max_length == rx.load(checkpoints["one"]).max_positions
    )


@pytest.mark.parametrize(
    ("activation", "expected"),
    [("torch.nn.modules.linear.Identity", "Identity"), ("torch.nn.Sigmoid", "Sigmoid")],
)
def test_activation_named_in_the_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, activation: str, expected: str
) -> None:
    """sentence-transformers saves its activation in config.json; both libraries obey it."""
    import shutil

    path = shutil.copytree(checkpoints["one"], tmp_path / "ce")
    config = json.loads((path / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": activation, "version": "6.2.0"}
    (path / "config.json").write_text(json.dumps(config))
    ours = rx.CrossEncoder(path)
    assert ours.activation_name == expected
    np.testing.assert_allclose(
        ours.score(PAIRS[:6]), st_cross_encoder(path).predict(PAIRS[:6]), atol=ATOL, rtol=0
    )
    saved = rx.CrossEncoder(rx.save(ours.model, tmp_path / "saved"))  # kept through save
    assert saved.activation_name == expected


def test_bad_inputs_get_typed_errors(checkpoints: dict[str, Path]) -> None:
    ours = rx.CrossEncoder(checkpoints["one"])
    with pytest.raises(rx.InputError, match=r"pairs\[1\]: expected a \(query, document\) pair"):
        ours.score([("a", "b"), ("a", "b", "c")])
    with pytest.raises(rx.InputError, match=r"pairs\[0\]: .*a str 'just a text'"):
        ours.score(["just a text"])
    with pytest.raises(rx.InputError, match=r"pairs\[0\]\[1\] is a int"):
        ours.score([("a", 3)])
    with pytest.raises(rx.InputError, match="pairs must be a list"):
        ours.score("a text")
    with pytest.raises(rx.InputError, match="documents is empty"):
        ours.rank("cat", [])
    with pytest.raises(rx.InputError, match="documents must be a list"):
        ours.rank("cat", "the mat")
    for top_k in (0, -1, 1.5, True):
        with pytest.raises(rx.InputError, match="top_k must be a positive integer"):
            ours.rank("cat", DOCUMENTS, top_k=top_k)  # type: ignore[arg-type]
    with pytest.raises(rx.InputError, match="max_length must be a positive integer"):
        rx.CrossEncoder(checkpoints["one"], max_length=0)
    with pytest.raises(rx.InputError, match="no room for a pair"):
        rx.CrossEncoder(checkpoints["one"], max_length=3).score([("a", "b")])
    assert ours.score([]).shape == (0,)
    with pytest.raises(rx.RegistryXFError, match="rank\\(\\) needs a model with one label"):
        rx.CrossEncoder(checkpoints["three"]).rank("cat", DOCUMENTS)
    with pytest.raises(rx.RegistryXFError, match="sequence classification head"):
        rx.CrossEncoder(rx.load(checkpoints["one"], head=False))


def test_unknown_activation_is_a_checkpoint_error(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    path = shutil.copytree(checkpoints["one"], tmp_path / "ce")
    config = json.loads((path / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.Hardshrink"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(rx.CheckpointError, match="cross_encoder.activation_fn: 'torch.nn.Hard"):
        rx.CrossEncoder(path)


def test_rerank_cli(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "docs.txt"
    docs.write_text("the cat sat on the mat\n\nmat mat mat\n")
    model = str(checkpoints["one"])
    assert main(["rerank", "the cat", "dog", "--file", str(docs), "--model", model]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = rx.CrossEncoder(checkpoints["one"]).rank(
        "the cat", ["dog", "the cat sat on the mat", "mat mat mat"]
    )
    assert [line.split()[1] for line in lines] == [f"{r.score:.4f}" for r in expected]
    assert [line.split(maxsplit=2)[2] for line in lines] == [r.document for r in expected]
    assert main(["rerank", "q", "a", "b", "--model", model, "--top-k", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["rerank", "the cat", "--model", model]) == 2
    assert "no documents" in capsys.readouterr().err
    assert main(["rerank", "q", "a", "--model", model, "--top-k", "0"]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err
    assert main(["rerank", "q", "a", "--model", str(checkpoints["three"])]) == 2
    assert "one label" in capsys.readouterr().err
