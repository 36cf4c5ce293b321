"""The config's ``[load]`` section: how ``load`` treats a model, beside what it is.

    [load]
    # pack CPU linear weights for inference: true, false, or null (automatic: float32 and
    # bfloat16 CPU models of up to 1 GiB)
    pack = null

A keyword argument of ``load`` wins over the config's value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, ConfigProblem

# setting -> (the values it accepts, in words)
LOAD_SETTINGS = {"pack": "true, false or null (automatic)"}


def load_setting(config: Mapping[str, Any], name: str, given: Any, source: str | None) -> Any:
    """``given`` when not None, else the config's ``[load] name`` (None when absent).

    An unknown setting in ``[load]``, or a value of the wrong kind, is a ``ConfigError``
    naming its dotted path."""
    section = config.get("load") or {}
    problems = [
        ConfigProblem(f"load.{key}", f"unknown setting: [load] takes {', '.join(LOAD_SETTINGS)}")
        for key in section
        if key not in LOAD_SETTINGS
    ]
    value = section.get(name)
    if name == "pack" and value is not None and not isinstance(value, bool):
        problems.append(
            ConfigProblem(f"load.{name}", f"expected {LOAD_SETTINGS[name]}", value, True)
        )
    if problems:
        raise ConfigError(problems, source=source)
    return given if given is not None else value
