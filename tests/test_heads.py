"""Task heads against HF transformers: every head type of every encoder family.

Tiny HF task checkpoints (``*ForSequenceClassification``, ``*ForTokenClassification``,
``*ForMaskedLM``) are written once per module; each must load with its head, give HF's
logits, export back to HF and save/load bit-exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, random_batch, tiny_hf_configs
from tiny_tokenizer import write_tokenizer

import registry_xf as rx

ATOL = 1e-5
LABELS = {0: "NEG", 1: "NEU", 2: "POS"}
TASKS = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "masked_lm": "AutoModelForMaskedLM",
}
CASES = [(family, task) for family in FAMILIES for task in TASKS]


def pad_id(family: str) -> int:
    return 1 if family in ("roberta", "xlm-roberta", "camembert") else 0


def write_task_checkpoint(path: Path, family: str, task: str, seed: int = 0, **config: object):
    """An HF task model of ``family`` with random weights (norms and biases too)."""
    import transformers as tf

    hf_config = tiny_hf_configs()[family]()
    if task != "masked_lm":
        hf_config.id2label = dict(LABELS)
        hf_config.label2id = {v: k for k, v in LABELS.items()}
    for key, value in config.items():
        setattr(hf_config, key, value)
    torch.manual_seed(seed)
    model = getattr(tf, TASKS[task]).from_config(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("heads")
    return {
        (family, task): write_task_checkpoint(root / f"{family}-{task}", family, task)
        for family, task in CASES
    }


def hf_model(path: Path, task: str, attn: str = "eager"):  # type: ignore[no-untyped-def]
    import transformers as tf

    return getattr(tf, TASKS[task]).from_pretrained(path, attn_implementation=attn).eval()


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> None:
    """Per-token logits are compared at real tokens (a padding query's output is arbitrary)."""
    if got.dim() == 3:
        got, expected = got[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "task"), CASES)
def test_logits_match_hf(
    task_checkpoints: dict[tuple[str, str], Path], family: str, task: str
) -> None:
    path = task_checkpoints[family, task]
    ref = hf_model(path, task, "eager")
    ids, mask = random_batch(1, pad_id=pad_id(family))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for backend in ("sdpa", "eager"):
        ours = rx.load(path, overrides={"hyper.attention_backend": backend})
        assert isinstance(ours, rx.EncoderWithHead) and ours.task == task
        with torch.no_grad():
            out = ours(ids, mask, output_hidden_states=True)
        assert_same_logits(out.logits, expected.logits, mask)
        assert len(out.hidden_states) == len(expected.hidden_states)
        assert_same_logits(out.last_hidden_state, expected.hidden_states[-1], mask)
    if task == "masked_lm":
        assert out.labels is None and out.logits.shape[-1] == tiny_hf_configs()[family]().vocab_size
    else:
        assert out.labels == ("NEG", "NEU", "POS") == ours.labels
    # the head's weights came from the checkpoint, not from an initialiser
    assert {name.split(".")[0] for name in ours.load_report.loaded} == {"encoder", "head"}
    assert not ours.load_report.initialised


@pytest.mark.parametrize(("family", "task"), CASES)
def test_hf_round_trip_and_save(
    task_checkpoints: dict[tuple[str, str], Path], family: str, task: str, tmp_path: Path
) -> None:
    import transformers as tf

    path = task_checkpoints[family, task]
    ours = rx.load(path)
    exported = rx.export_hf(ours, tmp_path / "exported")
    written = json.loads((exported / "config.json").read_text())
    original = json.loads((path / "config.json").read_text())
    assert written["architectures"] == original["architectures"]
    back, info = getattr(tf, TASKS[task]).from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    if task != "masked_lm":
        assert back.config.id2label == LABELS
    ids, mask = random_batch(2, pad_id=pad_id(family))
    expected = hf_logits(hf_model(path, task, "sdpa"), ids, mask)
    assert_same_logits(hf_logits(back.eval(), ids, mask), expected, mask)
    # HF → ours → HF → ours: the same weights, bit for bit
    state = ours.state_dict()
    again = rx.load(exported).state_dict()
    assert state.keys() == again.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, again[name]), name
    # save → load: the same weights, labels and logits, bit for bit; still tied
    saved = rx.load(rx.save(ours, tmp_path / "saved"))
    assert isinstance(saved, rx.EncoderWithHead) and saved.labels == ours.labels
    again = saved.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, again[name]), name
    if task == "masked_lm":
        assert saved.head.decoder.weight is saved.encoder.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(ours(ids, mask).logits, saved(ids, mask).logits)
    # ...and the reloaded model exports to HF as well
    assert (rx.export_hf(saved, tmp_path / "hf") / "model.safetensors").is_file()


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_untied_masked_lm(family: str, tmp_path: Path) -> None:
    path = write_task_checkpoint(tmp_path / "mlm", family, "masked_lm", tie_word_embeddings=False)
    ours = rx.load(path)
    assert not ours.head.tie_embeddings
    assert ours.head.decoder.weight is not ours.encoder.embeddings.word_embeddings.weight
    ids, mask = random_batch(4, pad_id=pad_id(family))
    with torch.no_grad():
        got = ours(ids, mask).logits
    assert_same_logits(got, hf_logits(hf_model(path, "masked_lm"), ids, mask), mask)
    exported = rx.export_hf(ours, tmp_path / "exported")
    assert json.loads((exported / "config.json").read_text())["tie_word_embeddings"] is False
    assert_same_logits(hf_logits(hf_model(exported, "masked_lm"), ids, mask), got, mask)


