"""The listener: how a tagger, parser or textcat uses the transformer's token vectors.

A downstream component's model starts with ``registry_xf.TransformerListener.v1``. In
training, the transformer component hands each listener the outputs of the batch it just
ran (and a callback that passes gradients back, when the transformer is trainable); in
prediction the listener reads the outputs the component left on the docs. The piece states
are then pooled into one vector per token with a registered thinc pooling layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from spacy.tokens import Doc
from thinc.api import Model
from thinc.types import Floats2d, Ragged

from .outputs import DocTransformerOutput


class TransformerListener(Model):
    """Stands in for the upstream transformer component inside a downstream model."""

    name = "registry_xf_transformer_listener"

    def __init__(self, upstream_name: str = "*") -> None:
        Model.__init__(self, name=self.name, forward=_listen)
        self.upstream_name = upstream_name
        self.extension = "xf_data"  # set by the upstream component when it connects
        self.upstream: Any = None  # the upstream component, for docs it has not seen
        self._batch_id: int | None = None
        self._outputs: list[DocTransformerOutput] | None = None
        self._backprop: Callable[[Any], Any] | None = None

    @staticmethod
    def batch_id(docs: Iterable[Doc]) -> int:
        """A content hash that tells whether a batch is the one the outputs belong to."""
        return sum(sum(token.orth for token in doc) for doc in docs)

    def receive(self, batch_id: int, outputs: list[DocTransformerOutput], backprop: Any) -> None:
        """Called by the upstream component in ``update``."""
        self._batch_id = batch_id
        self._outputs = outputs
        self._backprop = backprop

    def __getstate__(self) -> dict[str, Any]:
        # received batches are transient, and the upstream component is found again
        return {**self.__dict__, "_outputs": None, "_backprop": None, "upstream": None}


def _listen(
    model: TransformerListener, docs: list[Doc], is_train: bool
) -> tuple[list[DocTransformerOutput], Callable[[Any], Any]]:
    if is_train and model._batch_id is not None:
        if model.batch_id(docs) != model._batch_id:
            raise ValueError(
                "the transformer listener got a batch its upstream component did not run; "
                "put the transformer component before the components that listen to it"
            )
        assert model._outputs is not None and model._backprop is not None
        return model._outputs, model._backprop
    outputs = [
        doc._.get(model.extension) if doc.has_extension(model.extension) else None for doc in docs
    ]
    missing = [doc for doc, out in zip(docs, outputs, strict=True) if out is None]
    if missing:
        if model.upstream is None:
            raise ValueError(
                "these docs have no transformer outputs and the listener is not connected to "
                "a registry_xf_transformer component: add one before this component"
            )
        computed = iter(model.upstream.predict(missing))
        outputs = [out if out is not None else next(computed) for out in outputs]
    return outputs, _no_gradient


def _no_gradient(d_outputs: Any) -> list:
    return []


def pieces_to_tokens(
    pooling: Model[Ragged, Floats2d], grad_factor: float = 1.0
) -> Model[list[DocTransformerOutput], list[Floats2d]]:
    """One vector per token: ``pooling`` over the hidden states of the token's pieces."""
    return Model(
        "registry_xf_pieces_to_tokens",
        _pool_tokens,
        layers=[pooling],
        attrs={"grad_factor": grad_factor},
        init=_init_pooling,
    )


def _init_pooling(model: Model, X: Any = None, Y: Any = None) -> None:
    model.layers[0].initialize()


def _pool_tokens(
    model: Model, outputs: list[DocTransformerOutput], is_train: bool
) -> tuple[list[Floats2d], Callable[[list[Floats2d]], list[Floats2d]]]:
    pooling = model.layers[0]
    vectors = []
    backprops = []
    for out in outputs:
        rows = out.alignment.dataXd
        if not len(rows):  # no pieces at all (an empty or all-whitespace doc)
            vectors.append(model.ops.alloc2f(len(out.alignment.lengths), out.width))
            backprops.append((None, rows, out.last_hidden_state.shape))
            continue
        pieces = Ragged(out.last_hidden_state[rows], out.alignment.lengths)
        tokens, backprop = pooling(pieces, is_train)
        vectors.append(tokens)
        backprops.append((backprop, rows, out.last_hidden_state.shape))

    def backprop(d_vectors: list[Floats2d]) -> list[Floats2d]:
        d_states = []
        for d_tokens, (bp, rows, shape) in zip(d_vectors, backprops, strict=True):
            d_state = model.ops.alloc2f(*shape)
            if bp is not None:
                model.ops.scatter_add(d_state, rows, bp(d_tokens).dataXd)
            d_states.append(d_state * model.attrs["grad_factor"])
        return d_states

    return vectors, backprop


def pool_tokens(pooling: Model[Ragged, Floats2d], out: DocTransformerOutput) -> Floats2d:
    """Token vectors of one doc's outputs (prediction only)."""
    rows = out.alignment.dataXd
    if not len(rows):
        return pooling.ops.alloc2f(len(out.alignment.lengths), out.width)
    return pooling.predict(Ragged(out.last_hidden_state[rows], out.alignment.lengths))
