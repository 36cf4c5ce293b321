"""A tokenizer from a ``tokenizer.json`` file, with padding and truncation done by us."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer

from ..errors import CheckpointError, InputError
from ..registry import registry
from ..types import PathLike

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# tokenizer_config.json uses a huge number for "no limit"
_NO_LIMIT = 10**9
# truncating copies kept per tokenizer (each holds the vocabulary once more)
MAX_TRUNCATING_COPIES = 4


@dataclass
class Batch:
    """Padded model inputs (batch, seq) and the character offsets of each piece."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    offsets: list[list[tuple[int, int]]]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.token_type_ids.to(device),
            self.offsets,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


class HFTokenizer:
    """Batch encoding with special tokens, truncation, padding and offsets.

    Safe to share between threads: no call changes a ``tokenizers.Tokenizer`` that another
    may be using. Truncation is a setting of the Rust object, so each truncation length
    gets its own copy, made once and kept (a few per process at most: the model's limit,
    and those that callers ask for); untruncated encodes use the original.
    """

    def __init__(self, file: Path, *, max_length: int | None, pad_id: int | None = None):
        self.file = file
        self.source = file.parent
        self.max_length = max_length
        self._pad_id = pad_id
        self._tokenizer: Tokenizer | None = None
        self._truncating: dict[int, Tokenizer] = {}
        self._lock = threading.Lock()  # held while a copy is made, never while encoding

    @property
    def tokenizer(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` (it never truncates), read from its file on first
        use: loading a model for its weights alone never pays for parsing a vocabulary."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = self._read()
                tokenizer = self._tokenizer
        return tokenizer

    def _read(self) -> Tokenizer:
        try:
            tokenizer = Tokenizer.from_file(str(self.file))
        except Exception as e:
            raise CheckpointError(f"{self.file}: cannot read tokenizer ({e})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if self._pad_id is None:
            self._pad_id = _pad_id(tokenizer, self.source)
        return tokenizer

    def truncating(self, max_length: int) -> Tokenizer:
        """A copy of the tokenizer that truncates to ``max_length`` ids (made once)."""
        found = self._truncating.get(max_length)
        if found is None:
            base = self.tokenizer
            with self._lock:
                found = self._truncating.get(max_length)
                if found is None:
                    if len(self._truncating) >= MAX_TRUNCATING_COPIES:
                        # the oldest copy goes; a thread encoding with it keeps its reference
                        self._truncating.pop(next(iter(self._truncating)))
                    found = Tokenizer.from_str(base.to_str())
                    found.no_padding()
                    found.enable_truncation(max_length)
                    self._truncating[max_length] = found
        return found

    @property
    def pad_id(self) -> int:
        if self._pad_id is None:
            self.tokenizer  # noqa: B018 - reading the file sets the padding id
        assert self._pad_id is not None
        return self._pad_id

    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_tokenizer": None, "_truncating": {}}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def n_special_tokens(self) -> int:
        """How many special tokens encoding one text adds."""
        processor = self.tokenizer.post_processor
        return int(processor.num_special_tokens_to_add(False)) if processor is not None else 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> list[Encoding]:
        """Unpadded encodings, truncated to ``max_length`` (default: the tokenizer's).

        A lone surrogate (half of a UTF-16 pair, as ``surrogateescape`` decoding leaves) is
        read as U+FFFD, one character for one, so offsets still index the given text; the
        first time, a warning says so.
        """
        if isinstance(texts, str):
            raise InputError("encode takes a list of texts; wrap a single text in a list")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i} is a {type(text).__name__}, not a str")
        texts = _without_lone_surrogates(texts)
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise InputError(f"max_length must be an int of at least 1; found {max_length!r}")
        limit = max_length or self.max_length
        truncate = truncation and limit and limit < _NO_LIMIT  # beyond, nothing is cut
        if truncate and add_special_tokens and limit <= self.n_special_tokens:
            # tokenizers would silently return more than max_length ids
            raise InputError(
                f"max_length {limit} leaves no room for text beside the tokenizer's "
                f"{self.n_special_tokens} special tokens"
            )
        tokenizer = self.truncating(limit) if truncate else self.tokenizer
        return tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode_pairs(
        self, pairs: Sequence[tuple[str, str]], *, max_length: int | None = None
    ) -> list[Encoding]:
        """Unpadded encodings of (first, second) text pairs, one sequence each (BERT:
        ``[CLS] a [SEP] b [SEP]`` with token types 0 then 1), truncated to ``max_length``
        (default: the tokenizer's) by cutting the longer text first, as HF tokenizers do."""
        texts = _without_lone_surrogates([text for pair in pairs for text in pair])
        limit = max_length or self.max_length
        truncate = bool(limit) and limit < _NO_LIMIT
        processor = self.tokenizer.post_processor
        specials = int(processor.num_special_tokens_to_add(True)) if processor else 0
        if truncate and limit <= specials + 1:
            raise InputError(
                f"max_length {limit} leaves no room for a pair of texts beside the tokenizer's "
                f"{specials} special tokens"
            )
        tokenizer = self.truncating(limit) if truncate else self.tokenizer
        return tokenizer.encode_batch(list(zip(texts[::2], texts[1::2], strict=True)))

    def pad(self, encodings: Sequence[Encoding]) -> Batch:
        """Right-pad encodings into one batch."""
        n = len(encodings)
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for row, e in enumerate(encodings):
            length = len(e.ids)
            ids[row, :length] = e.ids
            mask[row, :length] = e.attention_mask
            types[row, :length] = e.type_ids
        return Batch(
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            torch.from_numpy(types),
            [list(e.offsets) for e in encodings],
        )

    def __call__(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> Batch:
        """Encode and pad ``texts`` into one batch."""
        return self.pad(
            self.encode(
                texts,
                add_special_tokens=add_special_tokens,
                truncation=truncation,
                max_length=max_length,
            )
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: Path) -> None:
        """Copy the tokenizer's files into ``directory`` (each written atomically)."""
        if not self.file.is_file():  # never write a model whose tokenizer is missing
            raise CheckpointError(
                f"{self.file}: the tokenizer file is gone (moved or deleted since loading); "
                "cannot save the tokenizer"
            )
        # the tokenizer file may have another name; saved, it is tokenizer.json
        sources = {name: self.source / name for name in TOKENIZER_FILES}
        sources["tokenizer.json"] = self.file
        for name, source in sources.items():
            if source.is_file():
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
                os.close(fd)
                shutil.copyfile(source, tmp)
                os.replace(tmp, directory / name)


_SURROGATE = re.compile("[\ud800-\udfff]")
_warned_surrogates = False


def _without_lone_surrogates(texts: list[str]) -> list[str]:
    """``texts`` with every lone surrogate replaced by U+FFFD (tokenizers cannot take them)."""
    global _warned_surrogates
    found = [i for i, text in enumerate(texts) if _SURROGATE.search(text)]
    if not found:
        return texts
    if not _warned_surrogates:
        _warned_surrogates = True
        logger.warning(
            "text %d (of %d) holds a lone surrogate, which is not a character: it is read "
            "as U+FFFD (this warning is given once)",
            found[0],
            len(texts),
        )
    fixed = list(texts)
    for i in found:
        fixed[i] = _SURROGATE.sub("\ufffd", fixed[i])
    return fixed


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pad_id(tokenizer: Tokenizer, directory: Path) -> int:
    """The padding id: from tokenizer.json's padding, else the declared pad token, else 0."""
    config = _read_json(directory / "tokenizer_config.json")
    specials = _read_json(directory / "special_tokens_map.json")
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in (_token_text(config.get("pad_token")), _token_text(specials.get("pad_token"))):
        if token is not None and tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    return 0


@registry.tokenizers.register("registry_xf.HFTokenizer.v1")
def hf_tokenizer(path: PathLike, max_length: int | None = None) -> HFTokenizer:
    """The tokenizer in ``path`` (a directory with tokenizer.json, or the file itself).

    ``max_length`` truncates inputs; None takes ``model_max_length`` from
    tokenizer_config.json when it sets a real limit.
    """
    directory = path if path.is_dir() else path.parent
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            f"{file}: no tokenizer.json (registry_xf reads fast-tokenizer files only)"
        )
    if max_length is None:
        limit = _read_json(directory / "tokenizer_config.json").get("model_max_length")
        if isinstance(limit, (int, float)) and 0 < limit < _NO_LIMIT:
            max_length = int(limit)
    return HFTokenizer(file, max_length=max_length)
