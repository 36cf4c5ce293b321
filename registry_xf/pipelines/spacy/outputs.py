"""What the transformer component leaves on each Doc, in a shape downstream code can rely on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import srsly
from thinc.api import get_array_module
from thinc.types import Floats1d, Floats2d, Ints1d, Ragged

_MSGPACK_KEY = "__registry_xf_doc_output__"


@dataclass
class DocTransformerOutput:
    """The transformer's outputs for one Doc (stored in ``doc._.xf_data`` by default).

    ``last_hidden_state``: (n_pieces, width) hidden states of the doc's pieces (special
    tokens left out; pieces seen by several windows averaged). ``alignment``: for each
    spaCy token, the indices of its pieces (``alignment.lengths`` pieces per token, the
    indices in ``alignment.dataXd``). ``embedding``: the model's sentence embedding of the
    doc. ``piece_ids``: the pieces' vocabulary ids. ``all_hidden_states``: the embedding
    output and every layer's output, each (n_pieces, width), when the model was asked for
    all layers.
    """

    last_hidden_state: Floats2d
    alignment: Ragged
    embedding: Floats1d
    piece_ids: Ints1d
    all_hidden_states: list[Floats2d] | None = None

    @property
    def width(self) -> int:
        return int(self.last_hidden_state.shape[1])

    @property
    def tensors(self) -> list[Any]:
        """spacy-transformers' layout: ``[pieces (1, n_pieces, width), embedding (1, width)]``.

        Code written for ``doc._.trf_data.tensors`` (``tensors[0]`` for the pieces,
        ``tensors[-1][0]`` for the sentence embedding) works unchanged.
        """
        return [self.last_hidden_state[None], self.embedding[None]]

    @property
    def align(self) -> Ragged:
        """The token → piece alignment, under spacy-transformers' name."""
        return self.alignment

    def token_pieces(self, i: int) -> Floats2d:
        """The hidden states of token ``i``'s pieces."""
        lengths = self.alignment.lengths
        start = int(lengths[:i].sum())
        rows = self.alignment.dataXd[start : start + int(lengths[i])]
        return self.last_hidden_state[rows]

    def to_dict(self) -> dict[str, Any]:
        """Plain numpy arrays, for msgpack (Doc.to_bytes, DocBin, multiprocessing)."""
        return {
            "last_hidden_state": _to_numpy(self.last_hidden_state),
            "alignment_data": _to_numpy(self.alignment.dataXd),
            "alignment_lengths": _to_numpy(self.alignment.lengths),
            "embedding": _to_numpy(self.embedding),
            "piece_ids": _to_numpy(self.piece_ids),
            "all_hidden_states": (
                None
                if self.all_hidden_states is None
                else [_to_numpy(a) for a in self.all_hidden_states]
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocTransformerOutput:
        return cls(
            last_hidden_state=data["last_hidden_state"],
            alignment=Ragged(data["alignment_data"], data["alignment_lengths"]),
            embedding=data["embedding"],
            piece_ids=data["piece_ids"],
            all_hidden_states=data.get("all_hidden_states"),
        )


def _to_numpy(array: Any) -> np.ndarray:
    xp = get_array_module(array)
    return array if xp is np else xp.asnumpy(array)


def _encode(obj: Any, chain: Any = None) -> Any:
    if isinstance(obj, DocTransformerOutput):
        return {_MSGPACK_KEY: obj.to_dict()}
    return obj if chain is None else chain(obj)


def _decode(obj: Any, chain: Any = None) -> Any:
    if isinstance(obj, dict) and _MSGPACK_KEY in obj:
        return DocTransformerOutput.from_dict(obj[_MSGPACK_KEY])
    return obj if chain is None else chain(obj)


# Docs carry their outputs through Doc.to_bytes, DocBin and nlp.pipe(n_process=...).
if "registry_xf_doc_output" not in srsly.msgpack_encoders.get_all():
    srsly.msgpack_encoders.register("registry_xf_doc_output", func=_encode)
    srsly.msgpack_decoders.register("registry_xf_doc_output", func=_decode)
