"""What a family's converter declares, and the machinery every family shares.

A converter is data: how HF ``config.json`` values map to the ``[hyper]`` section of the
family's ``.cfg`` and back, and how HF weight names map to ours and back. Weight names are
templates (``encoder.layer.{i}.attention.output.dense.{p}``); a rule may join several HF
tensors into one of ours (fused query/key/value) and split it again on export.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, ConfigProblem, RegistryXFError, UnsupportedModelError
from .hf_values import checked_hf_values


@functools.lru_cache(maxsize=4096)
def template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>[^.]+)", pattern)
    return re.compile(pattern + r"\Z")


@functools.lru_cache(maxsize=256)
def layer_index_regex(templates: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for names made by any of ``templates`` (each with an ``{i}``) whose
    ``{i}`` is a number; the first template that fits wins, as in a loop over them. The
    number is the match's only named group (``match.lastgroup`` names it): one match per
    name instead of one per template."""
    alternatives = []
    for n, template in enumerate(templates):
        pattern = re.escape(template)
        pattern = re.sub(
            r"\\\{(\w+)\\\}",
            lambda m, n=n: rf"(?P<i{n}>\d+)" if m.group(1) == "i" else "[^.]+",
            pattern,
        )
        alternatives.append(f"(?:{pattern}\\Z)")
    return re.compile("|".join(alternatives))


