"""Config text parsed into values that write back out as the same text.

confection writes a literal ``$`` as ``$$`` (and leaves ``$${`` alone, the escape of a
literal ``${``), but reads ``$$`` back as it stands, so every save and load would double
the dollars of a value. Parsed here, ``$$`` that does not begin ``$${`` becomes ``$``
again: in memory a lone ``$`` is a dollar, ``${a.b}`` a variable and ``$${a.b}`` the text
``${a.b}``, and ``Config.to_str`` → ``parse_config`` is the identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from confection import Config

_ESCAPED_DOLLAR = re.compile(r"\$\$(?!\{)")


def parse_config(text: str, overrides: Mapping[str, Any] | None = None) -> Config:
    """``text`` parsed without interpolation, escaped dollars read as dollars."""
    config = Config().from_str(text, interpolate=False, overrides=dict(overrides or {}))
    return Config(_unescaped(config)) if "$$" in text else config


def _unescaped(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _unescaped(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unescaped(v) for v in node]
    if isinstance(node, str) and "$$" in node:
        return _ESCAPED_DOLLAR.sub("$", node)
    return node
