"""``doc.vector``, ``span.vector``, ``token.vector`` and ``similarity`` from the transformer.

A doc's vector is the model's sentence embedding; a span's is the mean of its pieces'
hidden states; a token's is its row of ``doc.tensor``. Similarity is their cosine. The
hooks are module-level functions bound with ``partial``, so docs that carry them pickle.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any

from spacy.tokens import Doc, Span, Token
from thinc.api import get_array_module


def install(doc: Doc, extension: str = "xf_data") -> None:
    """Give ``doc`` (and its spans and tokens) vectors and similarity from the transformer.

    The component does this for every doc it annotates. Docs that come back from worker
    processes (``nlp.pipe(n_process=2)``) travel as bytes, which cannot carry hooks: call
    this on them to restore the hooks (their outputs and ``doc.tensor`` arrive intact).
    """
    doc_hooks, span_hooks, token_hooks = _hooks(extension)
    doc.user_hooks.update(doc_hooks)
    doc.user_span_hooks.update(span_hooks)
    doc.user_token_hooks.update(token_hooks)


@functools.cache
def _hooks(extension: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return (
        {
            "vector": partial(doc_vector, extension),
            "has_vector": partial(has_vector, extension),
            "vector_norm": partial(vector_norm, doc_vector, extension),
            "similarity": partial(similarity, doc_vector, extension),
        },
        {
            "vector": partial(span_vector, extension),
            "has_vector": partial(has_vector, extension),
            "vector_norm": partial(vector_norm, span_vector, extension),
            "similarity": partial(similarity, span_vector, extension),
        },
        {
            "vector": token_vector,
            "has_vector": token_has_vector,
            "vector_norm": token_vector_norm,
            "similarity": token_similarity,
        },
    )


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
