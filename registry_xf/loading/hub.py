"""Models from the Hugging Face Hub: ids, the shared cache, downloads of only what loading reads.

Everything goes through the ``huggingface_hub`` client into the standard cache (``HF_HUB_CACHE``,
else ``HF_HOME/hub``), so a model that transformers or sentence-transformers downloaded is reused,
and the other way round. Only the files that registry_xf reads are fetched: never pickles
(``*.bin``, ``*.pt``) or weights in other formats (``*.h5``, ``*.msgpack``, ``*.onnx``, ``*.gguf``).

The environment is read at each call, not at import: ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``,
``HF_HUB_CACHE``/``HF_HOME``; ``HF_TOKEN`` and a saved login are read by the client itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import (
    HubAccessError,
    HubConnectionError,
    HubError,
    HubFileNotFoundError,
    HubNoSafetensorsError,
    HubNotCachedError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    RegistryXFError,
)
from ..tokenizers.hf_tokenizer import TOKENIZER_FILES
from .checkpoint import INDEX_NAME, SINGLE_NAME
from .integrity import HASHES_KEY

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
CONFIG_FILE = "config.json"
# Read when present: generation settings, and sentence-transformers' modules and settings
# (pooling is found through modules.json; prompts live in config_sentence_transformers.json).
OPTIONAL_FILES = (
    *TOKENIZER_FILES,
    "generation_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# A model written by registry_xf's save (its config first), read instead of config.json.
SAVED_FILES = ("config.cfg", "meta.json")
# Weights in formats that are never read; pickles among them are never even downloaded.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
# The index and modules.json are read before the weights; a bigger one is not what it claims.
MAX_METADATA_BYTES = 64 * 1024 * 1024

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Spellings that are surely meant as files, not as Hub repositories.
_FILE_SUFFIXES = (".cfg", ".json", ".safetensors", *OTHER_WEIGHT_SUFFIXES)


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` is spelled as a Hub id: ``org/name`` or ``name``, optionally ``@revision``.

    A local path of the same spelling wins: callers look for the path (and an installed
    package) first and take ``text`` as a Hub id only when neither exists. Spellings that can
    only be paths (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.cfg``) never look like ids.
    """
    repo_id, _, revision = str(text).partition("@")
    if "@" in str(text) and not revision.strip():
        return False
    if revision and (revision != revision.strip() or ".." in revision):
        return False
    return (
        _REPO_ID.fullmatch(repo_id) is not None
        and len(repo_id) <= 96
        and ".." not in repo_id
        and "--" not in repo_id
        and not repo_id.lower().endswith(_FILE_SUFFIXES)
    )


def split_revision(source: str, revision: str | None = None) -> tuple[str, str]:
    """``org/name@rev`` as ``("org/name", "rev")``; ``revision`` may say the same, not otherwise."""
    if not looks_like_repo_id(source):
        raise HubError(
            f"{source!r} is not a Hub id (expected ORG/NAME or NAME, optionally @REVISION)",
            repo_id=str(source),
            revision=revision,
        )
    repo_id, _, spelled = source.partition("@")
    if spelled and revision and spelled != revision:
        raise HubError(
            f"{source}: two revisions given ({spelled!r} in the id and revision={revision!r})",
            repo_id=repo_id,
            revision=revision,
        )
    return repo_id, spelled or revision or DEFAULT_REVISION


