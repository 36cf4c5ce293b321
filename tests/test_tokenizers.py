"""The tokenizer loader on WordPiece, BPE and Unigram tokenizer.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import registry_xf as rx

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Transformers read pieces of words, not whole words.",
    "A registry of components makes models easy to configure.",
    "Padding and truncation happen in the tokenizer.",
] * 20
TEXTS = ["The lazy fox reads pieces.", "", "configure registry components and models " * 6]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _trained(kind: str) -> Tokenizer:
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=100, special_tokens=SPECIALS, unk_token="<unk>"
        )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece() if kind == "wordpiece" else decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return tok


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_encoding_matches_hf_fast_tokenizer(kind: str, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    _trained(kind).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "<pad>", "model_max_length": 16})
    )
    ours = rx.registry.tokenizers.get("registry_xf.HFTokenizer.v1")(path=str(tmp_path))
    assert ours.max_length == 16 and ours.pad_id == 0
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>"
    )
    batch = ours(TEXTS)
    expected = ref(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    assert batch.input_ids.shape[1] == 16  # the long text was truncated
    # offsets: one per real piece, in order, covering the words of the text
    single = ours([TEXTS[0]], max_length=64)
    n_real = int(single.attention_mask[0].sum())
    spans = single.offsets[0][1 : n_real - 1]  # without <s> and </s>
    assert len(spans) == n_real - 2
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    covered = "".join(TEXTS[0][start:end] for start, end in spans)
    assert covered == TEXTS[0].replace(" ", "")


def test_missing_and_corrupt_tokenizer_files(tmp_path: Path) -> None:
    loader = rx.registry.tokenizers.get("registry_xf.HFTokenizer.v1")
    with pytest.raises(rx.CheckpointError, match="tokenizer.json"):
        loader(path=str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(rx.CheckpointError, match="cannot read tokenizer"):
        loader(path=str(tmp_path))(["text"])
