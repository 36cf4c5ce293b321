"""Cross-encoder rerankers: one relevance score per (query, document) pair, read jointly."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..assemblies.with_head import EncoderWithHead
from ..config.resolve import interpolate
from ..errors import CheckpointError, InputError, RegistryXFError
from .batching import length_batches
from .task_model import model_with_head

logger = logging.getLogger(__name__)

# The activations a checkpoint may name (sentence-transformers saves the class's dotted
# path, e.g. "torch.nn.modules.activation.Sigmoid"); keyed by the class name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Sigmoid": torch.sigmoid,
    "Identity": lambda logits: logits,
    "Tanh": torch.tanh,
    "Softmax": lambda logits: torch.softmax(logits, dim=-1),
    "ReLU": torch.relu,
}


@dataclass(frozen=True)
class RankedDocument:
    """A document's place in a ranking: its index in the input, its score and its text."""

    index: int
    score: float
    document: str


class CrossEncoder:
    """Score (query, document) pairs with a sequence-classification model read as a
    cross-encoder, as sentence-transformers' ``CrossEncoder`` does.

    Scores are the logits through the checkpoint's activation: the one config.json names
    (``sentence_transformers.activation_fn``, a ``torch.`` class), else a sigmoid for a
    one-label model and the raw logits otherwise (``apply_softmax=True`` gives
    probabilities). Pairs are cut to ``max_length`` tokens (the tokenizer's limit, at most
    the model's positions), the longer text first, then sorted by length and batched under
    a token budget; scores come back in input order.
    """

    def __init__(
        self,
        model: EncoderWithHead | str | Path,
        *,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_tokens: int = 4096,
        max_batch_size: int = 256,
    ):
        loaded = model_with_head(
            model,
            ("sequence_classification",),
            "a cross-encoder needs a model with a sequence classification head (an HF "
            "*ForSequenceClassification checkpoint)",
            device=device,
            dtype=dtype,
        )
        for name, value in (("batch_tokens", batch_tokens), ("max_batch_size", max_batch_size)):
            _check_positive(name, value)
        if max_length is not None:
            _check_positive("max_length", max_length)
        self.model = loaded.eval()
        self.tokenizer = loaded.tokenizer
        positions = int(loaded.max_positions)
        self.max_length = min(max_length or self.tokenizer.max_length or positions, positions)
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.activation_name, self.activation = _activation(loaded)

    @property
    def num_labels(self) -> int:
        return len(self.model.labels or ())

    def score(self, pairs: Sequence[tuple[str, str]], *, apply_softmax: bool = False) -> np.ndarray:
        """Scores of ``pairs``: shape (n_pairs,) for a one-label model, else
        (n_pairs, n_labels); float32. ``apply_softmax`` makes multi-label scores sum to 1."""
        pairs = _check_pairs(pairs)
        n_labels = self.num_labels
        out = np.zeros((len(pairs), n_labels), dtype=np.float32)
        for batch, scores in self._run(pairs):
            if apply_softmax and n_labels > 1:
                scores = torch.softmax(scores, dim=-1)
            out[batch] = scores.numpy()
        return out[:, 0] if n_labels == 1 else out

    def rank(
        self, query: str, documents: Sequence[str], *, top_k: int | None = None
    ) -> list[RankedDocument]:
        """``documents`` by their score against ``query``, best first; the ``top_k`` best
        if given. Needs a one-label model (one relevance score per pair)."""
        if not isinstance(query, str):
            raise InputError(f"query must be a str; found {type(query).__name__}")
        if isinstance(documents, str) or not isinstance(documents, Sequence):
            raise InputError(
                f"documents must be a list of strings; found {type(documents).__name__}"
            )
        if not documents:
            raise InputError("documents is empty: there is nothing to rank")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise InputError(f"top_k must be a positive integer or None; got {top_k!r}")
        if self.num_labels != 1:
            raise RegistryXFError(
                f"rank() needs a model with one label (a relevance score); this one has "
                f"{self.num_labels} ({', '.join(self.model.labels or ())}): use score()"
            )
        for i, document in enumerate(documents):
            if not isinstance(document, str):
                raise InputError(f"documents[{i}] is a {type(document).__name__}, not a str")
        scores = self.score([(query, document) for document in documents])
        order = np.argsort(-scores, kind="stable")[: top_k or len(documents)]
        return [RankedDocument(int(i), float(scores[i]), documents[i]) for i in order]

    @torch.inference_mode()
    def _run(self, pairs: list[tuple[str, str]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        if not pairs:
            return
        encodings = self.tokenizer.encode_pairs(pairs, max_length=self.max_length)
        lengths = [len(e.ids) for e in encodings]
        device = self.model.device
        for batch in length_batches(lengths, self.batch_tokens, self.max_batch_size):
            inputs = self.tokenizer.pad([encodings[i] for i in batch]).to(device)
            logits = self.model(**inputs.model_inputs(), head_positions_only=True).logits
            yield batch, self.activation(logits.float()).cpu()


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer; got {value!r}")


def _check_pairs(pairs: Any) -> list[tuple[str, str]]:
    """``pairs`` as a list of two-string tuples; anything else is named with its index."""
    if isinstance(pairs, str) or not isinstance(pairs, Sequence | np.ndarray):
        raise InputError(
            f"pairs must be a list of (query, document) pairs; found {type(pairs).__name__}"
        )
    checked = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence | np.ndarray) or len(pair) != 2:
            what = f"a str {_short(pair)!r}" if isinstance(pair, str) else _describe(pair)
            raise InputError(f"pairs[{i}]: expected a (query, document) pair; found {what}")
        first, second = pair
        for j, text in enumerate((first, second)):
            if not isinstance(text, str):
                raise InputError(f"pairs[{i}][{j}] is a {type(text).__name__}, not a str")
        checked.append((first, second))
    return checked


def _describe(value: Any) -> str:
    if isinstance(value, Sequence | np.ndarray):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _activation(model: EncoderWithHead) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The checkpoint's activation (its name and function), as sentence-transformers picks
    it: a ``torch.`` class named in the config, else sigmoid for one label, else none."""
    config = getattr(model, "config", None)
    section = interpolate(config).get("cross_encoder") if isinstance(config, Mapping) else None
    path = section.get("activation_fn") if isinstance(section, Mapping) else None
    if isinstance(path, str):
        name = path.rsplit(".", 1)[-1]
        if not path.startswith("torch."):
            # sentence-transformers runs other code only with trust_remote_code; neither do we
            logger.warning(
                "cross_encoder.activation_fn %r is not a torch class; using the default", path
            )
        elif name in ACTIVATIONS:
            return name, ACTIVATIONS[name]
        else:
            known = ", ".join(f"torch.nn.{n}" for n in ACTIVATIONS)
            raise CheckpointError(
                f"cross_encoder.activation_fn: {path!r} is not an activation registry_xf "
                f"knows; expected one of {known}"
            )
    if len(model.labels or ()) == 1:
        return "Sigmoid", ACTIVATIONS["Sigmoid"]
    return "Identity", ACTIVATIONS["Identity"]