def cache_dir() -> Path:
    """The Hub cache shared with transformers and sentence-transformers, read from the
    environment now (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` as set now, else the client's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline(local_files_only: bool | None = None) -> bool:
    """Offline when asked, when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now, or
    when the client was imported offline (it then refuses every request itself)."""
    if local_files_only is not None:
        return local_files_only or _client_offline()
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(_true(flag) for flag in flags) or _client_offline()


def _true(flag: str | None) -> bool:
    return flag is not None and flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _client_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


@dataclass(frozen=True)
class HubFile:
    """One file that a fetch reads: its name in the repository, its size, whether it is cached."""

    name: str
    size: int
    cached: bool


@dataclass(frozen=True)
class FetchPlan:
    """What ``download`` fetches for one repository at one commit."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[HubFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """What is not yet in the cache, and so would be downloaded."""
        return sum(f.size for f in self.files if not f.cached)


def fetch_command(repo_id: str, revision: str) -> str:
    suffix = "" if revision == DEFAULT_REVISION else f" --revision {revision}"
    return f"registry-xf fetch {repo_id}{suffix}"


def download(
    source: str,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> Path:
    """The snapshot directory of ``source`` (``org/name[@rev]``) in the Hub cache, downloading
    the files loading reads that are not cached yet.

    Offline, only the cache is read and nothing is asked of the network. When the Hub cannot
    be reached, a complete cached snapshot of the revision is used (with a warning). Each file
    is written under a temporary name and renamed when whole, and the revision's ref is
    written last, so an interrupted download leaves nothing that loading accepts.
    """
    repo_id, revision = split_revision(source, revision)
    if is_offline(local_files_only):
        return cached_snapshot(repo_id, revision)
    if _COMMIT.fullmatch(revision):  # a commit never changes: a complete snapshot is final
        try:
            return cached_snapshot(repo_id, revision)
        except HubNotCachedError:
            pass
    session = _Session(repo_id, revision, token, progress)
    try:
        commit, listing = session.listing()
    except HubConnectionError as e:
        try:
            snapshot = cached_snapshot(repo_id, revision)
        except HubNotCachedError:
            raise e from None
        logger.warning("%s; using the cached %s", e, snapshot)
        return snapshot
    files = _plan_files(session, commit, listing, read=session.read_downloaded)
    for name in files:
        session.download(commit, name)
    snapshot = _snapshot_dir(repo_id, commit)
    if revision != commit:
        _write_ref(repo_id, revision, commit)
    logger.info("%s@%s: %d files in %s", repo_id, revision, len(files), snapshot)
    return snapshot


def plan(
    source: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> FetchPlan:
    """What ``download`` would fetch (files, sizes, which are cached), without writing anything.

    The shard index and modules.json are read (from the cache, else into memory) because they
    name the shards and the pooling settings.
    """
    repo_id, revision = split_revision(source, revision)
    if is_offline(None):
        raise HubNotCachedError(
            f"{repo_id}@{revision}: offline (HF_HUB_OFFLINE is set); a dry run asks the Hub "
            "what a fetch would download",
            repo_id=repo_id,
            revision=revision,
        )
    session = _Session(repo_id, revision, token, progress=False)
    commit, listing = session.listing()
    names = _plan_files(session, commit, listing, read=session.read_without_caching)
    snapshot = _snapshot_dir(repo_id, commit)
    files = tuple(HubFile(name, listing[name], (snapshot / name).is_file()) for name in names)
    return FetchPlan(repo_id, revision, commit, files)


def cached_snapshot(repo_id: str, revision: str = DEFAULT_REVISION) -> Path:
    """The cached snapshot of ``repo_id`` at ``revision``, if it holds what loading reads."""
    storage = _storage_dir(repo_id)
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(storage, revision)
    snapshot = storage / "snapshots" / commit if commit else None
    missing = _missing_files(snapshot) if snapshot is not None else ["the revision"]
    if missing:
        what = (
            f"{', '.join(missing)} not cached" if snapshot and snapshot.is_dir() else "not cached"
        )
        raise HubNotCachedError(
            f"{repo_id}@{revision}: {what} in {cache_dir()}, and offline "
            f"(HF_HUB_OFFLINE or local_files_only): download it first with "
            f"`{fetch_command(repo_id, revision)}`",
            repo_id=repo_id,
            revision=revision,
        )
    assert snapshot is not None
    return snapshot


def _missing_files(snapshot: Path) -> list[str]:
    """The files loading needs that a cached snapshot lacks (empty when it is complete)."""
    if not snapshot.is_dir():
        return ["the snapshot"]
    has_config = (snapshot / CONFIG_FILE).is_file() or (snapshot / SAVED_FILES[0]).is_file()
    missing = [] if has_config else [CONFIG_FILE]
    # a corrupt index or modules.json counts as present: loading says what is wrong with it
    if not (snapshot / SINGLE_NAME).is_file():
        if not (snapshot / INDEX_NAME).is_file():
            missing.append(SINGLE_NAME)
        else:
            try:
                index = json.loads((snapshot / INDEX_NAME).read_text(encoding="utf8"))
                missing += [s for s in _shards(index) if not (snapshot / s).is_file()]
            except ValueError:
                pass
    if (snapshot / "modules.json").is_file():
        try:
            modules = json.loads((snapshot / "modules.json").read_text(encoding="utf8"))
        except ValueError:
            modules = None
        missing += [p for p in _pooling_configs(modules) if not (snapshot / p).is_file()]
    return missing


def _plan_files(
    session: _Session,
    commit: str,
    listing: dict[str, int],
    *,
    read: Callable[[str, str, int], Any],
) -> list[str]:
    """The files to fetch, small ones first, decided from the listing before any weights."""
    repo = f"{session.repo_id}@{session.revision}"
    config = SAVED_FILES[0] if SAVED_FILES[0] in listing else CONFIG_FILE
    if config not in listing:
        raise HubFileNotFoundError(
            f"{repo}: no {CONFIG_FILE} (HF) or {SAVED_FILES[0]} (registry_xf) in the "
            "repository (not a transformers model?)",
            repo_id=session.repo_id,
            revision=session.revision,
        )
    if SINGLE_NAME in listing:
        weights = [SINGLE_NAME]
    elif INDEX_NAME in listing:
        try:
            shards = _shards(read(commit, INDEX_NAME, listing[INDEX_NAME]))
        except ValueError as e:
            raise HubFileNotFoundError(
                f"{repo}: {INDEX_NAME}: {e}", repo_id=session.repo_id, revision=session.revision
            ) from None
        weights = [INDEX_NAME, *shards]
        absent = [s for s in weights if s not in listing]
        if absent:
            raise HubFileNotFoundError(
                f"{repo}: {INDEX_NAME} names {', '.join(absent)}, not in the repository",
                repo_id=session.repo_id,
                revision=session.revision,
            )
    else:
        others = sorted(n for n in listing if n.lower().endswith(OTHER_WEIGHT_SUFFIXES))
        if others:
            raise HubNoSafetensorsError(
                f"{repo}: weights only as {', '.join(others)}; registry_xf reads safetensors "
                f"only and never unpickles (nothing was downloaded). Convert the weights to "
                f"{SINGLE_NAME} first",
                repo_id=session.repo_id,
                revision=session.revision,
            )
        raise HubFileNotFoundError(
            f"{repo}: no {SINGLE_NAME} or {INDEX_NAME} in the repository",
            repo_id=session.repo_id,
            revision=session.revision,
        )
    extra = SAVED_FILES if config in SAVED_FILES else ()
    small = [config, *(n for n in (*extra, *OPTIONAL_FILES) if n in listing)]
    if config in SAVED_FILES and SAVED_FILES[1] in listing:
        # every file whose hash save recorded (config.json and sentence-transformers'
        # module files beside a saved model's own), so that verify=True finds them all
        meta = read(commit, SAVED_FILES[1], listing[SAVED_FILES[1]])
        small += [n for n in _recorded_files(meta) if n in listing and n not in weights]
    if "modules.json" in listing:
        modules = read(commit, "modules.json", listing["modules.json"])
        small += [p for p in _pooling_configs(modules) if p in listing]
    return [*dict.fromkeys(small), *weights]


def _shards(index: Any) -> list[str]:
    """The shard files a safetensors index names (ValueError for a name that is not a plain
    relative .safetensors path: such an index would be refused on loading anyway)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError("not a shard index (no weight_map)")
    shards = []
    for name in dict.fromkeys(str(v) for v in weight_map.values()):
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or not name.endswith(".safetensors"):
            raise ValueError(f"shard {name!r} is not a .safetensors file inside the repository")
        shards.append(name)
    return shards


