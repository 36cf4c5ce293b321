"""Sparse (SPLADE) embeddings against sentence-transformers' SparseEncoder.

A tiny BertForMaskedLM checkpoint is written with the test tokenizer, then saved by
sentence-transformers as a SparseEncoder (a fill-mask Transformer and SpladePooling, as its
SPLADE models are laid out); our vectors must equal its, pruned or not, and bad inputs must
get typed errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_heads import write_task_checkpoint

import registry_xf as rx

ATOL = 1e-5
TEXTS = [
    "the cat sat on the mat",
    "hello world",
    "a dog ran, and the cat ran on and on: is it the world?",
    "",
    "mat",
    "the world is the world and the cat is the cat " * 6,
]


def st_sparse_encoder(
    mlm: Path, directory: Path, *, settings: dict | None = None, **pooling: str
) -> Path:
    """Save ``mlm`` as sentence-transformers' SparseEncoder with SpladePooling(**pooling);
    ``settings`` go to the SparseEncoder (prompts, default_prompt_name)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    transformer = Transformer(str(mlm), transformer_task="fill-mask")
    modules = [transformer, SpladePooling(**pooling)]
    model = SparseEncoder(modules=modules, device="cpu", **(settings or {}))
    model.save(str(directory))
    return directory


@pytest.fixture(scope="module")
def mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sparse")
    return write_task_checkpoint(root / "mlm", "bert", "masked_lm", initializer_range=0.05)


@pytest.fixture(scope="module")
def splade(mlm: Path) -> Path:
    return st_sparse_encoder(mlm, mlm.parent / "splade")


def reference(directory: Path):  # type: ignore[no-untyped-def]
    from sentence_transformers import SparseEncoder

    return SparseEncoder(str(directory), device="cpu", local_files_only=True)


def test_vectors_match_sentence_transformers(splade: Path) -> None:
    ours = rx.SparseEncoder(splade, batch_tokens=64)  # several batches
    assert isinstance(ours.pooler, rx.SpladePooler) and ours.pooler.strategy == "max"
    got = ours.encode(TEXTS)
    assert got.is_sparse and got.shape == (len(TEXTS), ours.vocab_size)
    assert got.dtype == torch.float32
    expected = reference(splade).encode(TEXTS, convert_to_sparse_tensor=False)
    torch.testing.assert_close(got.to_dense(), expected, atol=ATOL, rtol=0)
    dense = got.to_dense()
    assert (dense >= 0).all()
    active = (dense > 0).sum(1)
    assert 0 < active[0] < ours.vocab_size  # sparse, not empty


@pytest.mark.parametrize(
    "pooling",
    [{"pooling_strategy": "sum"}, {"activation_function": "log1p_relu"}],
    ids=["sum", "log1p_relu"],
)
def test_pooling_settings_are_read_from_the_directory(
    mlm: Path, tmp_path: Path, pooling: dict[str, str]
) -> None:
    directory = st_sparse_encoder(mlm, tmp_path / "splade", **pooling)
    ours = rx.SparseEncoder(directory)
    expected = reference(directory).encode(TEXTS, convert_to_sparse_tensor=False)
    torch.testing.assert_close(ours.encode(TEXTS).to_dense(), expected, atol=ATOL, rtol=0)


def test_max_active_dims_matches_sentence_transformers(splade: Path) -> None:
    ours = rx.SparseEncoder(splade)
    ref = reference(splade)
    for k in (1, 5):
        got = ours.encode(TEXTS, max_active_dims=k).to_dense()
        expected = ref.encode(TEXTS, max_active_dims=k, convert_to_sparse_tensor=False)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert ((got > 0).sum(1) <= k).all()
    setting = rx.SparseEncoder(splade, max_active_dims=3)  # a model-wide setting
    assert ((setting.encode(TEXTS).to_dense() > 0).sum(1) <= 3).all()


