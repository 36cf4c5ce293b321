"""Typed errors. Each one says where the problem is and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class RegistryXFError(Exception):
    """Base class of every error raised on purpose by registry_xf."""


def close_names(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``name``, best first (for 'did you mean' hints).

    Case is ignored, so that ``Gelu`` finds ``GELU`` before ``ReLU``.
    """
    lowered: dict[str, str] = {}
    for c in candidates:
        lowered.setdefault(c.lower(), c)
    for cutoff in (0.5, 0.4):
        found = difflib.get_close_matches(name.lower(), lowered, n=n, cutoff=cutoff)
        if found:
            return [lowered[c] for c in found]
    return []


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = close_names(name, candidates)
    if not found:
        return ""
    return " Did you mean " + " or ".join(repr(f) for f in found) + "?"


class RegistryNameError(RegistryXFError, KeyError):
    """A name that is not registered, or registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a config: where, what was found, what was expected."""

    path: str
    message: str
    found: object = None
    has_found: bool = False

    def __str__(self) -> str:
        text = f"[{self.path}] {self.message}" if self.path else self.message
        if self.has_found:
            text += f" (found {self.found!r})"
        return text


class ConfigError(RegistryXFError, ValueError):
    """A config with one or more problems, all listed at once."""

    def __init__(self, problems: list[ConfigProblem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s) in config{where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class CheckpointError(RegistryXFError, ValueError):
    """A checkpoint file or directory that cannot be read as asked."""


class LoadError(RegistryXFError, ValueError):
    """Weights that do not fit the model: missing, unexpected or mis-shaped keys."""


class UnsupportedModelError(RegistryXFError, ValueError):
    """An HF model type or option that registry_xf does not convert."""


class InputError(RegistryXFError, ValueError):
    """Inputs to a model that it cannot take (token ids out of range, too long, ...)."""