def _recorded_files(meta: Any) -> list[str]:
    """The relative file names whose sha256 a saved model's meta.json records (names that
    would leave the repository are left out: verifying refuses them anyway)."""
    hashes = meta.get(HASHES_KEY) if isinstance(meta, dict) else None
    if not isinstance(hashes, dict):
        return []
    names = []
    for name in map(str, hashes):
        if not name.startswith("/") and ".." not in PurePosixPath(name).parts:
            names.append(name)
    return names


def _pooling_configs(modules: Any) -> list[str]:
    """The config files of the pooling modules that sentence-transformers' modules.json names."""
    if not isinstance(modules, list):
        return []
    paths = []
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            path = str(module.get("path", "")).strip("/")
            if ".." not in PurePosixPath(path).parts:
                paths.append(f"{path}/config.json" if path else "config.json")
    return paths


def _storage_dir(repo_id: str) -> Path:
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _snapshot_dir(repo_id: str, commit: str) -> Path:
    return _storage_dir(repo_id) / "snapshots" / commit


def _read_ref(storage: Path, revision: str) -> str | None:
    ref = storage / "refs" / revision
    if not ref.is_file():
        return None
    commit = ref.read_text(encoding="utf8").strip()
    return commit if _COMMIT.fullmatch(commit) else None


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    """Point ``refs/<revision>`` at ``commit`` (the cache layout the HF libraries share)."""
    ref = _storage_dir(repo_id) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text(encoding="utf8").strip() == commit:
        return
    fd, tmp = tempfile.mkstemp(dir=ref.parent, prefix=f".{ref.name}.")
    with os.fdopen(fd, "w", encoding="utf8") as f:
        f.write(commit)
    os.replace(tmp, ref)


