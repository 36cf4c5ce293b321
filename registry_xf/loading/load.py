"""Building models from configs and loading them with their weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from confection import Config
from torch import nn

from ..assemblies.base import Assembly, ModelRecord
from ..assemblies.with_head import EncoderWithHead
from ..config.resolve import interpolate, resolve
from ..errors import ConfigError, ConfigProblem
from ..layers.packed_linear import pack_for_cpu
from ..parallel.plan import plan_of
from ..parallel.ranks import agree, digest, ranks_of, together
from ..types import to_device, to_dtype
from .atomic import clean_leftovers
from .integrity import verify_source
from .load_settings import load_setting
from .materialise import materialise_random, on_meta
from .sources import DEFAULT_MODEL, ModelSource, SourceConfig, config_from_source

logger = logging.getLogger(__name__)


def build(
    source: ModelSource,
    *,
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str = "meta",
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    head: bool = True,
) -> nn.Module:
    """Build the ``[model]`` of any source (a config, or what ``load`` accepts) without
    its weights.

    On the meta device (the default) nothing is allocated; give a real ``device`` for a
    freshly initialised model. The ``[model]`` may be any registered module; an assembly
    also gets its ``record``.
    """
    found = config_from_source(
        source,
        overrides=overrides,
        revision=revision,
        local_files_only=local_files_only,
        head=head,
    )
    interpolated = interpolate(found.config)
    if "model" not in interpolated:
        raise ConfigError(
            [ConfigProblem("model", "the config has no [model] section")], source=found.where
        )
    with on_meta():
        resolved = resolve(
            {"model": interpolated["model"]},
            source=found.where,
            raw=found.config,
            base_dir=found.base_dir,
        )
    model = resolved["model"]
    if isinstance(model, Assembly):  # a bare module (a layer built alone) carries no record
        model.record = ModelRecord(config=found.config, origin=found.origin)
    if not head:
        model = without_head(model)
    target = to_device(device)
    if target.type != "meta":
        materialise_random(model, target, to_dtype(dtype) if dtype else torch.float32)
    return model


def load(
    source: ModelSource = DEFAULT_MODEL,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    pack: bool | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    verify: bool = False,
    head: bool = True,
    device_mesh: Any = None,
) -> Assembly:
    """Load a model with its weights (and tokenizer, pooler where the source has them).

    ``source``: a Hub id (``org/name``, ``org/name@revision``), an HF directory (config.json
    and model.safetensors or a shard index), a directory written by ``save``, the name of an
    installed model package, a ``.cfg`` file with a ``[weights]`` section, or a config.
    ``device`` defaults to CPU; ``dtype`` to ``"auto"`` (as stored). ``overrides`` are
    dotted config paths (``{"hyper.attention_backend": "eager"}``). ``pack`` keeps CPU
    linear weights also in oneDNN's blocked layout for faster inference (a second copy of
    them); None packs float32/bfloat16 CPU models of up to 1 GiB, or as the config's
    ``[load] pack`` says. A model too big to pack keeps fused projections that its files
    store apart as separate views of the files (``report.layout``). ``revision`` and
    ``local_files_only`` apply to Hub ids (see docs/sources.md). ``verify`` checks a saved
    directory's files against the sha256 its meta.json records.
    An HF task checkpoint (``*ForSequenceClassification``...) loads with its head
    (``EncoderWithHead``); ``head=False`` loads it as the bare encoder, its head's tensors
    skipped (a saved model with a head: its encoder). See docs/heads.md.
    With ``"auto"``, a checkpoint of mixed floating dtypes loads in the one most of its
    bytes are stored in, the rest cast (listed in ``model.load_report.cast``).
    ``device_mesh`` (a 1-d ``torch.distributed`` DeviceMesh, every rank calling ``load``
    alike) loads this rank's shard of a tensor-parallel model, as the config's
    ``[parallel]`` plan says, reading only its slices of the files; see docs/scaling.md.
    """
    ranks = ranks_of(device_mesh, device) if device_mesh is not None else None
    with together(ranks, "reading the config"):
        if isinstance(source, (str, Path)) and (ranks is None or ranks.rank == 0):
            clean_leftovers(source)  # of interrupted saves; may put back a model moved aside
        found = config_from_source(
            source,
            overrides=overrides,
            revision=revision,
            local_files_only=local_files_only,
            head=head,
        )
        if verify:
            verify_source(found)
        interpolated = interpolate(found.config)
        if "weights" not in interpolated:
            raise ConfigError(
                [
                    ConfigProblem(
                        "weights",
                        "no [weights] section: use registry_xf.build() for a model without weights",
                    )
                ],
                source=found.where,
            )
        with on_meta():
            resolved = resolve(
                interpolated, source=found.where, raw=found.config, base_dir=found.base_dir
            )
        model = _assembly(resolved["model"], found)
        target = ranks.device if ranks is not None else to_device(device or "cpu")
        target_dtype = None if dtype in (None, "auto") else to_dtype(dtype)
        pack = load_setting(interpolated, "pack", pack, found.where)
        if ranks is not None:
            ranks.check_device()
    if ranks is not None:
        agree(
            ranks,
            {
                "the config": digest(found.config.to_str()),
                "the dtype": str(target_dtype or "as stored"),
            },
        )
    with together(ranks, "loading the weights"):
        sharding = plan_of(resolved).shard(model, ranks) if ranks is not None else None
        report = resolved["weights"].load_into(
            model,
            device=target,
            dtype=target_dtype,
            hyper=interpolated.get("hyper", {}),
            # packing copies anyway; a shard is a copy of its slices
            copy_to_fuse=True if pack or ranks is not None else None,
            **({"sharding": sharding} if sharding is not None else {}),
        )
    config = found.config
    if report.layout:  # the config describes the layout the model has
        config = Config(config)
        config["hyper"] = {**config["hyper"], **report.layout}
    model.record = ModelRecord(
        config=config,
        tokenizer=resolved.get("tokenizer"),
        pooler=resolved.get("pooling"),
        load_report=report,
        converter=found.meta.get("hf_converter"),
        origin=found.origin,
        parallel=ranks,
    )
    if not head:
        model = without_head(model)
    report.packing = pack_for_cpu(model, pack)
    logger.info("%s", report)
    return _in_eval_mode(model)


def with_weights(
    model: Assembly,
    weights: Any,
    *,
    tokenizer: Any = None,
    pooler: Any = None,
    hyper: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Assembly:
    """Fill a model built on meta from resolved sections (as spaCy's resolver builds them)
    with ``weights``, and record its tokenizer and pooler: ``load`` for a config that was
    resolved elsewhere."""
    target_dtype = None if dtype in (None, "auto") else to_dtype(dtype)
    report = weights.load_into(model, device=to_device(device), dtype=target_dtype, hyper=hyper)
    model.record = replace(model.record, tokenizer=tokenizer, pooler=pooler, load_report=report)
    logger.info("%s", report)
    return model


def without_head(model: Any) -> Any:
    """The encoder of a model with a task head (with the record, its config's ``[model]``
    now the encoder's), for a source whose config itself has the head (a saved model);
    any other model unchanged."""
    if not isinstance(model, EncoderWithHead):
        return model
    encoder = model.encoder
    config = model.record.config
    if config is not None:
        config = Config(config)
        config["model"] = config["model"]["encoder"]
    encoder.record = replace(model.record, config=config)
    return encoder


def _in_eval_mode(model: Assembly) -> Assembly:
    """``model.eval()``: where no module overrides ``train``, its flag is set directly on
    each module (``nn.Module.train`` recurses through ``__setattr__``: a tenth of a
    millisecond at every load of a small model)."""
    modules = list(model.modules())
    if any(type(m).train is not nn.Module.train for m in modules):
        return model.eval()
    for module in modules:
        module.__dict__["training"] = False
    return model


def _assembly(model: Any, found: SourceConfig) -> Assembly:
    """The built ``[model]``, which must be an assembly (it carries the model's record)."""
    if not isinstance(model, Assembly):
        raise ConfigError(
            [
                ConfigProblem(
                    "model",
                    "the [model] section must build a registry_xf assembly (a subclass of "
                    f"registry_xf.Assembly, such as Encoder.v1 or CausalLM.v1); it built "
                    f"{type(model).__name__}",
                )
            ],
            source=found.where,
        )
    return model
