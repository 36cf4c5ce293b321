"""Saving a model as a directory that ``load`` reads back bit-exactly."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from confection import Config
from safetensors.torch import save_file
from torch import nn

from ..about import FORMAT_VERSION, __version__
from ..config.resolve import fill, interpolate
from ..converters.base import HFConverter
from ..errors import RegistryXFError
from ..types import dtype_name
from .atomic import atomic_directory, flushing, write_json
from .hf import HFFiles, converter_of, hf_files, refuse_shard
from .integrity import HASHES_KEY, file_hashes
from .materialise import parameter_slots
from .sources import META_FILE, SAVED_CONFIG
from .written import WRITER, WRITER_KEY

logger = logging.getLogger(__name__)

_MAX_META_BYTES = 2**20  # a meta.json of ours is a few kilobytes at most


def save(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``config.cfg``, ``model.safetensors``, tokenizer files and ``meta.json``
    (which records the sha256 of the other files).

    A model with a ``[pooling]`` or ``[embedding]`` section and an HF converter (one loaded
    from a sentence-transformers folder, say) is written as ``export_hf`` writes it, by the
    same code (its weights under HF's names, config.json, the sentence-transformers files),
    with ``config.cfg`` naming the converter: sentence-transformers loads the folder too.

    The directory is written beside its target, flushed to disk and swapped into place
    (see ``atomic.py``), so the path never holds a half-written model, and a crash leaves
    the old model or the new one there. ``overwrite=True`` replaces only a model saved by
    registry_xf or an empty folder.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise RegistryXFError(
            "this model has no config on record: build or load it with registry_xf"
        )
    refuse_shard(model, "save")
    slots = _valued_slots(model)
    try:
        converter: HFConverter | None = converter_of(model)
    except RegistryXFError:
        converter = None
    saved = Config(config)
    saved["weights"] = {"@loaders": "registry_xf.Safetensors.v1", "path": "model.safetensors"}
    hf = _sentence_transformers_layout(model, converter, path)
    if hf is not None and converter is not None:
        saved["weights"]["converter"] = {"@converters": converter.name}
    tensors = hf.tensors if hf is not None else _our_tensors(slots)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and "tokenizer" in saved:
        saved["tokenizer"] = {**saved["tokenizer"], "path": "."}
    target = Path(path)
    with atomic_directory(target, overwrite=overwrite, replaceable=is_saved_model) as tmp:
        fill(saved).to_disk(tmp / SAVED_CONFIG, interpolate=False)
        if hf is not None:
            hf.write(tmp, tokenizer)
        else:
            metadata = {"format": "pt", WRITER_KEY: WRITER}
            save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
            if tokenizer is not None:
                tokenizer.save(tmp)
        with flushing(tmp):
            hashes = file_hashes(tmp)
        write_json(
            tmp / META_FILE,
            {
                "registry_xf_version": __version__,
                "format_version": FORMAT_VERSION,
                "dtype": dtype_name(next(iter(tensors.values())).dtype) if tensors else None,
                "hf_converter": converter.name if converter is not None else None,
                HASHES_KEY: hashes,
            },
        )
    return target


def _valued_slots(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under our names (shared ones once); a
    RegistryXFError for one without a value (built on the meta device)."""
    slots = {}
    for name, places in parameter_slots(model).items():
        module, attr = places[0]
        tensor = module._parameters.get(attr)
        tensor = tensor if tensor is not None else module._buffers[attr]
        if tensor.device.type == "meta":
            raise RegistryXFError(
                f"{name} has no value (meta tensor): load or initialise the model first"
            )
        slots[name] = tensor
    return slots


def _our_tensors(slots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to write under our names, on the CPU."""
    return {name: tensor.detach().contiguous().cpu() for name, tensor in slots.items()}


def _sentence_transformers_layout(
    model: nn.Module, converter: HFConverter | None, path: str | Path
) -> HFFiles | None:
    """The files of an HF directory that sentence-transformers reads, for a model whose
    config has a ``[pooling]`` or ``[embedding]`` section; None for any other model, or
    (logged) one without an HF converter, with parts HF has no names or modules for, or
    whose weights HF's files would change (``HFConverter.fold_for_hf``)."""
    sections = interpolate(model.config)
    if not any(isinstance(sections.get(s), Mapping) for s in ("pooling", "embedding")):
        return None
    reason = "no HF converter on record" if converter is None else None
    if converter is not None:
        try:
            files = hf_files(model, converter)
        except RegistryXFError as e:
            reason = str(e)
        else:
            if not files.folded:
                return files
            reason = "HF's files would not hold its weights bit for bit: " + files.folded[0]
    logger.info(
        "%s: saved in registry_xf's layout alone, which sentence-transformers cannot load: %s",
        path,
        reason,
    )
    return None


def is_saved_model(directory: Path) -> bool:
    """A directory written by ``registry_xf.save``: config.cfg and our meta.json."""
    meta = directory / META_FILE
    if not (directory / SAVED_CONFIG).is_file() or not meta.is_file():
        return False
    try:
        if meta.stat().st_size > _MAX_META_BYTES:
            return False
        data = json.loads(meta.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"registry_xf_version", "format_version"} <= set(data)
