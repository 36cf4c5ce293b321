"""The spaCy component: outputs against registry_xf run directly, windows, serialization,
multiprocessing, training with a listener, and inputs that must not crash it."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

spacy = pytest.importorskip("spacy")

from conftest import minilm_dir, requires_minilm, write_hf_checkpoint  # noqa: E402

import registry_xf as rx  # noqa: E402
from registry_xf.pipelines.spacy import add_vector_hooks  # noqa: E402
from registry_xf.pipelines.spacy.alignment import align_tokens  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Transformers read pieces of words, not whole words.",
    "A registry of components makes models easy to configure.",
    "Padding and truncation happen in the tokenizer, windows in the component.",
] * 20
TEXTS = [
    "The lazy fox reads pieces.",
    "Registry components configure models; the quick dog jumps!",
    "Words",
    "Transformers and tokenizers  happen   in pipelines, don't they?",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (64 positions) with a WordPiece tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("spacy") / "tiny-bert"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=99, special_tokens=specials)
    )
    tok.post_processor = processors.BertProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    )
    write_hf_checkpoint(path, "bert", vocab_size=tok.get_vocab_size())
    tok.save(str(path / "tokenizer.json"))
    return path


def _nlp(source: Path | str, **model: object):  # type: ignore[no-untyped-def]
    nlp = spacy.blank("en")
    config = {"@architectures": "registry_xf.TransformerModel.v1", "source": str(source), **model}
    nlp.add_pipe("registry_xf_transformer", config={"model": config})
    return nlp


def _direct_token_vectors(model: torch.nn.Module, doc) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Mean of each token's piece states, from one plain forward pass of registry_xf."""
    batch = model.tokenizer([doc.text])
    with torch.no_grad():
        hidden = model(**batch.model_inputs()).last_hidden_state[0, 1:-1].numpy()
    offsets = np.asarray(batch.offsets[0][1:-1]).reshape(-1, 2)
    spans = np.asarray([(t.idx, t.idx + len(t)) for t in doc]).reshape(-1, 2)
    rows, lengths = align_tokens(spans, offsets)
    out, start = [], 0
    for n in lengths:
        out.append(hidden[rows[start : start + n]].mean(0))
        start += n
    return np.stack(out)


def test_token_vectors_equal_pooled_pieces_in_padded_batches(tiny_bert: Path) -> None:
    nlp = _nlp(tiny_bert)
    model = rx.load(tiny_bert)
    for doc in nlp.pipe(TEXTS, batch_size=4):
        out = doc._.xf_data
        assert doc.tensor.shape == (len(doc), 32)
        assert out.last_hidden_state.shape == (len(out.piece_ids), 32)
        assert out.alignment.lengths.min() >= 1
        np.testing.assert_allclose(doc.tensor, _direct_token_vectors(model, doc), atol=1e-5)
        # spacy-transformers' accessors, for code written against them
        assert out.tensors[0].shape == (1, *out.last_hidden_state.shape)
        np.testing.assert_array_equal(out.tensors[-1][0], out.embedding)
        assert out.align is out.alignment


def test_alignment_of_pieces_spanning_tokens_and_orphan_tokens() -> None:
    # tokens "don" "'t" and a whitespace token; one piece spans two tokens
    spans = np.array([[0, 3], [3, 5], [6, 7], [7, 11]])
    pieces = np.array([[0, 4], [4, 5], [7, 11]])
    rows, lengths = align_tokens(spans, pieces)
    assert lengths.tolist() == [1, 2, 1, 1]
    assert rows.tolist() == [0, 0, 1, 1, 2]  # the whitespace token borrows the piece before


def test_long_docs_use_averaged_strided_windows(tiny_bert: Path) -> None:
    text = " ".join(CORPUS[:12])  # well over the model's 62 content positions
    nlp = _nlp(tiny_bert, window=24, stride=16)
    doc = nlp(text)
    out = doc._.xf_data
    n = len(out.piece_ids)
    assert n > 62 and doc.tensor.shape == (len(doc), 32)
    assert np.isfinite(doc.tensor).all() and (np.abs(doc.tensor).sum(1) > 0).all()
    # the same windows run one by one through registry_xf, overlaps averaged
    model = rx.load(tiny_bert)
    ids = torch.tensor(out.piece_ids, dtype=torch.long)
    cls, sep = (
        model.tokenizer.tokenizer.token_to_id("[CLS]"),
        model.tokenizer.tokenizer.token_to_id("[SEP]"),
    )
    total, counts = torch.zeros(n, 32), torch.zeros(n)
    start = 0
    while True:
        end = min(start + 24, n)
        window = torch.cat([torch.tensor([cls]), ids[start:end], torch.tensor([sep])])[None]
        with torch.no_grad():
            total[start:end] += model(window).last_hidden_state[0, 1:-1]
        counts[start:end] += 1
        if end == n:
            break
        start += 16
    expected = (total / counts[:, None]).numpy()
    np.testing.assert_allclose(out.last_hidden_state, expected, atol=1e-5)


