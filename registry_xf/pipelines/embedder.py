"""Sentence embeddings with length-sorted, token-budget batching."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RegistryXFError
from ..loading.load import load
from ..loading.sources import DEFAULT_MODEL
from .poolers import Pooler

logger = logging.getLogger(__name__)


class Embedder:
    """One vector per text from an encoder, its tokenizer and a pooler.

    Texts are sorted by length and grouped into batches of about ``batch_tokens`` tokens
    (padded), so short texts share large batches and long ones get small batches: little
    padding, and the CPU stays busy. Results come back in the input order. The default
    budget (2,048 tokens) keeps a batch's activations in cache on CPUs; on a GPU a larger
    one is faster.
    """

    def __init__(
        self,
        model: nn.Module | str | Path = DEFAULT_MODEL,
        *,
        pooler: Pooler | None = None,
        normalize: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_tokens: int = 2048,
        max_batch_size: int = 256,
    ):
        self.model = (
            model if isinstance(model, nn.Module) else load(model, device=device, dtype=dtype)
        )
        self.tokenizer = getattr(self.model, "tokenizer", None)
        if self.tokenizer is None:
            raise RegistryXFError("this model has no tokenizer: its source needs a tokenizer.json")
        pooler = pooler or getattr(self.model, "pooler", None) or Pooler("mean")
        if normalize is not None:
            pooler = Pooler(pooler.mode, normalize)
        self.pooler = pooler
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size

    def batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices of texts grouped by similar length under the token budget."""
        order = np.argsort(np.asarray(lengths), kind="stable")[::-1]
        batch: list[int] = []
        for index in order:
            longest = lengths[batch[0]] if batch else lengths[index]
            if batch and (
                (len(batch) + 1) * longest > self.batch_tokens or len(batch) >= self.max_batch_size
            ):
                yield batch
                batch = []
            batch.append(int(index))
        if batch:
            yield batch

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array (n_texts, width).

        A text the tokenizer makes no tokens of (an empty text, without special tokens)
        gets a vector of zeros; a lone surrogate is read as U+FFFD (see the tokenizer).
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.tokenizer.encode(texts)
        lengths = [len(e.ids) for e in encodings]
        device = self.model.device
        out = np.zeros((len(texts), self.model.width), dtype=np.float32)
        bar = _progress(len(texts), progress)
        for batch in self.batches(lengths):
            if lengths[batch[0]] == 0:  # the longest of its batch: nothing to encode
                if bar is not None:
                    bar.update(len(batch))
                continue
            inputs = self.tokenizer.pad([encodings[i] for i in batch]).to(device)
            hidden = self.model(**inputs.model_inputs()).last_hidden_state
            pooled = self.pooler(hidden, inputs.attention_mask)
            out[batch] = pooled.float().cpu().numpy()
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return out

    def similarity(self, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of every pair of texts."""
        vectors = self.embed(texts)
        vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return vectors @ vectors.T


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="text", desc="embedding")
