"""HF directories: their config.json as a filled registry_xf config, and export back."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from confection import Config
from safetensors.torch import save_file
from torch import nn

from ..config.families import family_config_text
from ..config.resolve import interpolate, read_config
from ..converters.base import HFConverter, converter_for_model_type, template_regex
from ..errors import (
    CheckpointError,
    ConfigError,
    ConfigProblem,
    RegistryXFError,
    UnsupportedModelError,
)
from ..registry import registry
from ..types import dtype_name
from .atomic import atomic_directory, write_json
from .checkpoint import checkpoint_files, open_checkpoint
from .materialise import parameter_slots


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing (an HF model directory has a config.json)"
        ) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _sentence_transformers_pooling(directory: Path) -> dict[str, Any] | None:
    """The pooler a sentence-transformers directory declares (modules.json), if any."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf8"))
    types = [m.get("type", "") for m in modules]
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is None:
        return None
    settings = json.loads((directory / pooling["path"] / "config.json").read_text(encoding="utf8"))
    if settings.get("pooling_mode_cls_token"):
        name = "registry_xf.CLSPooler.v1"
    elif settings.get("pooling_mode_max_tokens"):
        name = "registry_xf.MaxPooler.v1"
    else:
        name = "registry_xf.MeanPooler.v1"
    return {"@poolers": name, "normalize": any(t.endswith("Normalize") for t in types)}


def _max_length(directory: Path) -> int | None:
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text(encoding="utf8")).get("max_seq_length")
        if isinstance(value, int):
            return value
    return None


