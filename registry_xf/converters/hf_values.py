"""What the values of an HF config.json must be, checked before a converter reads them.

Converters do arithmetic on config.json values (``hidden_size // num_attention_heads``,
``range(num_hidden_layers)``): a zero, a negative number, ``1e9`` or NaN there would raise
deep inside a converter, or build a model that no memory holds. Every key that converters
read is checked here first, with the same bounds as the components' own parameters
(``registry_xf.types``), and every problem is reported at once, named by its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from ..errors import ConfigError, ConfigProblem
from ..layers.rope_scaling import value_problem as rope_value_problem
from ..types import (
    Eps,
    Fraction,
    HeadCount,
    HeadWidth,
    LayerCount,
    PositionCount,
    Probability,
    RopeBase,
    TypeVocabSize,
    VocabSize,
    Width,
)

if TYPE_CHECKING:
    from .base import HFConverter

_KINDS: dict[str, Any] = {
    "layers": LayerCount,
    "width": Width,
    "heads": HeadCount,
    "head width": HeadWidth,
    "vocabulary": VocabSize,
    "token types": TypeVocabSize,
    "positions": PositionCount,
    "eps": Eps,
    "probability": Probability,
    "rope base": RopeBase,
    "fraction": Fraction,
}
_ADAPTERS = {kind: TypeAdapter(annotation) for kind, annotation in _KINDS.items()}

# config.json keys the converters read (their meaning is the same in every family).
HF_KEY_KINDS: dict[str, str] = {
    "num_hidden_layers": "layers",
    "n_layer": "layers",
    "n_layers": "layers",
    "num_hidden_groups": "layers",
    "hidden_size": "width",
    "n_embd": "width",
    "dim": "width",
    "embedding_size": "width",
    "intermediate_size": "width",
    "hidden_dim": "width",
    "n_inner": "width",
    "ffn_hidden_size": "width",
    "num_attention_heads": "heads",
    "n_head": "heads",
    "n_heads": "heads",
    "num_key_value_heads": "heads",
    "num_kv_heads": "heads",
    "head_dim": "head width",
    "vocab_size": "vocabulary",
    "type_vocab_size": "token types",
    "max_position_embeddings": "positions",
    "n_positions": "positions",
    "sliding_window": "positions",
    "layer_norm_eps": "eps",
    "rms_norm_eps": "eps",
    "layer_norm_epsilon": "eps",
    "hidden_dropout_prob": "probability",
    "attention_probs_dropout_prob": "probability",
    "dropout": "probability",
    "attention_dropout": "probability",
    "rope_theta": "rope base",
    "rotary_emb_base": "rope base",
    "rotary_pct": "fraction",
    "partial_rotary_factor": "fraction",
    # T5's names
    "d_model": "width",
    "d_kv": "head width",
    "d_ff": "width",
    "num_layers": "layers",
    "num_decoder_layers": "layers",
    "num_heads": "heads",
    "relative_attention_num_buckets": "positions",
    "relative_attention_max_distance": "positions",
    "dropout_rate": "probability",
    # ModernBERT's names
    "local_attention": "positions",
    "global_attn_every_n_layers": "layers",
    "norm_eps": "eps",
    "global_rope_theta": "rope base",
    "local_rope_theta": "rope base",
    "embedding_dropout": "probability",
    "mlp_dropout": "probability",
    "classifier_dropout": "probability",
    # BART's names
    "encoder_layers": "layers",
    "decoder_layers": "layers",
    "encoder_attention_heads": "heads",
    "decoder_attention_heads": "heads",
    "encoder_ffn_dim": "width",
    "decoder_ffn_dim": "width",
}
# Inside rope_scaling / rope_parameters: HF's names for ours.
_ROPE_KEYS = {"original_max_position_embeddings": "original_max_positions"}
_ROPE_SECTIONS = ("rope_scaling", "rope_parameters")
# rope_parameters given per kind of layer (ModernBERT's local and global layers)
_PER_LAYER_TYPE = ("full_attention", "sliding_attention")


def checked_hf_values(hf: Mapping[str, Any], converter: HFConverter) -> dict[str, Any]:
    """``hf`` with its sizes and settings converted (``"32"`` → 32), or a ``ConfigError``
    naming every config.json key whose value no model has."""
    problems: list[ConfigProblem] = []
    checked = dict(hf)
    for key, kind in HF_KEY_KINDS.items():
        value = hf.get(key)
        if value is None:  # absent or null: the converter's default applies
            continue
        try:
            checked[key] = _ADAPTERS[kind].validate_python(value)
        except ValidationError as e:
            problems.append(ConfigProblem(key, f"{_message(e)} (a {kind} setting)", value, True))
    for section in _ROPE_SECTIONS:
        problems += _rope_problems(section, hf.get(section))
    if not problems:
        problems += _cross_problems(checked, converter)
    if problems:
        raise ConfigError(problems, source="config.json")
    return checked


def _rope_problems(section: str, value: Any) -> list[ConfigProblem]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [ConfigProblem(section, "expected an object (or null)", value, True)]
    problems = []
    for key, item in value.items():
        path = f"{section}.{key}"
        if key in _PER_LAYER_TYPE and isinstance(item, Mapping):  # ModernBERT's, by kind
            problems += _rope_problems(path, item)
            continue
        if key == "rope_theta" or key == "partial_rotary_factor":
            kind = "rope base" if key == "rope_theta" else "fraction"
            try:
                _ADAPTERS[kind].validate_python(item)
            except ValidationError as e:
                problems.append(ConfigProblem(path, _message(e), item, True))
            continue
        if item is None:
            continue
        found = rope_value_problem(_ROPE_KEYS.get(key, key), item)
        if found:
            problems.append(ConfigProblem(path, found))
    return problems


def _message(error: ValidationError) -> str:
    return error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")


def _setting_key(converter: HFConverter, hyper: str) -> str | None:
    return next((s.hf for s in converter.settings if s.hyper == hyper), None)


def _cross_problems(hf: Mapping[str, Any], converter: HFConverter) -> list[ConfigProblem]:
    """Values that are each fine but do not fit together (heads that do not divide)."""
    heads_key = _setting_key(converter, "n_heads")
    hidden_key = _setting_key(converter, "hidden_width")
    heads = hf.get(heads_key) if heads_key else None
    if heads is None:
        return []
    problems = []
    hidden = hf.get(hidden_key) if hidden_key else None
    if hidden is not None and hf.get("head_dim") is None and hidden % heads:
        problems.append(
            ConfigProblem(
                heads_key,
                f"does not divide {hidden_key} = {hidden} (and no head_dim is given)",
                heads,
                True,
            )
        )
    for kv_key in ("num_key_value_heads", "num_kv_heads"):
        kv = hf.get(kv_key)
        if kv is not None and heads % kv:
            problems.append(
                ConfigProblem(kv_key, f"does not divide {heads_key} = {heads}", kv, True)
            )
    return problems
