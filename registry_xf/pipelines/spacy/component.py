"""The ``registry_xf_transformer`` pipeline component.

It runs a registry_xf encoder over each batch of docs and leaves on every doc: the raw
outputs (``doc._.xf_data``, a :class:`DocTransformerOutput`), one vector per token in
``doc.tensor``, and user hooks that make ``doc.vector``, ``span.vector`` and
``similarity`` come from the model. Downstream components read its token vectors through
``registry_xf.TransformerListener.v1``.
"""

import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import srsly
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc
from spacy.training import Example, validate_examples
from spacy.util import SimpleFrozenList
from spacy.vocab import Vocab
from thinc.api import Model, Optimizer, get_torch_default_device, set_dropout_rate
from thinc.types import Floats2d, Ragged

from ...errors import CheckpointError
from ...loading.load import load
from ...loading.paths import safe_join
from ...loading.save import save
from ...loading.sources import DEFAULT_MODEL
from . import hooks
from .listener import TransformerListener, pool_tokens
from .model import encoder_of, in_worker_process, is_loaded, set_encoder
from .outputs import DocTransformerOutput

FACTORY = "registry_xf_transformer"
MODEL_FOLDER = "model"

DEFAULT_CONFIG = {
    "model": {"@architectures": "registry_xf.TransformerModel.v1", "source": DEFAULT_MODEL},
    "pooling": {"@layers": "reduce_mean.v1"},
    "extension": "xf_data",
    "vector_hooks": True,
}


@Language.factory(
    FACTORY,
    assigns=["doc.tensor", "doc._.xf_data"],
    default_config=DEFAULT_CONFIG,
)
def make_transformer(
    nlp: Language,
    name: str,
    model: Model,
    pooling: Model,
    extension: str,
    vector_hooks: bool,
) -> "Transformer":
    """A registry_xf transformer component (see the class for the settings)."""
    return Transformer(
        nlp.vocab,
        model,
        name,
        pooling=pooling,
        extension=extension,
        vector_hooks=vector_hooks,
    )


