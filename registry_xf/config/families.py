"""Family configs, and configs written as the difference from another.

A config may begin with an ``[extends]`` section naming the config it differs from:
``family = "llama"`` (a config shipped in ``configs/``) or ``path = "base.cfg"``
(relative to the config's own file). Its other sections are laid over the base's:
sections merge key by key, values replace values, and a section that names another
registered function (``@layers = ...``) replaces the base's section whole, since a
different component takes different arguments. The result is an ordinary, complete
config: ``registry-xf config`` prints it whole, with the differences applied.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from confection import Config

from ..errors import ConfigError, ConfigProblem
from .text import parse_config

EXTENDS = "extends"
_MAX_DEPTH = 8  # bases of bases; deeper is a loop or a mistake


@functools.lru_cache(maxsize=64)
def family_config_text(family: str) -> str:
    """The complete text of ``configs/<family>.cfg`` as shipped with the package (with any
    base it extends applied; read once)."""
    text = _shipped_text(family, where=f"configs/{family}.cfg")
    return expand_extends(text, None, where=f"configs/{family}.cfg")


def _shipped_text(family: str, where: str) -> str:
    if not isinstance(family, str) or not family.replace("_", "").isalnum():
        raise ConfigError([ConfigProblem(f"{EXTENDS}.family", "not a family name", family, True)])
    try:
        return resources.files("registry_xf.configs").joinpath(f"{family}.cfg").read_text("utf8")
    except FileNotFoundError:
        raise ConfigError(
            [ConfigProblem("", f"no config for family {family!r} (configs/{family}.cfg)")],
            source=where,
        ) from None


def expand_extends(text: str, base_dir: Path | None, *, where: str | None = None) -> str:
    """``text`` with the config it extends laid under it; unchanged without ``[extends]``."""
    return _expand(text, base_dir, where, 0)


def _expand(text: str, base_dir: Path | None, where: str | None, depth: int) -> str:
    if f"[{EXTENDS}]" not in text:
        return text
    try:
        config = parse_config(_with_parent_sections(text))
    except Exception as e:
        raise ConfigError([ConfigProblem("", f"cannot parse config: {e}")], source=where) from None
    extends = config.get(EXTENDS)
    if (
        not isinstance(extends, Mapping)
        or len(extends) != 1
        or not (set(extends) <= {"family", "path"})
    ):
        raise ConfigError(
            [
                ConfigProblem(
                    EXTENDS,
                    'expected one setting: family = "<name>" (a shipped config) or '
                    'path = "<file.cfg>"',
                    dict(extends) if isinstance(extends, Mapping) else extends,
                    True,
                )
            ],
            source=where,
        )
    if depth >= _MAX_DEPTH:
        raise ConfigError(
            [ConfigProblem(EXTENDS, f"more than {_MAX_DEPTH} bases deep (a loop?)")], source=where
        )
    if "family" in extends:
        family = extends["family"]
        base_where = f"configs/{family}.cfg"
        base_text, base_base_dir = _shipped_text(family, base_where), None
    else:
        path = Path(str(extends["path"])).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        base_where = str(path)
        try:
            base_text = path.read_text(encoding="utf8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                [ConfigProblem(f"{EXTENDS}.path", f"cannot read the base config: {e}")],
                source=where,
            ) from None
        base_base_dir = path.parent
    base = parse_config(_expand(base_text, base_base_dir, base_where, depth + 1))
    changes = {k: v for k, v in config.items() if k != EXTENDS}
    return Config(_laid_over(base, changes)).to_str(interpolate=False)


_SECTION = re.compile(r"^\[([^\]\n]+)\]\s*$", re.MULTILINE)


def _with_parent_sections(text: str) -> str:
    """``text`` with empty headers for the parents of its sections: a difference may change
    ``[model.decoder.layers.layer.attention]`` alone, which confection would refuse
    without ``[model]``, ``[model.decoder]``... (empty, they change nothing)."""
    named = [m.group(1).strip() for m in _SECTION.finditer(text)]
    missing = {
        ".".join(parts[:i])
        for parts in (name.split(".") for name in named)
        for i in range(1, len(parts))
    } - set(named)
    headers = "".join(f"[{name}]\n" for name in sorted(missing, key=lambda n: n.count(".")))
    return headers + "\n" + text


def _laid_over(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and _same_promise(old, value):
            merged[key] = _laid_over(old, value)
        else:
            merged[key] = value
    return merged


def _same_promise(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether ``new`` changes settings of the same component (or of a plain section)."""
    new_promise = {k: v for k, v in new.items() if isinstance(k, str) and k.startswith("@")}
    if not new_promise:
        return True
    old_promise = {k: v for k, v in old.items() if isinstance(k, str) and k.startswith("@")}
    return new_promise == old_promise
