"""A task checkpoint whose head is named in the layout config.json does not choose.

Some families name one head two ways, chosen by a config.json switch (DeBERTa-v2's
``legacy``: ``cls.predictions.*`` or ``lm_predictions.lm_head.*``). A file holding the
other layout's head would otherwise load as a bare encoder, its head skipped in silence.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..converters.base import HFConverter
from ..errors import ConfigError, ConfigProblem
from .checkpoint import checkpoint_files, stored_shapes


def check_head_layout(
    directory: Path, converter: HFConverter, marker: str, hyper: Mapping[str, Any]
) -> None:
    """Refuse a checkpoint that lacks the head parameter ``marker`` under ``hyper``'s
    layout but holds it under the other one, naming the config.json key and the tensor.

    ``hyper`` holds the ``[hyper]`` values config.json gives. Families without a layout
    switch, and directories whose headers cannot be read, pass."""
    setting = getattr(converter.heads, "mlm_layout_setting", None)
    stored = stored_shapes(directory) if setting is not None else None
    if setting is None or stored is None:
        return
    names = {name: key for key, name in converter.strip_prefix(list(stored)).items()}
    value = bool(hyper.get(setting))
    chosen = converter.hf_names(marker, hyper)
    other = converter.hf_names(marker, {**hyper, setting: not value})
    if chosen is None or other is None or chosen[1][0] in names or other[1][0] not in names:
        return
    key = next((s.hf for s in converter.settings if s.hyper == setting), f"hyper.{setting}")
    files = checkpoint_files(directory)
    where = files[0] if len(files) == 1 else directory
    problem = ConfigProblem(
        key,
        f"{str(value).lower()} names the head's tensors like {chosen[1][0]}, but {where} holds "
        f"{names[other[1][0]]}, the name {key} = {str(not value).lower()} gives it; set {key} "
        "to match the weights",
        value,
        True,
    )
    raise ConfigError([problem], source=str(directory / "config.json"))