class Transformer(TrainablePipe):
    """Runs a registry_xf encoder over docs; feeds its outputs to listeners.

    ``model``: a ``registry_xf.TransformerModel.v1``. ``pooling``: a thinc layer from
    pieces to token vectors for ``doc.tensor`` (``reduce_mean.v1``, ``reduce_first.v1``,
    ...). ``extension``: the Doc attribute that holds the raw outputs (``xf_data``; name
    it ``trf_data`` for code written against spacy-transformers). ``vector_hooks``: make
    ``doc.vector``, ``span.vector`` and ``similarity`` come from the model.
    """

    def __init__(
        self,
        vocab: Vocab,
        model: Model,
        name: str = FACTORY,
        *,
        pooling: Model[Ragged, Floats2d],
        extension: str = "xf_data",
        vector_hooks: bool = True,
    ) -> None:
        self.vocab = vocab
        self.model = model
        self.name = name
        self.pooling = pooling
        self.extension = extension
        self.vector_hooks = vector_hooks
        self.cfg: dict[str, Any] = {}
        self.listener_map: dict[str, list[TransformerListener]] = {}
        if not Doc.has_extension(extension):
            Doc.set_extension(extension, default=None)
        self._from_bytes_dir: tempfile.TemporaryDirectory | None = None

    # --- listeners ---------------------------------------------------------------

    @property
    def listeners(self) -> list[TransformerListener]:
        return [m for c in self.listening_components for m in self.listener_map[c]]

    @property
    def listening_components(self) -> list[str]:
        return list(self.listener_map)

    def add_listener(self, listener: TransformerListener, component_name: str) -> None:
        listener.extension = self.extension
        listener.upstream = self
        found = self.listener_map.setdefault(component_name, [])
        if listener not in found:
            found.append(listener)

    def remove_listener(self, listener: TransformerListener, component_name: str) -> bool:
        found = self.listener_map.get(component_name, [])
        if listener not in found:
            return False
        found.remove(listener)
        if not found:
            del self.listener_map[component_name]
        return True

    def find_listeners(self, component: Any) -> None:
        """Connect the listeners in ``component``'s model that name us (or ``*``)."""
        model = getattr(component, "model", None)
        if isinstance(model, Model):
            for node in model.walk():
                if isinstance(node, TransformerListener) and node.upstream_name in (
                    "*",
                    self.name,
                ):
                    self.add_listener(node, component.name)

    # --- prediction --------------------------------------------------------------

    def predict(self, docs: Iterable[Doc]) -> list[DocTransformerOutput]:
        return self.model.predict(list(docs))

    def set_annotations(self, docs: Sequence[Doc], outputs: list[DocTransformerOutput]) -> None:
        in_worker = in_worker_process()
        for doc, out in zip(docs, outputs, strict=True):
            doc._.set(self.extension, out)
            doc.tensor = pool_tokens(self.pooling, out)
            # Worker processes send docs back as bytes, which drop hooks (spaCy warns):
            # the receiving process restores them with hooks.install.
            if self.vector_hooks and not in_worker:
                hooks.install(doc, self.extension)

    # --- training ----------------------------------------------------------------

    def update(
        self,
        examples: Iterable[Example],
        *,
        drop: float = 0.0,
        sgd: Optimizer | None = None,
        losses: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Run the batch and hand the outputs to the listeners.

        The last listener's backprop updates the transformer when the model is trainable
        (``trainable = true``); a frozen transformer only feeds its listeners.
        """
        if losses is None:
            losses = {}
        examples = list(examples)
        validate_examples(examples, "Transformer.update")
        losses.setdefault(self.name, 0.0)
        docs = [eg.predicted for eg in examples]
        set_dropout_rate(self.model, drop)
        outputs, backprop_outputs = self.model.begin_update(docs)
        d_states = [None] * len(outputs)

        def accumulate(one: list[Floats2d]) -> list:
            for i, grad in enumerate(one):
                d_states[i] = grad if d_states[i] is None else d_states[i] + grad
            return []

        def backprop(one: list[Floats2d]) -> list:
            accumulate(one)
            backprop_outputs(d_states)
            if sgd is not None and self.model.attrs["trainable"]:
                self.finish_update(sgd)
            return []

        batch_id = TransformerListener.batch_id(docs)
        for listener in self.listeners[:-1]:
            listener.receive(batch_id, outputs, accumulate)
        if self.listeners:
            self.listeners[-1].receive(batch_id, outputs, backprop)
        return losses

    def get_loss(self, examples: Iterable[Example], scores: Any) -> None:
        return None

    def initialize(
        self, get_examples: Callable[[], Iterable[Example]], *, nlp: Language | None = None
    ) -> None:
        """Load the encoder (from the configured source, unless read from disk already)."""
        encoder_of(self.model)

    def add_label(self, label: str) -> int:
        raise NotImplementedError("the transformer component has no labels")

    # --- serialization -----------------------------------------------------------

    def to_disk(self, path: str | Path, *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write the encoder (config, safetensors weights, tokenizer) into ``path``.

        The folder ``path/model`` is replaced as a whole (see ``registry_xf.save``), and
        only if it holds a saved model: a folder of other files there is an error.
        """
        save(encoder_of(self.model), Path(path) / MODEL_FOLDER, overwrite=True)

    def from_disk(
        self, path: str | Path, *, exclude: Iterable[str] = SimpleFrozenList()
    ) -> "Transformer":
        """Read the encoder written by ``to_disk``: no unpickling, weights as safetensors."""
        path = Path(path)
        spec = self.model.attrs["spec"]
        module = load(path / MODEL_FOLDER, device=_target_device(self.model), pack=spec.pack)
        set_encoder(self.model, module)
        return self

    def to_bytes(self, *, exclude: Iterable[str] = SimpleFrozenList()) -> bytes:
        """The files ``to_disk`` writes, as one msgpack map of ``/``-separated names."""
        with tempfile.TemporaryDirectory() as tmp:
            self.to_disk(tmp)
            files = {
                p.relative_to(tmp).as_posix(): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*"))
                if p.is_file()
            }
        return srsly.msgpack_dumps(files)

    def from_bytes(
        self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()
    ) -> "Transformer":
        """Read what ``to_bytes`` wrote. The names in the bytes are untrusted: each must be
        a plain relative name (see ``safe_join``), or nothing is read."""
        files = _files_from_bytes(bytes_data, self.name)
        # The tokenizer reads its files lazily: they live as long as this component.
        tmp = tempfile.TemporaryDirectory(prefix="registry_xf_spacy_")
        try:
            for name, data in files.items():
                target = safe_join(tmp.name, name, where=f"{self.name}: from_bytes")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with target.open("xb") as f:  # never through a file already there
                        f.write(data)
                except OSError as e:
                    raise CheckpointError(
                        f"{self.name}: from_bytes: file {name!r} cannot be written "
                        f"({e.strerror}); the bytes are not a registry_xf component's"
                    ) from None
            self.from_disk(tmp.name)
        except BaseException:
            tmp.cleanup()
            raise
        self._from_bytes_dir = tmp
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_from_bytes_dir": None}


def _files_from_bytes(data: bytes, name: str) -> dict[str, bytes]:
    """The ``{file name: contents}`` map of ``to_bytes``, checked for its shape."""
    try:
        files = srsly.msgpack_loads(data)
    except Exception as e:  # msgpack raises many kinds for bytes that are not its own
        raise CheckpointError(
            f"{name}: from_bytes: not msgpack data ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()
    ):
        raise CheckpointError(
            f"{name}: from_bytes: expected a map of file names to bytes, as to_bytes writes"
        )
    if not files:
        raise CheckpointError(f"{name}: from_bytes: the bytes hold no files")
    return files


def _target_device(model: Model) -> Any:
    if is_loaded(model):
        return next(encoder_of(model).parameters()).device
    return get_torch_default_device()
