"""HF directories: their config.json as a filled registry_xf config, and export back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confection import Config
from safetensors.torch import save_file
from torch import nn

from ..config.families import family_config_text
from ..config.resolve import interpolate, read_config
from ..converters.base import HFConverter, converter_for_model_type
from ..errors import (
    CheckpointError,
    ConfigError,
    RegistryXFError,
    UnsupportedModelError,
)
from ..registry import registry
from ..types import dtype_name
from .atomic import atomic_directory, write_json
from .materialise import parameter_slots
from .paths import safe_join
from .written import EXPORTED_KIND, WRITER, WRITER_KEY, is_exported_hf


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
    folder = safe_join(directory, pooling.get("path"), where=str(modules_file))
    settings = json.loads((folder / "config.json").read_text(encoding="utf8"))
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
    config = read_config(
        family_config_text(converter.family), {f"hyper.{k}": v for k, v in hyper.items()}
    )
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
    with atomic_directory(
        target, overwrite=overwrite, replaceable=is_exported_hf, kind=EXPORTED_KIND
    ) as tmp:
        write_json(tmp / "config.json", hf_config)
        metadata = {"format": "pt", WRITER_KEY: WRITER}
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return target
