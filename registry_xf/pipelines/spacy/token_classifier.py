"""The ``registry_xf_token_classifier`` component: a token classifier's labels on spaCy docs.

Each spaCy token gets the label (and score) of the first model piece that starts inside
it, HF's "first" aggregation, as ``token._.xf_label`` / ``token._.xf_label_score``. When
the labels are BIO/IOB2 tags (``O``, ``B-X``, ``I-X``), the tagged runs also become
``doc.ents``; an ``I-X`` after anything but ``B-X``/``I-X`` starts an entity, as HF's
"simple" grouping does. Docs are read up to the model's length limit (longer text keeps
no labels past it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.tokens import Doc, Span, Token
from spacy.util import SimpleFrozenList, minibatch
from spacy.vocab import Vocab

from ...errors import ConfigError, ConfigProblem
from ...loading.load import load
from ...loading.save import save
from ..classifier import Classifier, TokenLabel
from .component import Transformer

logger = logging.getLogger(__name__)

TOKEN_CLASSIFIER_FACTORY = "registry_xf_token_classifier"
MODEL_FOLDER = "model"


@Language.factory(
    TOKEN_CLASSIFIER_FACTORY,
    assigns=["doc.ents", "token._.xf_label", "token._.xf_label_score"],
    default_config={"source": None, "set_ents": True, "extension": "xf_label"},
)
def make_token_classifier(
    nlp: Language, name: str, source: str | None, set_ents: bool, extension: str
) -> TokenClassifier:
    """A token classifier's labels on docs (see the class for the settings)."""
    return TokenClassifier(nlp.vocab, name, source, set_ents=set_ents, extension=extension)


class TokenClassifier(Pipe):
    """Labels spaCy tokens with a registry_xf token classification model.

    ``source``: a model with a token classification head (an HF
    ``*ForTokenClassification`` directory or Hub id, or a saved model); it is loaded on
    first use. ``set_ents``: make ``doc.ents`` from BIO labels (ignored for other label
    sets). ``extension``: the Token attribute for the label (its score goes in
    ``<extension>_score``).
    """

    def __init__(
        self,
        vocab: Vocab,
        name: str = TOKEN_CLASSIFIER_FACTORY,
        source: str | None = None,
        *,
        set_ents: bool = True,
        extension: str = "xf_label",
    ):
        if not source:
            raise ConfigError(
                [
                    ConfigProblem(
                        f"components.{name}.source",
                        "give the token classifier's source (an HF *ForTokenClassification "
                        "directory or Hub id, or a saved model)",
                    )
                ]
            )
        self.vocab = vocab
        self.name = name
        self.source = str(source)
        self.set_ents = set_ents
        self.extension = extension
        self._classifier: Classifier | None = None
        self._from_bytes_dir: Any = None
        for attr in (extension, f"{extension}_score"):
            if not Token.has_extension(attr):
                Token.set_extension(attr, default=None)

    @property
    def classifier(self) -> Classifier:
        if self._classifier is None:
            self._set(Classifier(load(self.source)))
        assert self._classifier is not None
        return self._classifier

    def _set(self, classifier: Classifier) -> None:
        if classifier.task != "token_classification":
            raise ConfigError(
                [
                    ConfigProblem(
                        f"components.{self.name}.source",
                        f"needs a token classification head; {self.source} has a "
                        f"{classifier.task} head",
                    )
                ]
            )
        self._classifier = classifier

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's labels; empty until it is loaded (spaCy reads this for its meta
        before ``from_disk``, which must not load the configured source)."""
        return self._classifier.labels if self._classifier is not None else ()

    @property
    def bio(self) -> bool:
        """Whether the labels are BIO/IOB2 tags."""
        labels = self.classifier.labels
        return all(label == "O" or label[:2] in ("B-", "I-") for label in labels)

    def __call__(self, doc: Doc) -> Doc:
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 32) -> Iterator[Doc]:
        for docs in minibatch(stream, size=batch_size):
            tagged = self.classifier.tag([doc.text for doc in docs])
            for doc, pieces in zip(docs, tagged, strict=True):
                self._annotate(doc, pieces)
                yield doc

    def _annotate(self, doc: Doc, pieces: list[TokenLabel]) -> None:
        token_at = [-1] * (len(doc.text) + 1)
        for token in doc:
            token_at[token.idx : token.idx + len(token.text)] = [token.i] * len(token.text)
        labels: list[str | None] = [None] * len(doc)
        for piece in pieces:
            i = token_at[piece.start] if piece.start < len(token_at) else -1
            if i >= 0 and labels[i] is None:  # the first piece of a token labels it
                labels[i] = piece.label
                doc[i]._.set(self.extension, piece.label)
                doc[i]._.set(f"{self.extension}_score", piece.score)
        if self.set_ents and self.bio:
            doc.ents = list(_bio_spans(doc, labels))

    # --- serialization -----------------------------------------------------------

    def to_disk(self, path: str | Path, *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write the model (config, safetensors weights, tokenizer) into ``path/model``
        (replaced as a whole, as ``registry_xf.save`` does)."""
        save(self.classifier.model, Path(path) / MODEL_FOLDER, overwrite=True)

    def from_disk(
        self, path: str | Path, *, exclude: Iterable[str] = SimpleFrozenList()
    ) -> TokenClassifier:
        """Read the model written by ``to_disk`` (not the configured source)."""
        self._set(Classifier(load(Path(path) / MODEL_FOLDER)))
        return self

    # The same bytes as the transformer component's, read with the same checks of the
    # untrusted names in them: its methods need only ``name``, ``to_disk``/``from_disk``.
    def to_bytes(self, *, exclude: Iterable[str] = SimpleFrozenList()) -> bytes:
        """The files ``to_disk`` writes, as one msgpack map of ``/``-separated names."""
        return Transformer.to_bytes(self, exclude=exclude)  # type: ignore[arg-type]

    def from_bytes(
        self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()
    ) -> TokenClassifier:
        """Read what ``to_bytes`` wrote; a name that leaves the folder is refused."""
        Transformer.from_bytes(self, bytes_data, exclude=exclude)  # type: ignore[arg-type]
        return self


def _bio_spans(doc: Doc, labels: list[str | None]) -> Iterator[Span]:
    """Entity spans from per-token BIO tags (None and ``O`` are outside)."""
    start, kind = None, None
    for i, label in enumerate([*labels, None]):
        tag, _, name = (label or "O").partition("-")
        continues = tag == "I" and name == kind
        if start is not None and not continues:
            yield Span(doc, start, i, label=kind)
            start, kind = None, None
        if tag in ("B", "I") and not continues:
            start, kind = i, name
