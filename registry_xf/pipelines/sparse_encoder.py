"""Sparse (SPLADE) embeddings: one weight per vocabulary entry, most of them zero."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..assemblies.with_head import EncoderWithHead
from ..errors import InputError
from .batching import length_batches
from .prompts import (
    DOCUMENT_PROMPT_NAMES,
    QUERY_PROMPT_NAMES,
    Prompting,
    check_texts,
    embedding_settings,
)
from .splade_pooler import SpladePooler
from .task_model import model_with_head


class SparseEncoder(Prompting):
    """Sparse vectors of texts from a masked-LM model and a SPLADE pooler, as
    sentence-transformers' ``SparseEncoder`` computes them.

    The pooler is the model's (read from a sentence-transformers directory's
    ``SpladePooling`` module), else ``SpladePooler()`` (max over tokens of
    log(1 + ReLU(logits))). ``max_active_dims`` keeps each vector's largest weights only
    (per call, or for every call). Texts are sorted by length and batched under a token
    budget; vectors come back in input order.

    Prompts work as the dense ``Embedder``'s: named prompts and the default prompt from
    the model's config_sentence_transformers.json, added to and overridden by ``prompts``
    and ``default_prompt_name``; a prompt's tokens count in the vector (SPLADE pools every
    token). ``encode_query`` / ``encode_document`` pick the "query" / "document" prompt.
    """

    def __init__(
        self,
        model: EncoderWithHead | str | Path,
        *,
        pooler: SpladePooler | None = None,
        max_active_dims: int | None = None,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_tokens: int = 2048,
        max_batch_size: int = 64,
    ):
        loaded = model_with_head(
            model,
            ("masked_lm",),
            "sparse embeddings need a model with a masked-LM head (an HF *ForMaskedLM "
            "checkpoint, such as a SPLADE model)",
            device=device,
            dtype=dtype,
        )
        own = getattr(loaded, "pooler", None)
        self.model = loaded.eval()
        self.tokenizer = loaded.tokenizer
        self.pooler = pooler or (own if isinstance(own, SpladePooler) else SpladePooler())
        self.max_active_dims = _check_positive("max_active_dims", max_active_dims)
        self.batch_tokens = _check_positive("batch_tokens", batch_tokens)
        self.max_batch_size = _check_positive("max_batch_size", max_batch_size)
        positions = int(loaded.max_positions)
        self.max_length = min(self.tokenizer.max_length or positions, positions)
        self.init_prompts(embedding_settings(loaded), prompts, default_prompt_name)

    @property
    def vocab_size(self) -> int:
        """The vectors' width: one entry per vocabulary id of the head."""
        return int(self.model.head.decoder.out_features)

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        max_active_dims: int | None = None,
        **unsupported: Any,
    ) -> torch.Tensor:
        """Sparse vectors of ``texts``: a coalesced sparse COO tensor (n_texts, vocab_size),
        float32, on the CPU. ``prompt`` (a text) or ``prompt_name`` (one of ``self.prompts``)
        is prepended to every text; with neither, the default prompt, if any.
        ``max_active_dims`` keeps each vector's largest weights."""
        if unsupported:  # dense settings (truncate_dim, precision) above all: say why not
            raise InputError(
                f"{', '.join(sorted(unsupported))}: not a setting of sparse vectors (they have "
                "one entry per vocabulary id; max_active_dims prunes them); expected prompt, "
                "prompt_name or max_active_dims"
            )
        keep = _check_positive("max_active_dims", max_active_dims) or self.max_active_dims
        texts = check_texts(texts)
        prompt = self.resolve_prompt(prompt, prompt_name)
        if prompt:
            texts = [prompt + text for text in texts]
        encodings = self.tokenizer.encode(texts, max_length=self.max_length)
        lengths = [len(e.ids) for e in encodings]
        rows, columns, values = [], [], []
        device = self.model.device
        for batch in length_batches(lengths, self.batch_tokens, self.max_batch_size):
            if lengths[batch[0]] == 0:  # nothing to encode: empty vectors
                continue
            inputs = self.tokenizer.pad([encodings[i] for i in batch]).to(device)
            logits = self.model(**inputs.model_inputs()).logits
            vectors = self.pooler(logits.float(), inputs.attention_mask).cpu()
            if keep is not None and keep < vectors.shape[1]:
                top = vectors.topk(keep, dim=1)
                vectors = torch.zeros_like(vectors).scatter_(1, top.indices, top.values)
            row, column = vectors.nonzero(as_tuple=True)
            rows.append(torch.as_tensor(batch)[row])
            columns.append(column)
            values.append(vectors[row, column])
        indices = torch.stack([torch.cat(rows), torch.cat(columns)]) if rows else None
        if indices is None:
            indices = torch.zeros((2, 0), dtype=torch.long)
        data = torch.cat(values) if values else torch.zeros(0)
        shape = (len(texts), self.vocab_size)
        return torch.sparse_coo_tensor(indices, data, shape, check_invariants=False).coalesce()

    def encode_query(self, texts: Sequence[str], **settings: Any) -> torch.Tensor:
        """``encode`` with the "query" prompt unless ``prompt`` or ``prompt_name`` is given."""
        return self.encode(texts, **self.task_prompt(QUERY_PROMPT_NAMES, settings))

    def encode_document(self, texts: Sequence[str], **settings: Any) -> torch.Tensor:
        """``encode`` with the first of the "document", "passage", "corpus" prompts (the
        first always exists) unless ``prompt`` or ``prompt_name`` is given."""
        return self.encode(texts, **self.task_prompt(DOCUMENT_PROMPT_NAMES, settings))

    def encode_indices(
        self, texts: Sequence[str], **settings: Any
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's vector as (vocabulary ids, weights), heaviest first: int64 and
        float32 arrays, as search engines index sparse vectors. ``settings`` are
        ``encode``'s (``prompt``, ``prompt_name``, ``max_active_dims``)."""
        vectors = self.encode(texts, **settings)
        return [_heaviest_first(vectors[i]) for i in range(vectors.shape[0])]

    def decode(
        self, vectors: torch.Tensor, *, top_k: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """The terms of each vector (rows of ``encode``'s tensor, sparse or dense, or one
        vector) with their weights, heaviest first; the ``top_k`` heaviest if given."""
        top_k = _check_positive("top_k", top_k)
        if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2):
            found = f"{vectors.dim()}-d" if isinstance(vectors, torch.Tensor) else "not a"
            raise InputError(f"vectors must be a 1-d or 2-d torch tensor; found {found} tensor")
        if vectors.shape[-1] != self.vocab_size:
            raise InputError(
                f"vectors have {vectors.shape[-1]} entries; this model's have {self.vocab_size}"
            )
        rows = vectors.unsqueeze(0) if vectors.dim() == 1 else vectors
        tokenizer = self.tokenizer.tokenizer
        decoded = []
        for i in range(rows.shape[0]):
            ids, weights = _heaviest_first(rows[i])
            decoded.append(
                [
                    (tokenizer.id_to_token(int(j)) or f"[{int(j)}]", float(w))
                    for j, w in zip(ids[:top_k], weights[:top_k], strict=True)
                ]
            )
        return decoded


def _heaviest_first(vector: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A vector's non-zero (ids, weights), sorted by weight, heaviest first."""
    if vector.is_sparse:
        vector = vector.coalesce()
        ids, weights = vector.indices()[0], vector.values()
    else:
        ids = vector.nonzero(as_tuple=True)[0]
        weights = vector[ids]
    order = torch.argsort(weights, descending=True, stable=True)
    return ids[order].numpy().astype(np.int64), weights[order].float().numpy()


def _check_positive(name: str, value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be a positive integer or None; got {value!r}")
    return value