def test_indices_and_decoded_terms(splade: Path) -> None:
    ours = rx.SparseEncoder(splade)
    vectors = ours.encode(TEXTS[:2]).to_dense()
    pairs = ours.encode_indices(TEXTS[:2], max_active_dims=4)
    for row, (ids, weights) in enumerate(pairs):
        assert ids.dtype == np.int64 and weights.dtype == np.float32 and len(ids) == 4
        assert (np.diff(weights) <= 0).all()  # heaviest first
        np.testing.assert_allclose(weights, vectors[row, torch.as_tensor(ids)].numpy())
        assert set(ids) == set(vectors[row].topk(4).indices.tolist())
    terms = ours.decode(ours.encode(TEXTS[:2]), top_k=3)
    ref_terms = reference(splade).decode(reference(splade).encode(TEXTS[:2]), top_k=3)
    assert [[t for t, _ in row] for row in terms] == [[t for t, _ in row] for row in ref_terms]
    np.testing.assert_allclose(
        [[w for _, w in row] for row in terms],
        [[w for _, w in row] for row in ref_terms],
        atol=ATOL,
    )
    assert ours.decode(vectors[0])[0][0][0] == terms[0][0][0]  # one dense vector works too
    assert ours.decode(torch.zeros(ours.vocab_size)) == [[]]


def test_plain_masked_lm_checkpoint_gets_the_default_pooler(mlm: Path, splade: Path) -> None:
    ours = rx.SparseEncoder(mlm)  # an HF *ForMaskedLM directory: max, relu
    torch.testing.assert_close(
        ours.encode(TEXTS).to_dense(), rx.SparseEncoder(splade).encode(TEXTS).to_dense()
    )


