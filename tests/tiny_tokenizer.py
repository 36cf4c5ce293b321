"""A WordPiece tokenizer.json over a vocabulary of exactly VOCAB pieces, for tiny checkpoints."""

from __future__ import annotations

import string
from pathlib import Path

from conftest import VOCAB

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "hello", "world", "is", "and"]


def vocabulary() -> dict[str, int]:
    letters = list(string.ascii_lowercase)
    pieces = SPECIALS + WORDS + letters + [f"##{c}" for c in letters] + list(".,!?")
    pieces += list(string.digits)
    pieces += [f"[unused{i}]" for i in range(VOCAB - len(pieces))]
    assert len(pieces) == len(set(pieces)) == VOCAB
    return {piece: i for i, piece in enumerate(pieces)}


def write_tokenizer(directory: Path) -> Path:
    """Write ``tokenizer.json`` (BERT-style: lowercase, [CLS] ... [SEP]) into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = vocabulary()
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path