@dataclass(frozen=True)
class KeyRule:
    """Our parameter ``ours`` is made of the HF tensor(s) ``hf``, concatenated on ``dim``.

    ``transpose`` swaps the two dimensions of a matrix (GPT-2's Conv1D layout).
    ``to_ours``/``to_hf`` reorder a tensor that HF lays out differently (GPT-NeoX's
    per-head interleaved query/key/value rows); they take the ``[hyper]`` values and must
    keep the shape. ``when`` (given the ``[hyper]`` values) limits the rule to one layout of
    a family whose HF names depend on a setting (Falcon's norms); the first rule that matches
    and applies wins.
    """

    ours: str
    hf: tuple[str, ...]
    dim: int = 0
    transpose: bool = False
    to_ours: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None
    to_hf: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None
    when: Callable[[Mapping[str, Any]], bool] | None = None

    def match(self, key: str, hyper: Mapping[str, Any] | None = None) -> list[str] | None:
        """HF names for our ``key`` if this rule covers it (for these ``[hyper]`` values)."""
        names = self.names_for(key)
        if names is None or (self.when is not None and not self.when(hyper or {})):
            return None
        return list(names)

    def names_for(self, key: str) -> tuple[str, ...] | None:
        """HF names for our ``key`` where its template matches, whatever ``when`` says."""
        m = template_regex(self.ours).match(key)
        return None if m is None else tuple(h.format(**m.groupdict()) for h in self.hf)

    def join(
        self,
        tensors: Sequence[torch.Tensor],
        dtype: torch.dtype | None = None,
        hyper: Mapping[str, Any] | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Our tensor from the HF parts, cast to ``dtype`` (floating tensors only) and
        moved to ``device`` (None: the parts') in the same pass: parts are copied straight
        into their slice of one new tensor."""
        first = tensors[0]
        if dtype is None or not first.is_floating_point():
            dtype = first.dtype
        if len(tensors) == 1:
            if first.dtype == dtype and (device is None or first.device == device):
                joined = first  # the common case, without the cost of a call into torch
            else:
                joined = first.to(device=device or first.device, dtype=dtype)
        else:
            shape = list(first.shape)
            shape[self.dim] = sum(t.shape[self.dim] for t in tensors)
            joined = torch.empty(shape, dtype=dtype, device=device or first.device)
            start = 0
            for t in tensors:
                joined.narrow(self.dim, start, t.shape[self.dim]).copy_(t)
                start += t.shape[self.dim]
        if self.to_ours is not None:
            joined = self.to_ours(joined, hyper or {}).contiguous()
        return joined.t().contiguous() if self.transpose else joined

    def split(
        self, tensor: torch.Tensor, sizes: Sequence[int], hyper: Mapping[str, Any] | None = None
    ) -> list[torch.Tensor]:
        """The HF tensor(s) for our ``tensor`` (the inverse of ``join``)."""
        if self.transpose:
            tensor = tensor.t()
        if self.to_hf is not None:
            tensor = self.to_hf(tensor, hyper or {})
        if len(self.hf) == 1:
            return [tensor]
        return list(tensor.split(list(sizes), dim=self.dim))


# The last rule lists asked about (each kept here with its answers, so that its id stays
# its own): for each of our names, the rules whose template it matches and the HF names
# each gives. Which rules match a name depends on the name alone; their ``when`` is asked
# at each call.
_CANDIDATES: OrderedDict[int, tuple[Sequence[KeyRule], int, dict[str, tuple]]] = OrderedDict()
_RULE_LISTS_KEPT = 32
_NAMES_KEPT = 100_000  # per rule list


def _candidates(rules: Sequence[KeyRule], ours: str) -> tuple[tuple[KeyRule, tuple[str, ...]], ...]:
    """The rules of ``rules`` whose template matches ``ours``, in order, with HF names."""
    if not rules:
        return ()
    kept = _CANDIDATES.get(id(rules))
    if kept is None or kept[0] is not rules or kept[1] != len(rules):
        kept = _CANDIDATES[id(rules)] = (rules, len(rules), {})
        while len(_CANDIDATES) > _RULE_LISTS_KEPT:
            _CANDIDATES.popitem(last=False)
    by_name = kept[2]
    found = by_name.get(ours)
    if found is None:
        found = tuple((r, names) for r in rules if (names := r.names_for(ours)) is not None)
        if len(by_name) >= _NAMES_KEPT:
            by_name.clear()
        by_name[ours] = found
    return found


def rule(
    ours: str,
    *hf: str,
    dim: int = 0,
    transpose: bool = False,
    to_ours: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None,
    to_hf: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None,
    when: Callable[[Mapping[str, Any]], bool] | None = None,
) -> KeyRule:
    return KeyRule(ours, tuple(hf), dim, transpose, to_ours, to_hf, when)


def attention_rules(ours: str, q: str, k: str, v: str, o: str) -> list[KeyRule]:
    """Rules for one attention block in both layouts (fused or separate projections)."""
    return [
        rule(f"{ours}.qkv_proj.{{p}}", f"{q}.{{p}}", f"{k}.{{p}}", f"{v}.{{p}}"),
        rule(f"{ours}.q_proj.{{p}}", f"{q}.{{p}}"),
        rule(f"{ours}.k_proj.{{p}}", f"{k}.{{p}}"),
        rule(f"{ours}.v_proj.{{p}}", f"{v}.{{p}}"),
        rule(f"{ours}.o_proj.{{p}}", f"{o}.{{p}}"),
    ]


@dataclass(frozen=True)
class Setting:
    """One ``[hyper]`` value and the HF ``config.json`` key it comes from."""

    hyper: str
    hf: str
    default: Any = None


@dataclass
class HFConverter:
    """Everything needed to read and write one family's HF checkpoints."""

    name: str
    family: str  # configs/<family>.cfg
    model_types: tuple[str, ...]
    hf_architecture: str  # written to config.json "architectures" on export
    settings: Sequence[Setting]
    rules: Sequence[KeyRule]
    checkpoint_prefixes: tuple[str, ...] = ()
    # HF keys that are not part of the encoder (task heads, stale buffers): skipped, reported.
    ignored: tuple[str, ...] = ()
    # Extra conversion of config.json beyond the one-to-one settings (and its inverse).
    extra_from_hf: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extra_to_hf: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    checks: Callable[[dict[str, Any]], None] | None = None
    # The [hyper] setting that counts the "{i}" of weight names (ALBERT: its layer groups).
    layer_index_setting: str = "n_layers"
    # The family's task heads (``*ForSequenceClassification``...) for ``EncoderWithHead``:
    # a converters.heads.HeadLayout (typed loosely: that module builds on this one).
    heads: Any = None
    # HF ``architectures`` read by a converter of their own (T5EncoderModel: the encoder).
    architectures: Mapping[str, str] = field(default_factory=dict)
    # The config a config.json needs, where a setting changes the model's parts (a .cfg
    # that extends ``family``'s); None: always ``family``'s.
    family_for: Callable[[dict[str, Any]], str] | None = None
    # On export, for a model whose settings HF cannot state as they are (T5's head scale,
    # which HF derives from tie_word_embeddings): given the [hyper] values, changes the
    # config.json and the HF tensors in place so that HF computes what the model does, and
    # says what it changed (None: nothing). Export only: reading such a file back is exact.
    fold_for_hf: (
        Callable[[Mapping[str, Any], dict[str, Any], dict[str, torch.Tensor]], str | None] | None
    ) = None
    _ignored_re: list[re.Pattern[str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._ignored_re = [re.compile(p) for p in self.ignored]

    def hyper_from_hf(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """``[hyper]`` overrides for an HF ``config.json``.

        Every size and setting is checked first (``checked_hf_values``): a bad value is a
        ``ConfigError`` naming its config.json key, never an exception from the
        arithmetic below or a model too large to build.
        """
        model_type = hf_config.get("model_type")
        if model_type not in self.model_types:
            raise UnsupportedModelError(
                f"converter {self.name} reads model_type {', '.join(self.model_types)}, "
                f"not {model_type!r}"
            )
        hf_config = checked_hf_values(hf_config, self)
        try:
            if self.checks is not None:
                self.checks(hf_config)
            values = {s.hyper: hf_config.get(s.hf, s.default) for s in self.settings}
            values = {k: v for k, v in values.items() if v is not None}  # absent: the .cfg's
            if self.extra_from_hf is not None:
                values.update(self.extra_from_hf(hf_config))  # may set None (null) on purpose
        except RegistryXFError:
            raise
        except KeyError as e:
            problem = ConfigProblem(str(e.args[0]), f"missing: {self.family} models need it")
            raise ConfigError([problem], source="config.json") from None
        except (TypeError, ValueError, ArithmeticError) as e:
            problem = ConfigProblem("", f"cannot be read as a {self.family} config: {e}")
            raise ConfigError([problem], source="config.json") from None
        return values

    def hyper_to_hf(self, hyper: dict[str, Any]) -> dict[str, Any]:
        """An HF ``config.json`` for ``[hyper]`` values."""
        out: dict[str, Any] = {
            "model_type": self.model_types[0],
            "architectures": [self.hf_architecture],
        }
        for s in self.settings:
            if s.hyper in hyper:
                out[s.hf] = hyper[s.hyper]
        if self.extra_to_hf is not None:
            out.update(self.extra_to_hf(hyper))
        return out

    def for_architectures(self, architectures: Any) -> HFConverter:
        """The converter for a config.json's ``architectures``: this one, or the one
        ``self.architectures`` names for them (the encoder alone of an encoder-decoder)."""
        if isinstance(architectures, list):
            for name in architectures:
                if isinstance(name, str) and name in self.architectures:
                    from ..registry import registry

                    return registry.converters.get(self.architectures[name])()
        return self

    def hf_names(
        self, ours: str, hyper: Mapping[str, Any] | None = None
    ) -> tuple[KeyRule, list[str]] | None:
        if self.heads is not None and ours.startswith("encoder."):
            ours = ours.removeprefix("encoder.")  # an EncoderWithHead's encoder
        rules = self.heads.rules if self.heads is not None and ours.startswith("head.") else ()
        for r, names in (*_candidates(rules, ours), *_candidates(self.rules, ours)):
            if r.when is None or r.when(hyper or {}):
                return r, list(names)
        return None

    def strip_prefix(self, keys: Sequence[str]) -> dict[str, str]:
        """Checkpoint key → name without a task model's prefix (``bert.``), where present."""
        for prefix in self.checkpoint_prefixes:
            if any(k.startswith(prefix) for k in keys):
                return {k: k.removeprefix(prefix) for k in keys}
        return {k: k for k in keys}

    def is_ignored(self, hf_key: str) -> bool:
        return any(p.match(hf_key) for p in self._ignored_re)


def all_converters() -> list[HFConverter]:
    from ..registry import registry

    return [registry.converters.get(name)() for name in registry.converters.names()]


def supported_model_types() -> list[str]:
    return sorted({t for c in all_converters() for t in c.model_types})


_BY_MODEL_TYPE: dict[str, HFConverter] = {}


def converter_for_model_type(model_type: str | None, where: str = "config.json") -> HFConverter:
    """The converter reading HF ``model_type``; an unsupported one lists what is supported.

    Converters are indexed once; an unknown type re-reads the registry (a package that
    adds converters may have been installed since).
    """
    if not isinstance(model_type, str):
        raise UnsupportedModelError(
            f"{where}: model_type must be a string such as 'bert'; found {model_type!r}"
        )
    if model_type not in _BY_MODEL_TYPE:
        for converter in all_converters():
            for kind in converter.model_types:
                _BY_MODEL_TYPE.setdefault(kind, converter)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]  # type: ignore[index]
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not supported. Supported model types: "
        f"{', '.join(supported_model_types())}"
    )