def test_registered_pooler() -> None:
    pooler = rx.registry.poolers.get("registry_xf.SpladePooler.v1")(strategy="sum")
    assert isinstance(pooler, rx.SpladePooler) and pooler.strategy == "sum"
    logits = torch.tensor([[[1.0, -2.0, 0.5], [3.0, 0.0, -1.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    expected = torch.log1p(torch.tensor([[1.0, 0.0, 0.5]])) + torch.log1p(
        torch.tensor([[3.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(pooler(logits, mask), expected)
    with pytest.raises(ValueError, match="strategy must be 'max' or 'sum'"):
        rx.SpladePooler("mean")  # type: ignore[arg-type]


def test_save_keeps_the_pooler(mlm: Path, tmp_path: Path) -> None:
    directory = st_sparse_encoder(mlm, tmp_path / "splade", pooling_strategy="sum")
    model = rx.load(directory)
    assert model.config["pooling"]["@poolers"] == "registry_xf.SpladePooler.v1"
    saved = rx.SparseEncoder(rx.save(model, tmp_path / "saved"))
    assert saved.pooler.strategy == "sum"
    torch.testing.assert_close(
        saved.encode(TEXTS).to_dense(), rx.SparseEncoder(model).encode(TEXTS).to_dense()
    )


PROMPTS = {"query": "query: ", "passage": "passage: ", "title": "title of the world: "}


@pytest.fixture(scope="module")
def prompted(mlm: Path) -> Path:
    settings = {"prompts": PROMPTS, "default_prompt_name": "title"}
    return st_sparse_encoder(mlm, mlm.parent / "prompted", settings=settings)


def test_prompts_match_sentence_transformers(prompted: Path) -> None:
    ours = rx.SparseEncoder(prompted)
    ref = reference(prompted)
    assert ours.prompts == {"document": "", **PROMPTS} and ours.default_prompt_name == "title"
    cases = [  # (ours, sentence-transformers): the same arguments
        ({}, {}),  # the default prompt
        ({"prompt_name": "query"}, {"prompt_name": "query"}),
        ({"prompt": "a cat: "}, {"prompt": "a cat: "}),
        ({"prompt": ""}, {"prompt": ""}),  # no prompt at all, over the default
    ]
    for settings, st_settings in cases:
        got = ours.encode(TEXTS, **settings).to_dense()
        expected = ref.encode(TEXTS, convert_to_sparse_tensor=False, **st_settings)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=str(settings))
    plain = ref.encode(TEXTS, prompt="", convert_to_sparse_tensor=False)
    assert not torch.allclose(ours.encode(TEXTS).to_dense(), plain)  # the prompt counts
    for ours_fn, st_fn in (
        (ours.encode_query, ref.encode_query),
        (ours.encode_document, ref.encode_document),  # "passage": the first one present
    ):
        torch.testing.assert_close(
            ours_fn(TEXTS, max_active_dims=4).to_dense(),
            st_fn(TEXTS, max_active_dims=4, convert_to_sparse_tensor=False),
            atol=ATOL,
            rtol=0,
        )
    [(ids, _)] = ours.encode_indices(TEXTS[:1], prompt_name="query", max_active_dims=3)
    assert len(ids) == 3


def test_constructor_prompts_override_the_checkpoint(prompted: Path) -> None:
    ours = rx.SparseEncoder(prompted, prompts={"query": "q: "}, default_prompt_name="query")
    assert ours.prompts["query"] == "q: " and ours.prompts["title"] == PROMPTS["title"]
    ref = reference(prompted)
    torch.testing.assert_close(
        ours.encode(TEXTS[:3]).to_dense(),
        ref.encode(TEXTS[:3], prompt="q: ", convert_to_sparse_tensor=False),
        atol=ATOL,
        rtol=0,
    )


def test_bad_prompts_get_typed_errors(prompted: Path) -> None:
    ours = rx.SparseEncoder(prompted)
    with pytest.raises(rx.InputError, match=r"prompt_name='querry': no such prompt.*'query'"):
        ours.encode(TEXTS, prompt_name="querry")
    with pytest.raises(rx.InputError, match="give one or the other"):
        ours.encode_query(TEXTS, prompt="a", prompt_name="query")
    with pytest.raises(rx.InputError, match="default_prompt_name='nope': no such prompt"):
        rx.SparseEncoder(prompted, default_prompt_name="nope")
    with pytest.raises(rx.InputError, match="prompts must map prompt names to texts"):
        rx.SparseEncoder(prompted, prompts={"query": 3})  # type: ignore[dict-item]
    with pytest.raises(rx.InputError, match="prompt must be a str"):
        ours.encode(TEXTS, prompt=["x"])  # type: ignore[arg-type]
    with pytest.raises(rx.InputError, match="texts must be a str or a list of str"):
        ours.encode(42)  # type: ignore[arg-type]
    for dense in ({"truncate_dim": 8}, {"precision": "binary"}):  # settings of dense vectors
        with pytest.raises(rx.InputError, match=f"{next(iter(dense))}: not a setting of sparse"):
            ours.encode_query(TEXTS, **dense)


def test_bad_inputs_get_typed_errors(splade: Path, mlm: Path) -> None:
    ours = rx.SparseEncoder(splade)
    for k in (0, -3, 2.5, True):
        with pytest.raises(rx.InputError, match="max_active_dims must be a positive integer"):
            ours.encode(TEXTS, max_active_dims=k)  # type: ignore[arg-type]
    with pytest.raises(rx.InputError, match="top_k must be a positive integer"):
        ours.decode(ours.encode(TEXTS[:1]), top_k=0)
    with pytest.raises(rx.InputError, match="1-d or 2-d torch tensor"):
        ours.decode([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(rx.InputError, match="vectors have 7 entries"):
        ours.decode(torch.zeros(7))
    with pytest.raises(rx.InputError, match="text 1 is a int"):
        ours.encode(["a", 1])  # type: ignore[list-item]
    with pytest.raises(rx.RegistryXFError, match="masked-LM head"):
        rx.SparseEncoder(rx.load(mlm, head=False))
    with pytest.raises(rx.RegistryXFError, match="use registry_xf.SparseEncoder"):
        rx.Embedder(splade)