def test_inputs_that_must_not_crash(tiny_bert: Path) -> None:
    nlp = _nlp(tiny_bert)
    long_token = ".".join(["fox"] * 300)  # one spaCy token, hundreds of pieces
    empty, blank, huge = nlp.pipe(["", "   \n\t  ", long_token + " fox"])
    assert empty.tensor.shape == (0, 32) and empty._.xf_data.embedding.shape == (32,)
    assert blank.tensor.shape == (len(blank), 32)
    assert huge.tensor.shape == (2, 32) and np.isfinite(huge.tensor).all()
    assert len(huge._.xf_data.piece_ids) > 64  # one token, longer than the model's positions
    assert np.isfinite(huge.vector).all() and np.isfinite(empty.vector).all()
    assert -1 <= huge.similarity(empty) <= 1


@requires_minilm
def test_minilm_similarity_is_the_cosine_of_sentence_embeddings() -> None:
    nlp = _nlp(minilm_dir())
    embedder = rx.Embedder(minilm_dir())
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A monkey plays drums."]
    docs = list(nlp.pipe(texts))
    expected = embedder.similarity(texts)
    for i in range(3):
        np.testing.assert_allclose(docs[i].vector, embedder.embed([texts[i]])[0], atol=1e-5)
        for j in range(3):
            assert docs[i].similarity(docs[j]) == pytest.approx(expected[i, j], abs=1e-5)
    model = rx.load(minilm_dir())
    np.testing.assert_allclose(docs[0].tensor, _direct_token_vectors(model, docs[0]), atol=1e-5)
    span = docs[0][2:4]
    assert span.vector.shape == (384,) and -1 <= span.similarity(docs[1]) <= 1
    assert docs[0][1].similarity(docs[0][1]) == pytest.approx(1.0)


def test_to_disk_and_spacy_load_give_identical_outputs(tiny_bert: Path, tmp_path: Path) -> None:
    nlp = _nlp(tiny_bert)
    before = [doc._.xf_data for doc in nlp.pipe(TEXTS)]
    nlp.to_disk(tmp_path / "pipeline")
    folder = tmp_path / "pipeline" / "registry_xf_transformer" / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    written = {p.name for p in folder.parent.rglob("*") if p.is_file()}
    assert written == {"config.cfg", "model.safetensors", "tokenizer.json", "meta.json"}
    loaded = spacy.load(tmp_path / "pipeline")
    after = [doc._.xf_data for doc in loaded.pipe(TEXTS)]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.last_hidden_state, b.last_hidden_state)
        assert np.array_equal(a.embedding, b.embedding)
    restored = spacy.blank("en").from_config(nlp.config)
    restored.from_bytes(nlp.to_bytes())
    # the same batches as before: a padded batch may round differently from a lone doc
    for a, doc in zip(before, restored.pipe(TEXTS), strict=True):
        assert np.array_equal(a.last_hidden_state, doc._.xf_data.last_hidden_state)


def test_pipe_with_two_processes_and_pickling(tiny_bert: Path) -> None:
    nlp = _nlp(tiny_bert)
    texts = TEXTS * 3
    single = [doc.tensor for doc in nlp.pipe(texts)]
    multi = list(nlp.pipe(texts, n_process=2, batch_size=2))
    for expected, doc in zip(single, multi, strict=True):
        np.testing.assert_allclose(doc.tensor, expected, atol=1e-6)
        assert doc._.xf_data.last_hidden_state.shape[0] == len(doc._.xf_data.piece_ids)
        assert not doc.user_hooks  # bytes carry no hooks; the workers set none (no W109)
        add_vector_hooks(doc)
        np.testing.assert_allclose(doc.vector, doc._.xf_data.embedding)
    pipe = pickle.loads(pickle.dumps(nlp.get_pipe("registry_xf_transformer")))
    np.testing.assert_allclose(pipe(nlp.make_doc(texts[0])).tensor, single[0], atol=1e-6)