@pytest.mark.parametrize(
    ("problem_type", "n_labels", "expected"),
    [
        ("multi_label_classification", 3, "sigmoid"),
        ("single_label_classification", 3, "softmax"),
        ("regression", 1, "identity"),
        (None, 1, "sigmoid"),
    ],
)
def test_problem_type_is_carried(
    problem_type: str | None, n_labels: int, expected: str, tmp_path: Path
) -> None:
    labels = {i: f"L{i}" for i in range(n_labels)}
    path = write_task_checkpoint(
        tmp_path / "cls",
        "bert",
        "sequence_classification",
        problem_type=problem_type,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    ours = rx.load(path)
    assert ours.problem_type == problem_type and len(ours.labels) == n_labels
    ids, mask = random_batch(5)
    with torch.no_grad():
        logits = ours(ids, mask).logits
    activations = {
        "sigmoid": torch.sigmoid(logits),
        "softmax": torch.softmax(logits, -1),
        "identity": logits,
    }
    torch.testing.assert_close(ours.head.scores(logits), activations[expected])
    written = json.loads((rx.export_hf(ours, tmp_path / "hf") / "config.json").read_text())
    assert written.get("problem_type") == problem_type
    assert written["id2label"] == {str(k): v for k, v in labels.items()}


def test_missing_label_names_default_like_hf(tmp_path: Path) -> None:
    path = write_task_checkpoint(tmp_path / "cls", "roberta", "token_classification")
    config = json.loads((path / "config.json").read_text())
    del config["id2label"], config["label2id"]
    (path / "config.json").write_text(json.dumps({**config, "num_labels": 3}))
    assert rx.load(path).labels == ("LABEL_0", "LABEL_1", "LABEL_2")


def test_head_false_loads_the_bare_encoder(
    task_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    path = task_checkpoints["bert", "sequence_classification"]
    whole = rx.load(path)
    bare = rx.load(path, head=False)
    assert type(bare) is rx.Encoder
    assert any(k.startswith("classifier.") for k in bare.load_report.skipped)
    ids, mask = random_batch(6)
    with torch.no_grad():
        torch.testing.assert_close(
            bare(ids, mask).last_hidden_state, whole(ids, mask).last_hidden_state, atol=0, rtol=0
        )
    assert type(rx.build(path, head=False)) is rx.Encoder
    # a saved model with a head: its encoder, which saves and loads as an encoder
    from_saved = rx.load(rx.save(whole, tmp_path / "saved"), head=False)
    assert type(from_saved) is rx.Encoder
    again = rx.load(rx.save(from_saved, tmp_path / "encoder"))
    assert type(again) is rx.Encoder
    with torch.no_grad():
        assert torch.equal(again(ids, mask).last_hidden_state, bare(ids, mask).last_hidden_state)


@pytest.mark.parametrize("task", list(TASKS))
def test_embedder_on_task_checkpoints(
    task_checkpoints: dict[tuple[str, str], Path], task: str
) -> None:
    path = task_checkpoints["bert", task]
    texts = ["the cat sat on the mat", "hello world"]
    bare = rx.Embedder(rx.load(path, head=False)).embed(texts)
    whole = rx.Embedder(path).embed(texts)
    assert whole.shape == (2, 32)
    torch.testing.assert_close(torch.from_numpy(whole), torch.from_numpy(bare), atol=0, rtol=0)


def test_unsupported_task_loads_as_encoder(tmp_path: Path) -> None:
    import transformers as tf

    model = tf.BertForQuestionAnswering(tiny_hf_configs()["bert"]())
    model.save_pretrained(tmp_path / "qa")
    loaded = rx.load(tmp_path / "qa")
    assert type(loaded) is rx.Encoder
    assert any(k.startswith("qa_outputs.") for k in loaded.load_report.skipped)


def test_a_config_declares_a_head() -> None:
    from registry_xf.config.families import family_config_text

    config = rx.read_config(
        family_config_text("bert"),
        {"hyper.vocab_size": 50, "hyper.hidden_width": 16, "hyper.n_heads": 2, "hyper.n_layers": 1},
    )
    config["model"] = {
        "@architectures": "registry_xf.EncoderWithHead.v1",
        "encoder": config["model"],
        "head": {
            "@heads": "registry_xf.SequenceClassificationHead.v1",
            "width": "${hyper.hidden_width}",
            "labels": ["spam", "ham"],
        },
    }
    model = rx.build(config, device="cpu").eval()
    out = model(torch.randint(0, 50, (2, 7)))
    assert out.logits.shape == (2, 2) and out.labels == ("spam", "ham")
    assert model.head.problem_type is None and model.task == "sequence_classification"


def write_config(path: Path, **changes: object) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id2label": {"0": "A", "2": "C"}}, r"config\.json: id2label keys must be 0\.\.1"),
        ({"id2label": {"x": "A"}}, r"config\.json: id2label keys must be label indices"),
        ({"id2label": [], "num_labels": 2}, r"config\.json: id2label must be a non-empty"),
        (
            {"id2label": {"0": "A", "1": "B"}, "num_labels": 3},
            r"num_labels 3 differs from the 2 labels",
        ),
        ({"problem_type": "ranking"}, r"problem_type 'ranking' is not one of"),
        ({"id2label": {"0": "${x}", "1": "B"}, "num_labels": 2}, r"label names with '\$\{'"),
    ],
)
def test_bad_label_settings_name_the_file(
    task_checkpoints: dict[tuple[str, str], Path],
    changes: dict[str, object],
    message: str,
    tmp_path: Path,
) -> None:
    import shutil

    path = shutil.copytree(task_checkpoints["bert", "sequence_classification"], tmp_path / "m")
    write_config(path, **changes)
    with pytest.raises(rx.UnsupportedModelError, match=message):
        rx.load(path)


