"""Building models from configs and loading them with their weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from confection import Config
from torch import nn

from ..config.resolve import interpolate, read_config, resolve
from ..errors import ConfigError, ConfigProblem
from ..layers.packed_linear import pack_for_cpu
from ..types import CONFIG_DIR, to_device, to_dtype
from .hf import hf_config
from .load_settings import load_setting
from .materialise import materialise_random, on_meta
from .sources import DEFAULT_MODEL, META_FILE, SAVED_CONFIG, locate

logger = logging.getLogger(__name__)

ConfigSource = str | Path | Config | Mapping[str, Any]


def build(
    config: ConfigSource,
    *,
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str = "meta",
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Build the ``[model]`` of a config without weights.

    On the meta device (the default) nothing is allocated; give a real ``device`` for a
    freshly initialised model.
    """
    base = (
        Path(config).parent if isinstance(config, (str, Path)) and "\n" not in str(config) else None
    )
    source = str(config) if base is not None else None  # named in config errors
    config = read_config(config, overrides)
    token = CONFIG_DIR.set(base)
    try:
        interpolated = interpolate(config)
        if "model" not in interpolated:
            raise ConfigError(
                [ConfigProblem("model", "the config has no [model] section")], source=source
            )
        with on_meta():
            model = resolve({"model": interpolated["model"]}, source=source, raw=config)["model"]
    finally:
        CONFIG_DIR.reset(token)
    _attach(model, config=config)
    target = to_device(device)
    if target.type != "meta":
        materialise_random(model, target, to_dtype(dtype) if dtype else torch.float32)
    return model


def _attach(model: nn.Module, **attrs: Any) -> None:
    """Record where the model came from (plain attributes, not submodules)."""
    for key, value in attrs.items():
        object.__setattr__(model, key, value)


def load(
    source: str | Path | Config = DEFAULT_MODEL,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pack: bool | None = None,
) -> nn.Module:
    """Load a model with its weights (and tokenizer, pooler where the source has them).

    ``source``: a ``.cfg`` file with a ``[weights]`` section, an HF directory (config.json
    and model.safetensors or a shard index), a directory written by ``save``, or the name
    of an installed model package. ``device`` defaults to CPU; ``dtype`` to ``"auto"`` (as
    stored). ``overrides`` are dotted config paths (``{"hyper.attention_backend": "eager"}``).
    ``pack`` keeps CPU linear weights also in oneDNN's blocked layout for faster inference
    (a second copy of them); None packs float32/bfloat16 CPU models of up to 1 GiB, or as
    the config's ``[load] pack`` says. A model too big to pack keeps fused projections
    that its files store apart as separate views of the files (``report.layout``).
    """
    base: Path | None = None
    meta: dict[str, Any] = {}
    where: str | None = None  # named in config errors
    if isinstance(source, Config):
        config = read_config(source, overrides)
    else:
        located = locate(source)
        where = str(located.path)
        if located.kind == "hf":
            config = hf_config(located.path.resolve(), overrides)
        elif located.kind == "saved":
            base = located.path
            where = str(located.path / SAVED_CONFIG)
            config = read_config(located.path / SAVED_CONFIG, overrides)
            meta_path = located.path / META_FILE
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text(encoding="utf8"))
        else:
            base = located.path.parent
            config = read_config(located.path, overrides)
    token = CONFIG_DIR.set(base)
    try:
        interpolated = interpolate(config)
        if "weights" not in interpolated:
            raise ConfigError(
                [
                    ConfigProblem(
                        "weights",
                        "no [weights] section: use registry_xf.build() for a model without weights",
                    )
                ],
                source=where,
            )
        with on_meta():
            resolved = resolve(interpolated, source=where, raw=config)
    finally:
        CONFIG_DIR.reset(token)
    model = resolved["model"]
    target = to_device(device or "cpu")
    target_dtype = None if dtype in (None, "auto") else to_dtype(dtype)
    pack = load_setting(interpolated, "pack", pack, where)
    report = resolved["weights"].load_into(
        model,
        device=target,
        dtype=target_dtype,
        hyper=interpolated.get("hyper", {}),
        copy_to_fuse=True if pack else None,  # packing copies anyway
    )
    if report.layout:  # the config describes the layout the model has
        config = Config(config)
        config["hyper"] = {**config["hyper"], **report.layout}
    _attach(
        model,
        config=config,
        tokenizer=resolved.get("tokenizer"),
        pooler=resolved.get("pooling"),
        load_report=report,
        hf_converter=meta.get("hf_converter"),
    )
    report.packing = pack_for_cpu(model, pack)
    logger.info("%s", report)
    return model.eval()
