"""``doc.vector``, ``span.vector``, ``token.vector`` and ``similarity`` from the transformer.

A doc's vector is the model's sentence embedding; a span's is the mean of its pieces'
hidden states; a token's is its row of ``doc.tensor``. Similarity is their cosine. The
hooks are module-level functions bound with ``partial``, so docs that carry them pickle.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from spacy.tokens import Doc, Span, Token
from thinc.api import get_array_module


def install(doc: Doc, extension: str) -> None:
    doc.user_hooks["vector"] = partial(doc_vector, extension)
    doc.user_hooks["has_vector"] = partial(has_vector, extension)
    doc.user_hooks["vector_norm"] = partial(vector_norm, doc_vector, extension)
    doc.user_hooks["similarity"] = partial(similarity, doc_vector, extension)
    doc.user_span_hooks["vector"] = partial(span_vector, extension)
    doc.user_span_hooks["has_vector"] = partial(has_vector, extension)
    doc.user_span_hooks["vector_norm"] = partial(vector_norm, span_vector, extension)
    doc.user_span_hooks["similarity"] = partial(similarity, span_vector, extension)
    doc.user_token_hooks["vector"] = token_vector
    doc.user_token_hooks["has_vector"] = token_has_vector
    doc.user_token_hooks["vector_norm"] = token_vector_norm
    doc.user_token_hooks["similarity"] = token_similarity


def doc_vector(extension: str, doc: Doc) -> Any:
    return doc._.get(extension).embedding


def span_vector(extension: str, span: Span) -> Any:
    out = span.doc._.get(extension)
    xp = get_array_module(out.last_hidden_state)
    ends = xp.cumsum(out.alignment.lengths)
    start = int(ends[span.start - 1]) if span.start else 0
    rows = out.alignment.dataXd[start : int(ends[span.end - 1])] if len(span) else []
    if not len(rows):
        return xp.zeros((out.width,), dtype="float32")
    return out.last_hidden_state[xp.unique(rows)].mean(axis=0)


def has_vector(extension: str, obj: Doc | Span) -> bool:
    doc = obj if isinstance(obj, Doc) else obj.doc
    return doc.has_extension(extension) and doc._.get(extension) is not None


def vector_norm(vector: Any, extension: str, obj: Doc | Span) -> float:
    v = vector(extension, obj)
    return float(get_array_module(v).linalg.norm(v))


def _cosine(a: Any, b: Any) -> float:
    xp = get_array_module(a)
    norms = float(xp.linalg.norm(a)) * float(xp.linalg.norm(b))
    return float(xp.dot(a, b)) / norms if norms else 0.0


def similarity(vector: Any, extension: str, obj: Doc | Span, other: Any) -> float:
    return _cosine(vector(extension, obj), other.vector)


def token_vector(token: Token) -> Any:
    return token.doc.tensor[token.i]


def token_has_vector(token: Token) -> bool:
    return token.doc.tensor.size > 0


def token_vector_norm(token: Token) -> float:
    v = token_vector(token)
    return float(get_array_module(v).linalg.norm(v))


def token_similarity(token: Token, other: Any) -> float:
    return _cosine(token_vector(token), other.vector)
