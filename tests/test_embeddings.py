"""Sentence embeddings and tokenization against sentence-transformers and HF tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import minilm_dir, requires_minilm

import registry_xf as rx

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "hi",
    "",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "A long text that goes on and on. " * 80,  # longer than 256 pieces: truncated
    "Someone in a gorilla costume is playing a set of drums.",
]


@pytest.fixture(scope="module")
def embedder() -> rx.Embedder:
    return rx.Embedder(rx.load(), batch_tokens=64)  # small budget: several batches


@requires_minilm
def test_minilm_matches_sentence_transformers(embedder: rx.Embedder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(TEXTS)
    ours = embedder.embed(TEXTS)
    assert ours.shape == reference.shape == (len(TEXTS), 384)
    cosine = (ours * reference).sum(1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize module


@requires_minilm
def test_batching_keeps_input_order(embedder: rx.Embedder) -> None:
    one_by_one = np.stack([embedder.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(embedder.embed(TEXTS), one_by_one, atol=1e-5)
    batches = list(embedder.batches([len(t) for t in TEXTS]))
    assert sorted(i for b in batches for i in b) == list(range(len(TEXTS)))


@requires_minilm
def test_similarity_table(embedder: rx.Embedder) -> None:
    sims = embedder.similarity(TEXTS[:3])
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-5)
    assert sims[0, 1] > sims[0, 2]  # eating food ~ eating bread, not carrying a baby


@requires_minilm
@pytest.mark.parametrize("name", ["registry_xf.CLSPooler.v1", "registry_xf.MaxPooler.v1"])
def test_other_poolers(embedder: rx.Embedder, name: str) -> None:
    pooler = rx.registry.poolers.get(name)(normalize=False)
    pooled = rx.Embedder(embedder.model, pooler=pooler).embed(TEXTS[:4])
    batch = embedder.model.tokenizer(TEXTS[:4])
    with torch.no_grad():
        hidden = embedder.model(**batch.model_inputs()).last_hidden_state
    if name.startswith("registry_xf.CLS"):
        expected = hidden[:, 0]
    else:
        expected = torch.stack(
            [h[m.bool()].max(0).values for h, m in zip(hidden, batch.attention_mask, strict=True)]
        )
    np.testing.assert_allclose(pooled, expected.numpy(), atol=1e-5)


@requires_minilm
def test_tokenizer_matches_hf() -> None:
    from transformers import AutoTokenizer

    ours = rx.load().tokenizer
    ref = AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = ours(TEXTS, max_length=32)
    expected = ref(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    assert torch.equal(batch.token_type_ids, expected["token_type_ids"])
    # offsets map pieces back to characters
    start, end = batch.offsets[0][1]
    assert TEXTS[0][start:end].lower() == ours.decode([int(batch.input_ids[0, 1])])
    assert ours.max_length == 256  # from sentence_bert_config.json
    assert len(ours([TEXTS[6]]).input_ids[0]) == 256