class _Session:
    """One repository at one revision, asked through the huggingface_hub client."""

    def __init__(self, repo_id: str, revision: str, token: str | bool | None, progress: bool):
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.endpoint = endpoint()
        self.cache = cache_dir()
        self.tqdm_class = None if progress else _quiet_tqdm()

    def listing(self) -> tuple[str, dict[str, int]]:
        """The commit that the revision names now, and its files with their sizes."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint, token=self.token)
        with self.translated():
            commit = api.model_info(self.repo_id, revision=self.revision).sha
            if commit is None:
                raise HubConnectionError(
                    f"{self.repo_id}@{self.revision}: the Hub at {self.endpoint} named no commit",
                    repo_id=self.repo_id,
                    revision=self.revision,
                )
            tree = api.list_repo_tree(self.repo_id, revision=commit, recursive=True)
            listing = {f.path: int(f.size) for f in tree if isinstance(f, RepoFile)}
        return commit, listing

    def download(self, commit: str, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        with self.translated(name):
            return Path(
                hf_hub_download(
                    self.repo_id,
                    name,
                    revision=commit,
                    cache_dir=self.cache,
                    token=self.token,
                    endpoint=self.endpoint,
                    tqdm_class=self.tqdm_class,
                )
            )

    def read_downloaded(self, commit: str, name: str, size: int) -> Any:
        _check_metadata_size(self, name, size)
        return _parse_json(self, name, self.download(commit, name).read_bytes())

    def read_without_caching(self, commit: str, name: str, size: int) -> Any:
        """A small JSON file, from the cache if there, else fetched into memory only."""
        cached = _snapshot_dir(self.repo_id, commit) / name
        if cached.is_file():
            return _parse_json(self, name, cached.read_bytes())
        _check_metadata_size(self, name, size)
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, name, revision=commit, endpoint=self.endpoint)
        with self.translated(name):
            response = get_session().get(
                url, headers=build_hf_headers(token=self.token), follow_redirects=True
            )
            hf_raise_for_status(response)
        return _parse_json(self, name, response.content)

    @contextmanager
    def translated(self, name: str | None = None) -> Iterator[None]:
        """The client's errors as registry_xf's, naming the repository, revision and file."""
        try:
            yield
        except RegistryXFError:
            raise
        except Exception as e:
            error = _translate(e, self.repo_id, self.revision, name, self.endpoint)
            if error is None:
                raise
            raise error from e


def _check_metadata_size(session: _Session, name: str, size: int) -> None:
    if size > MAX_METADATA_BYTES:
        raise HubError(
            f"{session.repo_id}@{session.revision}: {name} is {size} bytes, more than a "
            f"metadata file has ({MAX_METADATA_BYTES} at most); refused",
            repo_id=session.repo_id,
            revision=session.revision,
        )


def _parse_json(session: _Session, name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise HubFileNotFoundError(
            f"{session.repo_id}@{session.revision}: {name} is not valid JSON ({e})",
            repo_id=session.repo_id,
            revision=session.revision,
        ) from None


def _translate(
    error: Exception, repo_id: str, revision: str, name: str | None, where: str
) -> HubError | None:
    """The registry_xf error for an error of the huggingface_hub client (None: not the Hub's)."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(error, hf.LocalEntryNotFoundError) and isinstance(error.__cause__, Exception):
        # the client hides why it could not ask the Hub (and found nothing cached) behind this
        return _translate(error.__cause__, repo_id, revision, name, where)
    repo = f"{repo_id}@{revision}"
    file = f": {name}" if name else ""
    login = "log in with `hf auth login` or set HF_TOKEN"
    status = getattr(getattr(error, "response", None), "status_code", None)
    kind: type[HubError]
    if isinstance(error, hf.GatedRepoError):
        kind = HubAccessError
        text = f"{repo}{file}: a gated repository; accept its conditions on the Hub, then {login}"
    elif isinstance(error, hf.RepositoryNotFoundError):
        kind = HubRepoNotFoundError
        text = f"{repo_id}: no such repository on {where} (if it is private, {login})"
    elif isinstance(error, hf.RevisionNotFoundError):
        kind = HubRevisionNotFoundError
        text = f"{repo_id}: no revision {revision!r} (branch, tag or commit) on {where}"
    elif isinstance(error, hf.RemoteEntryNotFoundError):
        kind = HubFileNotFoundError
        text = f"{repo}{file}: no such file in the repository"
    elif isinstance(error, hf.OfflineModeIsEnabled):
        kind = HubNotCachedError
        text = (
            f"{repo}{file}: not cached, and huggingface_hub is offline (HF_HUB_OFFLINE was set "
            f"when it was imported): download it first with `{fetch_command(repo_id, revision)}`"
        )
    elif isinstance(error, hf.HfHubHTTPError) and status in (401, 403):
        kind = HubAccessError
        text = f"{repo}{file}: access refused (HTTP {status}); {login}"
    elif isinstance(error, (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, httpx2.HTTPError)):
        kind = HubConnectionError
        cause = error.__cause__ or error
        said = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        text = f"{repo}{file}: the Hub at {where} could not be reached or broke off ({said})"
    elif isinstance(error, OSError) and "Consistency check failed" in str(error):
        kind = HubConnectionError
        text = f"{repo}{file}: the download broke off ({str(error).splitlines()[0]}); try again"
    else:
        return None
    return kind(text, repo_id=repo_id, revision=revision)


def _quiet_tqdm() -> type:
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


def fetch(
    source: str,
    revision: str | None = None,
    *,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> Path:
    """Download what ``load`` reads of a Hub model, without loading it; return where it is.

    ``source`` is ``org/name`` or ``org/name@revision`` (a branch, tag or commit); nothing is
    built and no tensor allocated. The model then loads offline (``HF_HUB_OFFLINE=1``).
    """
    return download(
        source,
        revision=revision,
        local_files_only=local_files_only,
        token=token,
        progress=progress,
    )


def human_size(n: int) -> str:
    """Bytes as the Hub shows them (powers of 1000)."""
    size = float(n)
    unit = "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{n} B" if unit == "B" else f"{size:.2f} {unit}"
