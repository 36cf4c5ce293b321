"""spaCy on task checkpoints: the transformer component's encoder, and a token
classifier's labels as token attributes and ``doc.ents``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

spacy = pytest.importorskip("spacy")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_heads import write_task_checkpoint  # noqa: E402

import registry_xf as rx  # noqa: E402
from registry_xf.pipelines.spacy.token_classifier import _bio_spans  # noqa: E402

NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
TEXT = "hello world, the cat sat on the mat"


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task_checkpoint(
        tmp_path_factory.mktemp("ner") / "tagger",
        "bert",
        "token_classification",
        id2label=NER_LABELS,
        label2id={v: k for k, v in NER_LABELS.items()},
    )


def with_bias_towards(path: Path, label: int, target: Path) -> Path:
    """A copy of the checkpoint whose classifier picks ``label`` for every token."""
    import shutil

    shutil.copytree(path, target)
    tensors = load_file(target / "model.safetensors")
    tensors["classifier.weight"] = torch.zeros_like(tensors["classifier.weight"])
    tensors["classifier.bias"] = torch.full_like(tensors["classifier.bias"], -5.0)
    tensors["classifier.bias"][label] = 5.0
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_token_labels_are_the_first_piece_labels(tagger: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("registry_xf_token_classifier", config={"source": str(tagger)})
    doc = nlp(TEXT)
    (pieces,) = rx.Classifier(tagger).tag([TEXT])
    first = {}
    for piece in pieces:
        first.setdefault(piece.start, piece)
    for token in doc:
        piece = first[token.idx]
        assert token._.xf_label == piece.label and token._.xf_label_score == piece.score
    assert all(span.label_ in ("PER", "LOC") for span in doc.ents)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (1, [(i, i + 1, "PER") for i in range(9)]),  # B-PER everywhere: one entity per token
        (4, [(0, 9, "LOC")]),  # I-LOC everywhere: one entity over the whole doc
        (0, []),
    ],
)
def test_bio_labels_become_entities(
    tagger: Path, label: int, expected: list[tuple[int, int, str]], tmp_path: Path
) -> None:
    source = with_bias_towards(tagger, label, tmp_path / "biased")
    nlp = spacy.blank("en")
    nlp.add_pipe("registry_xf_token_classifier", config={"source": str(source)})
    doc = nlp(TEXT)
    assert len(doc) == 9
    assert [(e.start, e.end, e.label_) for e in doc.ents] == expected


def test_bio_spans() -> None:
    from spacy.tokens import Doc

    doc = Doc(spacy.blank("en").vocab, words=list("abcdefgh"))
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "B-LOC", "I-PER", None]
    assert [(s.start, s.end, s.label_) for s in _bio_spans(doc, tags)] == [
        (0, 2, "PER"),
        (3, 4, "LOC"),
        (4, 5, "LOC"),
        (5, 6, "LOC"),
        (6, 7, "PER"),
    ]


def test_other_label_sets_stay_token_attributes(tmp_path: Path) -> None:
    labels = {0: "NOUN", 1: "VERB", 2: "DET"}
    path = write_task_checkpoint(
        tmp_path / "pos",
        "roberta",
        "token_classification",
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "registry_xf_token_classifier", config={"source": str(path), "extension": "pos_guess"}
    )
    doc = nlp("the cat sat")
    assert not doc.ents
    assert all(t._.pos_guess in labels.values() and 0 < t._.pos_guess_score <= 1 for t in doc)


def test_to_disk_and_bytes_give_the_same_labels(tagger: Path, tmp_path: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe("registry_xf_token_classifier", config={"source": str(tagger)})
    expected = [t._.xf_label for t in nlp(TEXT)]
    nlp.to_disk(tmp_path / "pipeline")
    data = nlp.get_pipe("registry_xf_token_classifier").to_bytes()
    moved = tmp_path / "moved"
    tagger.rename(moved)  # the saved pipeline must not need the original source
    try:
        loaded = spacy.load(tmp_path / "pipeline")
        assert [t._.xf_label for t in loaded(TEXT)] == expected
        again = spacy.blank("en")
        again.add_pipe("registry_xf_token_classifier", config={"source": str(moved)})
        again.get_pipe("registry_xf_token_classifier").from_bytes(data)
        assert [t._.xf_label for t in again(TEXT)] == expected
    finally:
        moved.rename(tagger)


def test_bad_sources_are_config_errors(tagger: Path, tmp_path: Path) -> None:
    nlp = spacy.blank("en")
    with pytest.raises(rx.ConfigError, match=r"components\.registry_xf_token_classifier\.source"):
        nlp.add_pipe("registry_xf_token_classifier")
    path = write_task_checkpoint(tmp_path / "cls", "bert", "sequence_classification")
    nlp.add_pipe("registry_xf_token_classifier", config={"source": str(path)})
    with pytest.raises(rx.ConfigError, match="needs a token classification head"):
        nlp("hello")


def test_transformer_component_reads_task_checkpoints(tagger: Path) -> None:
    nlp = spacy.blank("en")
    source = {"@architectures": "registry_xf.TransformerModel.v1", "source": str(tagger)}
    nlp.add_pipe("registry_xf_transformer", config={"model": source})
    doc = nlp(TEXT)
    assert doc.tensor.shape == (len(doc), 32)
    encoder = rx.load(tagger, head=False)
    assert type(encoder) is rx.Encoder


def test_from_bytes_refuses_names_outside_its_folder(tagger: Path, tmp_path: Path) -> None:
    import srsly

    nlp = spacy.blank("en")
    pipe = nlp.add_pipe("registry_xf_token_classifier", config={"source": str(tagger)})
    files = srsly.msgpack_loads(pipe.to_bytes())
    assert "model/model.safetensors" in files
    files["../escaped.txt"] = b"x"
    with pytest.raises(rx.RegistryXFError, match=r"escaped\.txt"):
        pipe.from_bytes(srsly.msgpack_dumps(files))
    assert not (tmp_path.parent / "escaped.txt").exists()
