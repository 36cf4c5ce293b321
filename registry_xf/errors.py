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


class HubError(RegistryXFError, OSError):
    """A model that could not be had from the Hugging Face Hub; the message names the repository."""

    def __init__(self, message: str, *, repo_id: str, revision: str | None = None):
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision

    def __str__(self) -> str:  # OSError would format its arguments differently
        return str(self.args[0]) if self.args else ""


class HubRepoNotFoundError(HubError):
    """No such repository on the Hub (or a private one that the token does not reach)."""


class HubRevisionNotFoundError(HubError):
    """The repository exists but has no such branch, tag or commit."""


class HubFileNotFoundError(HubError):
    """A file that loading needs is not in the repository at that revision."""


class HubAccessError(HubError):
    """A gated or private repository (HTTP 401/403): accept its terms or log in."""


class HubConnectionError(HubError):
    """The Hub could not be reached, or broke off a download."""


class HubNotCachedError(HubError):
    """Offline (HF_HUB_OFFLINE=1 or local_files_only=True) and the model is not in the cache."""


class HubNoSafetensorsError(HubError):
    """A repository whose weights are pickles (or other formats) only, never safetensors."""


class MissingExtraError(RegistryXFError, ImportError):
    """A feature whose optional dependency is not installed; the message names the extra
    (``pip install registry-xf[EXTRA]``) that brings it."""


class SaveError(RegistryXFError, OSError):
    """A save that cannot be done where it was asked (the target is not ours to replace,
    or the filesystem refuses); nothing is left behind."""


class UnsafePathError(CheckpointError):
    """A file name from untrusted data (a byte blob, an index) that would land outside the
    directory it belongs in."""


class TensorParallelError(RegistryXFError, ValueError):
    """A model that cannot be sharded over the ranks asked for (sizes that do not divide,
    ranks that disagree on the model or the device), raised on every rank alike."""