def test_registry_xf_sections_in_a_spacy_config(tiny_bert: Path) -> None:
    """The model can be built from registry_xf's own registered functions."""
    cfg = rx.loading.hf.hf_config(tiny_bert)
    nlp = spacy.blank("en")
    model = {
        "@architectures": "registry_xf.TransformerModel.v1",
        "encoder": rx.config.resolve.interpolate(cfg)["model"],
        "weights": dict(rx.config.resolve.interpolate(cfg)["weights"]),
        "tokenizer": dict(rx.config.resolve.interpolate(cfg)["tokenizer"]),
    }
    nlp.add_pipe("registry_xf_transformer", config={"model": model})
    reference = _nlp(tiny_bert)
    for a, b in zip(nlp.pipe(TEXTS), reference.pipe(TEXTS), strict=True):
        np.testing.assert_allclose(a.tensor, b.tensor, atol=1e-6)


def test_trainable_transformer_is_fine_tuned_and_frozen_one_is_not(tiny_bert: Path) -> None:
    from spacy.training import Example

    for trainable in (False, True):
        nlp = spacy.blank("en")
        nlp.add_pipe(
            "registry_xf_transformer",
            config={
                "model": {
                    "@architectures": "registry_xf.TransformerModel.v1",
                    "source": str(tiny_bert),
                    "trainable": trainable,
                }
            },
        )
        tagger = nlp.add_pipe(
            "tagger",
            config={
                "model": {
                    "@architectures": "spacy.Tagger.v2",
                    "tok2vec": {
                        "@architectures": "registry_xf.TransformerListener.v1",
                        "pooling": {"@layers": "reduce_mean.v1"},
                    },
                }
            },
        )
        examples = [
            Example.from_dict(
                nlp.make_doc(t), {"tags": ["N" if i % 2 else "V" for i, _ in enumerate(t.split())]}
            )
            for t in ["The fox jumps", "Words read pieces", "Models configure components"]
        ]
        optimizer = nlp.initialize(lambda examples=examples: examples)
        assert tagger.labels == ("N", "V")
        encoder = rx.pipelines.spacy.model.encoder_of(nlp.get_pipe("registry_xf_transformer").model)
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        losses = [nlp.update(examples, sgd=optimizer)["tagger"] for _ in range(25)]
        assert losses[-1] < losses[0]
        changed = any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())
        assert changed is trainable


TRAIN_CONFIG = """
[paths]
train = null
dev = null

[nlp]
lang = "en"
pipeline = ["transformer","tagger"]
batch_size = 8

[components]

[components.transformer]
factory = "registry_xf_transformer"

[components.transformer.model]
@architectures = "registry_xf.TransformerModel.v1"
source = "{source}"

[components.tagger]
factory = "tagger"

[components.tagger.model]
@architectures = "spacy.Tagger.v2"

[components.tagger.model.tok2vec]
@architectures = "registry_xf.TransformerListener.v1"

[components.tagger.model.tok2vec.pooling]
@layers = "reduce_mean.v1"

[corpora]

[corpora.train]
@readers = "spacy.Corpus.v1"
path = ${{paths.train}}

[corpora.dev]
@readers = "spacy.Corpus.v1"
path = ${{paths.dev}}

[training]
max_steps = 30
eval_frequency = 10
seed = 0

[training.optimizer]
@optimizers = "Adam.v1"
learn_rate = 0.01

[training.logger]
@loggers = "spacy.ConsoleLogger.v3"
progress_bar = null
output_file = "{log}"
"""


