"""The spaCy-side registered functions: the transformer model and the listener.

Registered in spaCy's ``architectures`` registry (and declared as ``spacy_architectures``
entry points, so spaCy finds them without registry_xf being imported by hand).
"""

from typing import Any

from spacy.util import registry as spacy_registry
from thinc.api import Model, chain
from thinc.types import Floats2d, Ragged

from ...errors import ConfigError, ConfigProblem, InputError
from ...types import to_dtype
from .bridge import share_registries
from .listener import TransformerListener, pieces_to_tokens
from .model import EncoderSpec, RunSettings, transformer_model

share_registries()


@spacy_registry.architectures("registry_xf.TransformerModel.v1")
def transformer_model_v1(
    source: str | None = None,
    overrides: dict[str, Any] = {},  # noqa: B006 - spaCy fills defaults from the signature
    encoder: Any = None,
    weights: Any = None,
    tokenizer: Any = None,
    pooling: Any = None,
    hyper: dict[str, Any] = {},  # noqa: B006
    dtype: str = "float32",
    window: int | None = None,
    stride: int | None = None,
    all_layers: bool = False,
    trainable: bool = False,
    batch_tokens: int = 2048,
    pack: bool | None = None,
    prompt_name: str | None = None,
    truncate_dim: int | None = None,
) -> Model:
    """A registry_xf encoder for spaCy.

    Name a ``source`` (Hub id, HF directory, directory written by registry_xf's ``save``,
    installed model package, or ``.cfg``) with dotted ``overrides``; or give ``encoder``,
    ``weights`` and ``tokenizer`` sections built from registry_xf's own registered
    functions (and optionally a ``pooling`` for the sentence embedding, and the ``hyper``
    values that the weights' converter reads); an ``encoder`` replaces ``source``.
    ``window``/``stride``: pieces per window and between window starts for long docs
    (default: the model's limit, and 3/4 of the window). ``all_layers`` keeps every
    layer's states. ``trainable`` fine-tunes the encoder with the pipeline (frozen
    otherwise). ``batch_tokens``: padded tokens per forward pass. ``pack``: prepacked CPU
    weights (None: automatic; never when trainable). ``prompt_name``: one of the model's
    prompts, put before every window's pieces (None: the model's default prompt, if any);
    ``truncate_dim``: the sentence embedding (``doc.vector``) keeps its first dimensions,
    renormalised where the model normalises; token vectors keep the full width.
    """
    if source is None and encoder is None:
        raise ConfigError(
            [
                ConfigProblem(
                    "model.source",
                    "give a source (Hub id, HF directory, saved directory, package or .cfg) or an "
                    "encoder section built from registry_xf's architectures",
                )
            ]
        )
    if encoder is not None and (weights is None or tokenizer is None):
        raise ConfigError(
            [ConfigProblem("model.weights", "an encoder section needs weights and tokenizer")]
        )
    sizes = (("window", window), ("stride", stride), ("batch_tokens", batch_tokens))
    for name, value in (*sizes, ("truncate_dim", truncate_dim)):
        if value is not None and value < 1:
            raise ConfigError(
                [ConfigProblem(f"model.{name}", f"must be at least 1; found {value}")]
            )
    if dtype != "auto":
        try:
            to_dtype(dtype)
        except InputError as e:
            raise ConfigError([ConfigProblem("model.dtype", str(e))]) from None
    spec = EncoderSpec(
        source=None if encoder is not None else source,  # an encoder section wins
        overrides=dict(overrides),
        encoder=encoder,
        weights=weights,
        tokenizer=tokenizer,
        pooling=pooling,
        hyper=dict(hyper),
        dtype=dtype,
        pack=False if trainable else pack,
    )
    return transformer_model(
        spec,
        RunSettings(window, stride, all_layers, trainable, batch_tokens, prompt_name, truncate_dim),
    )


@spacy_registry.architectures("registry_xf.TransformerListener.v1")
def transformer_listener_v1(
    pooling: Model[Ragged, Floats2d],
    upstream: str = "*",
    grad_factor: float = 1.0,
) -> Model:
    """Token vectors from an upstream ``registry_xf_transformer`` component.

    ``pooling`` turns each token's piece states into its vector (``reduce_mean.v1``);
    ``upstream`` names the component (``*``: the nearest before); ``grad_factor`` scales
    the gradient passed back to a trainable transformer.
    """
    return chain(TransformerListener(upstream), pieces_to_tokens(pooling, grad_factor))