def _eos_token_ids(directory: Path, hf: Mapping[str, Any]) -> list[int] | None:
    """The end-of-sequence ids generation_config.json (else config.json) records, if any."""
    generation: Any = {}
    path = directory / "generation_config.json"
    if path.is_file():
        try:
            generation = json.loads(path.read_text(encoding="utf8"))
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for source in (generation, hf):
        value = source.get("eos_token_id") if isinstance(source, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return list(value)
    return None


def hf_config(directory: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """``config_from_hf`` without writing out the defaults (what loading needs)."""
    if directory.is_file() and directory.name == "config.json":
        directory = directory.parent
    hf = read_hf_config(directory)
    where = directory / "config.json"
    converter = converter_for_model_type(hf.get("model_type"), where=str(where))
    try:
        hyper = converter.hyper_from_hf(hf)
    except UnsupportedModelError as e:  # name the file, not just "config.json"
        raise UnsupportedModelError(f"{where}: {str(e).removeprefix('config.json: ')}") from None
    except ConfigError as e:
        raise ConfigError(e.problems, source=str(where)) from None
    config = read_config(
        family_config_text(converter.family), {f"hyper.{k}": v for k, v in hyper.items()}
    )
    check_config_against_weights(directory, hf, converter, interpolate(config).get("hyper", {}))
    config["weights"] = {
        "@loaders": "registry_xf.Safetensors.v1",
        "path": str(directory),
        "converter": {"@converters": converter.name},
    }
    if (directory / "tokenizer.json").is_file():
        config["tokenizer"] = {"@tokenizers": "registry_xf.HFTokenizer.v1", "path": str(directory)}
        max_length = _max_length(directory)
        if max_length is not None:
            config["tokenizer"]["max_length"] = max_length
    pooling = _sentence_transformers_pooling(directory)
    if pooling is not None:
        config["pooling"] = pooling
    causal = config["model"].get("@architectures") == "registry_xf.CausalLM.v1"
    eos = _eos_token_ids(directory, hf) if causal else None
    if eos is not None:
        config["generation"] = {"eos_token_ids": eos}
    if not overrides:
        return config
    try:
        return read_config(config, overrides)
    except ConfigError as e:
        raise ConfigError(e.problems, source=e.source or str(directory)) from None


def converter_of(model: nn.Module) -> HFConverter:
    """The HF converter for a loaded model (from its config's weights or its family)."""
    record = getattr(model, "record", None)
    config = record.config if record is not None else None
    name = None
    if config is not None:
        weights = config.get("weights", {})
        converter = weights.get("converter") if isinstance(weights, Mapping) else None
        if isinstance(converter, Mapping):
            name = converter.get("@converters")
    name = name or (record.converter if record is not None else None)
    if name is None:
        raise RegistryXFError(
            "this model has no HF converter on record (it was not loaded from an HF "
            "checkpoint); pass converter=... to export_hf"
        )
    return registry.converters.get(name)()


def export_hf(
    model: nn.Module,
    path: str | Path,
    *,
    converter: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an HF directory (config.json, model.safetensors, tokenizer).

    The result loads in HF transformers with the family's ``*Model`` class.
    """
    conv = registry.converters.get(converter)() if converter else converter_of(model)
    hyper = dict(interpolate(model.config)["hyper"])
    hf_config = conv.hyper_to_hf(hyper)
    tensors = {}
    for ours, places in parameter_slots(model).items():
        found = conv.hf_names(ours, hyper)
        if found is None:
            raise RegistryXFError(f"{conv.name} has no HF name for {ours}")
        rule, names = found
        tensor = places[0][0]._parameters.get(places[0][1])
        if tensor is None:
            tensor = places[0][0]._buffers[places[0][1]]
        owner = model.get_submodule(ours.rsplit(".", 2)[0]) if ours.count(".") >= 2 else model
        sizes = getattr(owner, "split", None) or [tensor.shape[rule.dim] // len(names)] * len(names)
        parts = rule.split(tensor.detach(), sizes, hyper)
        for name, part in zip(names, parts, strict=True):
            tensors[name] = part.contiguous().cpu()
    hf_config["torch_dtype"] = dtype_name(next(iter(tensors.values())).dtype)
    target = Path(path)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        write_json(tmp / "config.json", hf_config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return target


# --- config.json against the weights' header ----------------------------------------------

# config.json keys that set a [hyper] value beside the converters' one-to-one settings.
_DERIVED_KEYS = {
    "n_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_width": ("head_dim",),
    "intermediate_width": ("n_inner", "ffn_hidden_size"),
    "embedding_width": ("embedding_size",),
}


def check_config_against_weights(
    directory: Path, hf: Mapping[str, Any], converter: HFConverter, hyper: Mapping[str, Any]
) -> None:
    """Refuse a config.json that disagrees with its safetensors files, before anything is
    built: the vocabulary and widths against the embedding and projection shapes, the
    number of layers against the layer indexes in the tensor names, and the heads against
    the query/key/value shapes. Reads the files' headers only.

    ``hyper`` holds the ``[hyper]`` values config.json gives (the family's defaults for
    the rest). A directory without weights passes: loading reports what is missing.
    """
    try:
        checkpoint_files(directory)
    except CheckpointError:
        return
    with open_checkpoint(directory, "cpu") as ckpt:
        stripped = converter.strip_prefix(ckpt.keys())
        shapes = {name: key for key, name in stripped.items()}
        facts = _WeightFacts(converter, hyper, shapes, ckpt.shape)
        problems = [
            ConfigProblem(_key_text(converter, hf, hyper, name), message, hyper.get(name), True)
            for name, message in facts.disagreements()
        ]
    if problems:
        raise ConfigError(problems, source=str(directory / "config.json"))


def _key_text(
    converter: HFConverter, hf: Mapping[str, Any], hyper: Mapping[str, Any], name: str
) -> str:
    """The config.json key that sets the [hyper] value ``name``, as an error's path."""
    keys = [s.hf for s in converter.settings if s.hyper == name] or list(
        _DERIVED_KEYS.get(name, ())
    )
    present = [k for k in keys if k in hf]
    if present:
        return present[0]
    if keys:
        return f"{keys[0]} (absent: {name} = {hyper.get(name)!r} by default)"
    return f"hyper.{name} (derived from config.json)"


class _WeightFacts:
    """What the weights' shapes say about the [hyper] values, compared with them."""

    def __init__(
        self,
        converter: HFConverter,
        hyper: Mapping[str, Any],
        names: Mapping[str, str],
        shape_of: Callable[[str], tuple[int, ...]],
    ):
        self.converter = converter
        self.hyper = hyper
        self.names = names  # HF name without prefix -> name in the files
        self.shape_of = shape_of

    def disagreements(self) -> list[tuple[str, str]]:
        """(``[hyper]`` name, what the weights say) for each value they contradict."""
        found: list[tuple[str, str]] = []
        hyper = self.hyper
        width_name = "embedding_width" if hyper.get("embedding_width") else "hidden_width"
        for suffix, dims in (
            ("embeddings.word_embeddings.weight", ("vocab_size", width_name)),
            ("embeddings.positions.weight", ("max_positions", None)),
            ("embeddings.token_type_embeddings.weight", ("type_vocab_size", None)),
            ("layers.0.feed_forward.down_proj.weight", ("hidden_width", "intermediate_width")),
        ):
            tensor = self._tensor(suffix)
            if tensor is None:
                continue
            name, shape = tensor
            for axis, setting in enumerate(dims):
                value = hyper.get(setting) if setting else None
                if value is not None and axis < len(shape) and shape[axis] != value:
                    found.append((setting, f"the weights' {name} has shape {list(shape)}"))
        found += self._layer_count()
        found += self._heads()
        return found

    def _tensor(self, suffix: str) -> tuple[str, tuple[int, ...]] | None:
        """The shape (in our layout) of the single HF tensor for our parameter ``*suffix``."""
        for rule in self.converter.rules:
            ours = rule.ours.replace("{i}", "0").replace("{p}", "weight")
            if not ours.endswith(suffix):
                continue
            found = self.converter.hf_names(ours, self.hyper)
            if found is None or found[0] is not rule or len(found[1]) != 1:
                continue
            name = found[1][0]
            if name in self.names:
                shape = tuple(self.shape_of(self.names[name]))
                return self.names[name], tuple(reversed(shape)) if rule.transpose else shape
        return None

    def _layer_count(self) -> list[tuple[str, str]]:
        setting = self.converter.layer_index_setting
        expected = self.hyper.get(setting)
        indexes: set[int] = set()
        for rule in self.converter.rules:
            for template in rule.hf:
                if "{i}" not in template:
                    continue
                pattern = template_regex(template)
                for name in self.names:
                    m = pattern.match(name)
                    if m is not None and m.group("i").isdigit():
                        indexes.add(int(m.group("i")))
        if not indexes or expected is None or indexes == set(range(expected)):
            return []
        what = f"layers 0 to {max(indexes)}" if len(indexes) == max(indexes) + 1 else "layers"
        listed = f"{what} ({len(indexes)} in all)"
        return [(setting, f"the weights' tensor names have {listed}")]

    def _heads(self) -> list[tuple[str, str]]:
        hyper = self.hyper
        n_heads, hidden = hyper.get("n_heads"), hyper.get("hidden_width")
        if not n_heads or not hidden:
            return []
        n_kv = hyper.get("n_kv_heads") or n_heads
        head_width = hyper.get("head_width") or hidden // n_heads
        for rule in self.converter.rules:
            ours = rule.ours.replace("{i}", "0").replace("{p}", "weight")
            if not ours.endswith("layers.0.attention.qkv_proj.weight"):
                continue
            found = self.converter.hf_names(ours, hyper)
            if found is None or any(n not in self.names for n in found[1]):
                continue
            rule, names = found
            rows = []
            for name in names:
                shape = tuple(self.shape_of(self.names[name]))
                rows.append(shape[-1] if rule.transpose else shape[0])
            heads_text = f"{n_heads} query heads and {n_kv} key/value heads of width {head_width}"
            if len(rows) == 3:
                problems = []
                if rows[0] != n_heads * head_width:
                    problems.append(
                        (
                            "n_heads",
                            f"{n_heads} query heads of width {head_width} need "
                            f"{n_heads * head_width} rows; the weights' {self.names[names[0]]} "
                            f"has {rows[0]}",
                        )
                    )
                if rows[1] != n_kv * head_width:
                    problems.append(
                        (
                            "n_kv_heads",
                            f"{n_kv} key/value heads of width {head_width} need "
                            f"{n_kv * head_width} rows; the weights' {self.names[names[1]]} "
                            f"has {rows[1]}",
                        )
                    )
                return problems
            total = (n_heads + 2 * n_kv) * head_width
            if len(rows) == 1 and rows[0] != total:
                return [
                    (
                        "n_heads",
                        f"{heads_text} need {total} query/key/value rows; the weights' "
                        f"{self.names[names[0]]} has {rows[0]}",
                    )
                ]
            return []
        return []