def test_spacy_train_with_a_listener_lowers_the_loss(tiny_bert: Path, tmp_path: Path) -> None:
    from spacy.tokens import DocBin

    nlp = spacy.blank("en")
    bin_ = DocBin()
    for i, text in enumerate(CORPUS[:8]):
        doc = nlp.make_doc(text)
        for j, token in enumerate(doc):
            token.tag_ = "PUNCT" if token.is_punct else ("N" if (i + j) % 2 else "V")
        bin_.add(doc)
    bin_.to_disk(tmp_path / "train.spacy")
    log = tmp_path / "log.jsonl"
    (tmp_path / "config.cfg").write_text(TRAIN_CONFIG.format(source=tiny_bert, log=log))
    filled = subprocess.run(
        [sys.executable, "-m", "spacy", "init", "fill-config", "config.cfg", "filled.cfg"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert filled.returncode == 0, filled.stderr
    assert "vector_hooks = true" in (tmp_path / "filled.cfg").read_text()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "spacy",
            "train",
            "filled.cfg",
            "--output",
            "out",
            "--paths.train",
            "train.spacy",
            "--paths.dev",
            "train.spacy",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    # each line sums the loss since the line before it: compare losses per step
    steps = [line["step"] for line in lines]
    per_step = [
        line["losses"]["tagger"] / max(step - before, 1)
        for line, step, before in zip(lines, steps, [-1, *steps], strict=False)
    ]
    assert len(per_step) >= 3 and per_step[-1] < per_step[0] / 2
    trained = spacy.load(tmp_path / "out" / "model-last")
    assert trained("The quick fox")[1].tag_ in {"N", "V", "PUNCT"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_require_gpu_puts_weights_and_inputs_on_the_gpu(tiny_bert: Path) -> None:
    spacy.require_gpu()
    try:
        nlp = _nlp(tiny_bert)
        doc = nlp(TEXTS[0])
        encoder = rx.pipelines.spacy.model.encoder_of(nlp.get_pipe("registry_xf_transformer").model)
        assert next(encoder.parameters()).device.type == "cuda"
        assert doc.tensor.shape == (len(doc), 32)
    finally:
        spacy.require_cpu()


def test_bad_settings_and_sources_are_reported_clearly(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(rx.ConfigError, match=r"model\.dtype.*float99"):
        _nlp(tiny_bert, dtype="float99")
    with pytest.raises(rx.ConfigError, match=r"model\.window"):
        _nlp(tiny_bert, window=0)
    nlp = _nlp(tmp_path / "no-such-model")
    with pytest.raises(rx.RegistryXFError, match="no-such-model"):
        nlp("text")


def test_thinc_serialization_of_the_model_uses_safetensors(tiny_bert: Path) -> None:
    nlp = _nlp(tiny_bert)
    model = nlp.get_pipe("registry_xf_transformer").model
    expected = nlp(TEXTS[0]).tensor
    data = model.shims[0].to_bytes()
    import srsly
    from safetensors.torch import load as load_safetensors

    state = load_safetensors(srsly.msgpack_loads(data)["state"])  # safetensors, not a pickle
    assert "embeddings.word_embeddings.weight" in state
    other = _nlp(tiny_bert)
    other_model = other.get_pipe("registry_xf_transformer").model
    other.initialize()
    with torch.no_grad():
        for p in rx.pipelines.spacy.model.encoder_of(other_model).parameters():
            p.zero_()
    other_model.shims[0].from_bytes(data)
    np.testing.assert_array_equal(other(TEXTS[0]).tensor, expected)


def test_all_layers_and_the_spacy_transformers_extension_name(tiny_bert: Path) -> None:
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "registry_xf_transformer",
        config={
            "model": {"source": str(tiny_bert), "all_layers": True},
            "extension": "trf_data",
        },
    )
    doc = nlp(TEXTS[1])
    out = doc._.trf_data
    assert len(out.all_hidden_states) == 3  # embeddings + 2 layers
    np.testing.assert_array_equal(out.all_hidden_states[-1], out.last_hidden_state)
    # what KeyBERT and BERTopic read
    assert len(doc._.trf_data.tensors[-1][0].tolist()) == 32
    np.testing.assert_allclose(doc.vector, out.embedding)
    span = doc[1:3]
    rows = sorted({int(r) for i in range(1, 3) for r in _rows(out, i)})
    np.testing.assert_allclose(span.vector, out.last_hidden_state[rows].mean(0), atol=1e-6)


def _rows(out, i: int) -> list[int]:  # type: ignore[no-untyped-def]
    start = int(out.alignment.lengths[:i].sum())
    return list(out.alignment.dataXd[start : start + int(out.alignment.lengths[i])])


def test_outputs_survive_docbin_serialization(tiny_bert: Path) -> None:
    from spacy.tokens import DocBin

    nlp = _nlp(tiny_bert)
    docs = list(nlp.pipe(TEXTS))
    data = DocBin(docs=docs, store_user_data=True).to_bytes()
    restored = list(DocBin().from_bytes(data).get_docs(nlp.vocab))
    for before, after in zip(docs, restored, strict=True):
        a, b = before._.xf_data, after._.xf_data
        np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
        np.testing.assert_array_equal(a.alignment.lengths, b.alignment.lengths)
        np.testing.assert_array_equal(a.embedding, b.embedding)