def test_repeated_labels_are_a_config_error(
    task_checkpoints: dict[tuple[str, str], Path],
) -> None:
    path = task_checkpoints["bert", "token_classification"]
    with pytest.raises(rx.ConfigError, match=r"model\.head.*repeated: A"):
        rx.load(path, overrides={"model.head.labels": ["A", "A", "B"]})


def test_a_missing_head_tensor_is_named(
    task_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(task_checkpoints["roberta", "sequence_classification"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["classifier.dense.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(rx.LoadError, match=r"head\.dense\.weight.*classifier\.dense\.weight"):
        rx.load(path)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_an_architecture_without_its_head_weights_loads_the_encoder(
    checkpoints: dict[str, Path], family: str, tmp_path: Path
) -> None:
    """Bare encoders whose config.json names the *ForMaskedLM they came from (common among
    sentence-transformers models) keep loading as encoders."""
    import shutil

    path = shutil.copytree(checkpoints[family], tmp_path / "m")
    prefix = {"bert": "Bert", "xlm-roberta": "XLMRoberta"}[family]
    write_config(path, architectures=[f"{prefix}ForMaskedLM"])
    assert type(rx.load(path)) is rx.Encoder


def test_tying_needs_matching_shapes(
    task_checkpoints: dict[tuple[str, str], Path],
) -> None:
    path = task_checkpoints["albert", "masked_lm"]
    with pytest.raises(rx.ConfigError, match=r"tie_embeddings.*decoder"):
        rx.load(path, overrides={"model.head.embedding_width": 32})


def test_heads_check_their_inputs(task_checkpoints: dict[tuple[str, str], Path]) -> None:
    model = rx.load(task_checkpoints["bert", "sequence_classification"])
    with pytest.raises(rx.InputError, match="input_ids must be"):
        model(torch.zeros(3, dtype=torch.long))


def test_classifier_scores_match_hf(task_checkpoints: dict[tuple[str, str], Path]) -> None:
    path = task_checkpoints["electra", "sequence_classification"]
    classifier = rx.Classifier(path, batch_tokens=16)
    texts = ["the cat sat on the mat", "hello", "the dog ran and the cat sat"]
    results = classifier.classify(texts, top_k=5)
    ref = hf_model(path, "sequence_classification")
    for text, labels in zip(texts, results, strict=True):
        batch = classifier.tokenizer([text])
        probs = torch.softmax(hf_logits(ref, batch.input_ids, batch.attention_mask)[0], -1)
        assert len(labels) == 3  # top_k is capped at the number of labels
        assert [r.score for r in labels] == sorted((r.score for r in labels), reverse=True)
        for r in labels:
            assert abs(r.score - float(probs[list(LABELS.values()).index(r.label)])) < 1e-5


def test_tagger_labels_every_piece(task_checkpoints: dict[tuple[str, str], Path]) -> None:
    path = task_checkpoints["distilbert", "token_classification"]
    classifier = rx.Classifier(path)
    text = "hello world, the cat sat"
    (pieces,) = classifier.tag([text])
    batch = classifier.tokenizer([text])
    logits = hf_logits(
        hf_model(path, "token_classification"), batch.input_ids, batch.attention_mask
    )
    best = torch.softmax(logits[0], -1).max(-1)
    assert len(pieces) == batch.input_ids.shape[1] - 2  # [CLS] and [SEP] left out
    for t, piece in enumerate(pieces, start=1):
        assert piece.label == LABELS[int(best.indices[t])]
        assert abs(piece.score - float(best.values[t])) < 1e-5
        assert text[piece.start : piece.end].lower() == piece.piece.removeprefix("##")


def test_classifier_refuses_what_it_cannot_do(
    task_checkpoints: dict[tuple[str, str], Path],
) -> None:
    with pytest.raises(rx.RegistryXFError, match="this model has a masked_lm head"):
        rx.Classifier(task_checkpoints["bert", "masked_lm"])
    with pytest.raises(rx.RegistryXFError, match="Encoder, no head"):
        rx.Classifier(rx.load(task_checkpoints["bert", "sequence_classification"], head=False))
    tagger = rx.Classifier(task_checkpoints["bert", "token_classification"])
    with pytest.raises(rx.RegistryXFError, match=r"classify\(\) needs a sequence_classification"):
        tagger.classify(["hello"])
    classifier = rx.Classifier(task_checkpoints["bert", "sequence_classification"])
    with pytest.raises(rx.InputError, match="top_k must be a positive integer; got 0"):
        classifier.classify(["hello"], top_k=0)
    with pytest.raises(rx.InputError, match="texts must be strings"):
        classifier.classify([b"hello"])  # type: ignore[list-item]


def test_cli_classify(
    task_checkpoints: dict[tuple[str, str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from registry_xf.cli import main

    model = str(task_checkpoints["roberta", "sequence_classification"])
    file = tmp_path / "texts.txt"
    file.write_text("the dog ran\n\nhello world\n")
    assert (
        main(["classify", "the cat sat", "--file", str(file), "--model", model, "--top-k", "2"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["[0]", "[1]", "[2]"]
    expected = rx.Classifier(model).classify(["the cat sat"], top_k=2)[0]
    assert lines[0].split()[-4:] == [
        expected[0].label,
        f"{expected[0].score:.3f}",
        expected[1].label,
        f"{expected[1].score:.3f}",
    ]

    tagger = str(task_checkpoints["bert", "token_classification"])
    assert main(["classify", "hello world", "--model", tagger]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[0] hello world" and len(out) == 3
    assert out[1].split()[:2] == ["hello", "hello"] and out[1].split()[2] in LABELS.values()

    assert main(["classify", "hi", "--model", str(task_checkpoints["bert", "masked_lm"])]) == 2
    assert "masked_lm head" in capsys.readouterr().err
    assert main(["classify", "--model", model]) == 2
    assert "nothing to classify" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("task", "override", "path"),
    [
        ("sequence_classification", {"model.head.dropout": 1.5}, r"model\.head\.dropout"),
        ("token_classification", {"model.head.width": 0}, r"model\.head\.width"),
        ("masked_lm", {"model.head.layer_norm_eps": -1.0}, r"model\.head\.layer_norm_eps"),
    ],
)
def test_head_settings_are_range_checked(
    task_checkpoints: dict[tuple[str, str], Path],
    task: str,
    override: dict[str, object],
    path: str,
) -> None:
    with pytest.raises(rx.ConfigError, match=path):
        rx.load(task_checkpoints["bert", task], overrides=override)
