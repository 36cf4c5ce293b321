"""Sentence embeddings with length-sorted, token-budget batching."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..assemblies.encoder import Encoder
from ..errors import InputError, RegistryXFError
from ..layers import cpu_attention
from ..layers.attention import SelfAttention
from ..loading.load import load
from ..loading.sources import DEFAULT_MODEL
from .batching import length_batches
from .compiled_forward import CompiledForward, autocast, check_compile, check_matmul_dtype
from .poolers import Pooler
from .prompts import (
    DOCUMENT_PROMPT_NAMES,
    QUERY_PROMPT_NAMES,
    Prompting,
    check_texts,
    embedding_settings,
)
from .quantization import check_precision, quantize_embeddings
from .splade_pooler import SpladePooler
from .streams import check_streams, run_in_streams

logger = logging.getLogger(__name__)


class Embedder(Prompting):
    """One vector per text from an encoder, its tokenizer and a pooler.

    Texts are sorted by length and grouped into batches of about ``batch_tokens`` tokens
    (padded), so short texts share large batches and long ones get small batches: little
    padding, and the CPU stays busy. Results come back in the input order. The default
    budget (2,048 tokens) keeps a batch's activations in cache on CPUs; on a GPU a larger
    one is faster.

    Prompts: ``prompts`` (name -> text prepended to every text) and ``default_prompt_name``
    add to and override those of the model's ``[embedding]`` section (read from
    sentence-transformers' config_sentence_transformers.json). ``truncate_dim`` keeps the
    first dimensions of every embedding (Matryoshka models), renormalised where the model
    normalises; it overrides the model's own setting. ``quantize="int8"`` makes every
    linear layer multiply in int8 on the CPU (``registry_xf.layers.int8_linear``; changes
    the model in place).

    ``compile=True`` runs the encoder, pooling and normalisation through
    ``torch.compile`` (one graph, dynamic shapes; the first batch compiles, tens of
    seconds on a CPU, and a batch of one text once more), which cuts the per-layer Python
    overhead that dominates short inputs. ``matmul_dtype="bfloat16"`` multiplies in
    bfloat16 (CPU autocast; fast on CPUs with AVX512-BF16 or AMX) while layer norms,
    softmax, the residual stream and pooling stay in float32: closer to float32 than a
    bfloat16 model (``dtype="bfloat16"``). The bfloat16 weights are made and packed once:
    with ``compile=True``, at compile time (frozen into the graph); eagerly, on each
    packed layer's first call, and kept beside the float32 weights (half their size
    again). Where compiling is unavailable or fails, the reason is logged and the pass
    runs eagerly.

    ``streams=N`` (CPU) embeds N batches at once on N threads, each with 1/N of torch's
    threads (``registry_xf.pipelines.streams``): no pass waits for another's threads, so
    a corpus goes faster on a CPU, with the same embeddings (to float rounding). While
    ``embed`` runs, torch's process-wide thread count is divided among the streams; it is
    restored after.
    """

    def __init__(
        self,
        model: nn.Module | str | Path = DEFAULT_MODEL,
        *,
        pooler: Pooler | None = None,
        normalize: bool | None = None,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
        truncate_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_tokens: int = 2048,
        max_batch_size: int = 256,
        quantize: str | None = None,
        compile: bool = False,
        matmul_dtype: str | torch.dtype | None = None,
        streams: int = 1,
    ):
        if quantize not in (None, "int8"):
            raise InputError(f"quantize={quantize!r}: expected None or 'int8'")
        compile = check_compile(compile)
        self.matmul_dtype = check_matmul_dtype(matmul_dtype)
        self.streams = check_streams(streams)
        self.model = (
            model
            if isinstance(model, nn.Module)
            else load(model, device=device, dtype=dtype, head=False)  # a task head is unused
        )
        if quantize == "int8":
            from ..layers.int8_linear import quantize_int8

            quantize_int8(self.model)
        self.tokenizer = getattr(self.model, "tokenizer", None)
        if self.tokenizer is None:
            raise RegistryXFError("this model has no tokenizer: its source needs a tokenizer.json")
        pooler = pooler or getattr(self.model, "pooler", None) or Pooler("mean")
        if isinstance(pooler, SpladePooler):  # it reads masked-LM logits, not hidden states
            raise RegistryXFError(
                "this model pools with SpladePooler: it makes sparse vectors; "
                "use registry_xf.SparseEncoder"
            )
        if normalize is not None:
            pooler = Pooler(pooler.mode, normalize, pooler.include_prompt)
        self.pooler = pooler
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        settings = embedding_settings(self.model)
        self.init_prompts(settings, prompts, default_prompt_name)
        if truncate_dim is None:
            truncate_dim = settings.get("truncate_dim")
        self.truncate_dim = self._check_truncate_dim(truncate_dim)
        self._prompt_lengths: dict[str, int] = {}
        if self.matmul_dtype is not None and self.model.device.type != "cpu":
            raise InputError(
                f"matmul_dtype={matmul_dtype!r} is for models on the CPU; this one is on "
                f"{self.model.device} (load it with dtype= instead)"
            )
        if self.streams > 1 and self.model.device.type != "cpu":
            raise InputError(
                f"streams={streams} is for models on the CPU; this one is on {self.model.device}"
            )
        self.compiled = compile
        self._forward: Any = (
            CompiledForward(self._pooled, frozen=self.matmul_dtype is not None)
            if compile
            else self._pooled
        )

    def _pooled(
        self,
        inputs: dict[str, torch.Tensor | None],
        attention_mask: torch.Tensor,
        only: dict[str, Any],
        prompt_length: int,
        width: int,
    ) -> torch.Tensor:
        """One batch's pooled (and normalised) float32 embeddings: the part that compiles."""
        with autocast(self.matmul_dtype):
            hidden = self.model(**inputs, **only).last_hidden_state
        pooled = self.pooler.pool(hidden.float(), attention_mask, prompt_length)[:, :width]
        if self.pooler.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def _packs_attention(self) -> bool:
        """Whether attention runs on packed (unpadded) tokens as they are here (the CPU
        kernel's packed entry), so that unpadding the layers costs no copies."""
        dtype = self.matmul_dtype or self.model.dtype
        if self.compiled or not cpu_attention.packed_ready(self.model.device, dtype):
            return False
        return all(m.cpu_kernel for m in self.model.modules() if isinstance(m, SelfAttention))

    def batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices of texts grouped by similar length under the token budget."""
        return length_batches(lengths, self.batch_tokens, self.max_batch_size)

    @torch.inference_mode()
    def embed(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        precision: str = "float32",
        ranges: np.ndarray | None = None,
        calibration_embeddings: np.ndarray | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Embeddings of ``texts``: an array (n_texts, width), float32 unless ``precision``.

        ``prompt`` (a text) or ``prompt_name`` (one of ``self.prompts``) is prepended to every
        text; with neither, the default prompt, if any. ``truncate_dim`` keeps the first
        dimensions (default: the embedder's). ``precision`` "int8"/"uint8" quantise each
        dimension over ``ranges``, else the range of ``calibration_embeddings``, else of these
        embeddings; "binary"/"ubinary" pack sign bits 8 to a byte (int8 / uint8).
        A text the tokenizer makes no tokens of (an empty text, without special tokens)
        gets a vector of zeros; a lone surrogate is read as U+FFFD (see the tokenizer).
        """
        check_precision(precision)
        prompt = self.resolve_prompt(prompt, prompt_name)
        width = self._check_truncate_dim(truncate_dim) or self.truncate_dim or self.model.width
        texts = check_texts(texts)
        prompt_length = self.prompt_length(prompt) if prompt else 0
        if prompt:
            texts = [prompt + text for text in texts]
        encodings = self.tokenizer.encode(texts)
        lengths = [len(e.ids) for e in encodings]
        device = self.model.device
        # [CLS] pooling reads one position: the encoder's last layer need compute no other
        first_only = self.pooler.mode == "cls" and (not prompt_length or self.pooler.include_prompt)
        only = {"output_positions": (0,)} if first_only and isinstance(self.model, Encoder) else {}
        if not only and isinstance(self.model, Encoder) and self._packs_attention():
            only = {"unpad": True}  # no arithmetic on padding, and no copies for attention
        out = np.zeros((len(texts), width), dtype=np.float32)
        bar = _progress(len(texts), progress)

        def embed_batch(batch: list[int]) -> None:
            if lengths[batch[0]]:  # the longest of its batch: else nothing to encode
                inputs = self.tokenizer.pad([encodings[i] for i in batch]).to(device)
                pooled = self._forward(
                    inputs.model_inputs(), inputs.attention_mask, only, prompt_length, width
                )
                out[batch] = pooled.cpu().numpy()
            if bar is not None:
                bar.update(len(batch))

        batches = list(self.batches(lengths))
        if self.streams > 1 and len(batches) > 1:
            run_in_streams(embed_batch, batches, self.streams)
        else:  # one batch (a single text's latency) keeps all of torch's threads
            for batch in batches:
                embed_batch(batch)
        if bar is not None:
            bar.close()
        if precision == "float32" or not len(out):
            return out
        return quantize_embeddings(
            out, precision, ranges=ranges, calibration_embeddings=calibration_embeddings
        )

    def embed_query(self, texts: Sequence[str], **settings: Any) -> np.ndarray:
        """``embed`` with the "query" prompt unless ``prompt`` or ``prompt_name`` is given."""
        return self.embed(texts, **self.task_prompt(QUERY_PROMPT_NAMES, settings))

    def embed_document(self, texts: Sequence[str], **settings: Any) -> np.ndarray:
        """``embed`` with the first of the "document", "passage", "corpus" prompts (the
        first always exists) unless ``prompt`` or ``prompt_name`` is given."""
        return self.embed(texts, **self.task_prompt(DOCUMENT_PROMPT_NAMES, settings))

    def prompt_length(self, prompt: str) -> int:
        """Tokens of ``prompt`` at the start of a prompted text: the prompt encoded alone,
        without a trailing special token (as sentence-transformers counts them)."""
        if prompt not in self._prompt_lengths:
            encoding = self.tokenizer.encode([prompt])[0]
            length = len(encoding.ids)
            if length and encoding.special_tokens_mask[-1]:
                length -= 1
            self._prompt_lengths[prompt] = length
        return self._prompt_lengths[prompt]

    def _check_truncate_dim(self, truncate_dim: Any) -> int | None:
        if truncate_dim is None:
            return None
        width = self.model.width
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
            raise InputError(f"truncate_dim={truncate_dim!r}: expected an integer 1 to {width}")
        if not 1 <= truncate_dim <= width:
            raise InputError(
                f"truncate_dim={truncate_dim}: expected 1 to {width} (the model's width)"
            )
        return int(truncate_dim)

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
