"""Labels for texts from a model with a classification head: one per text, or per token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..assemblies.with_head import EncoderWithHead
from ..errors import InputError, RegistryXFError
from .batching import length_batches
from .task_model import model_with_head

CLASSIFYING_TASKS = ("sequence_classification", "token_classification")
MAX_BATCH_ROWS = 256  # rows of one batch, however short (as the Embedder's default)


@dataclass(frozen=True)
class LabelScore:
    """A label and its score (a probability, or the value of a regression head)."""

    label: str
    score: float


@dataclass(frozen=True)
class TokenLabel:
    """The label of one piece of a text; ``start``/``end`` are its character offsets."""

    piece: str
    start: int
    end: int
    label: str
    score: float


class Classifier:
    """Classify texts (a sequence head) or label their tokens (a token head).

    Scores are the head's: softmax over labels, a sigmoid per label for multi-label heads
    and single-output heads, the raw value for regression. Texts are batched by length
    under a token budget; results come back in input order.
    """

    def __init__(
        self,
        model: EncoderWithHead | str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_tokens: int = 2048,
    ):
        loaded = model_with_head(
            model,
            CLASSIFYING_TASKS,
            "classifying needs a model with a sequence or token classification head (an HF "
            "*ForSequenceClassification or *ForTokenClassification checkpoint)",
            device=device,
            dtype=dtype,
        )
        if batch_tokens < 1:
            raise InputError(f"batch_tokens must be at least 1; got {batch_tokens}")
        self.model = loaded
        self.tokenizer = loaded.tokenizer
        self.batch_tokens = batch_tokens

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.model.labels or ())

    @property
    def task(self) -> str:
        return self.model.task

    def classify(self, texts: Sequence[str], *, top_k: int = 1) -> list[list[LabelScore]]:
        """The ``top_k`` best labels of each text, best first (sequence heads)."""
        self._need("sequence_classification", "classify")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive integer; got {top_k!r}")
        k = min(top_k, len(self.labels))
        results: list[list[LabelScore]] = [[] for _ in texts]
        for batch, _, scores in self._run(texts):
            values, indices = scores.topk(k, dim=-1)
            for row, i in enumerate(batch):
                results[i] = [
                    LabelScore(self.labels[int(j)], float(v))
                    for v, j in zip(values[row], indices[row], strict=True)
                ]
        return results

    def tag(self, texts: Sequence[str]) -> list[list[TokenLabel]]:
        """Each text's pieces (special tokens left out) with their best label (token heads)."""
        self._need("token_classification", "tag")
        results: list[list[TokenLabel]] = [[] for _ in texts]
        for batch, encodings, scores in self._run(texts):
            best, indices = scores.max(dim=-1)
            for row, i in enumerate(batch):
                e = encodings[row]
                results[i] = [
                    TokenLabel(
                        e.tokens[t],
                        e.offsets[t][0],
                        e.offsets[t][1],
                        self.labels[int(indices[row, t])],
                        float(best[row, t]),
                    )
                    for t in range(len(e.ids))
                    if not e.special_tokens_mask[t]
                ]
        return results

    def _need(self, task: str, method: str) -> None:
        if self.task != task:
            other = "tag" if method == "classify" else "classify"
            raise RegistryXFError(
                f"{method}() needs a {task} head; this model has a {self.task} head: use {other}()"
            )

    @torch.inference_mode()
    def _run(self, texts: Sequence[str]) -> Iterator[tuple[list[int], list, torch.Tensor]]:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be strings")
        encodings = self.tokenizer.encode(list(texts))
        device = self.model.device
        lengths = [len(e.ids) for e in encodings]
        for batch in length_batches(lengths, self.batch_tokens, MAX_BATCH_ROWS):
            chosen = [encodings[i] for i in batch]
            inputs = self.tokenizer.pad(chosen).to(device)
            logits = self.model(**inputs.model_inputs(), head_positions_only=True).logits
            yield batch, chosen, self.model.head.scores(logits.float()).cpu()
