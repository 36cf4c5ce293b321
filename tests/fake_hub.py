"""A small Hugging Face Hub on loopback, for the tests of Hub ids and downloads.

It speaks the part of the Hub's HTTP API that the real ``huggingface_hub`` client uses to
download models: model info (``/api/models/ID[/revision/REV]``), the file tree
(``/api/models/ID/tree/REV``) and ``/ID/resolve/REV/FILE`` (HEAD and GET, with the commit and
ETag headers, ``X-Linked-*`` for large files as the Hub sends for LFS, and ``Range``). Errors
carry the Hub's ``X-Error-Code`` header, which the client turns into its typed errors.

Repositories are directories the tests write; each ``add`` is a new commit, and branches point
at commits. Every request is logged. A gated repository answers 401 to downloads without its
token, and a download can be broken off after some bytes, the server stopping with it.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx", ".gguf")


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated_token: str | None = None  # downloads need "Authorization: Bearer <this>"
    forbidden: bool = False  # every download answers 403 (a token without the right scope)

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass(frozen=True)
class Logged:
    method: str
    path: str  # unquoted, without the query
    status: int


class FakeHub:
    """The server; ``url`` is what ``HF_ENDPOINT`` should be set to."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        self.break_after: tuple[str, int] | None = None  # (file name, bytes sent before stopping)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()  # open keep-alive connections

    # -- repositories ------------------------------------------------------------------------

    def add(
        self,
        repo_id: str,
        directory: Path | dict[str, bytes],
        *,
        branch: str | None = "main",
        gated_token: str | None = None,
    ) -> str:
        """Commit the files of ``directory`` as a new revision of ``repo_id``; return its hash."""
        if isinstance(directory, dict):
            files = dict(directory)
        else:
            files = {
                p.relative_to(directory).as_posix(): p.read_bytes()
                for p in sorted(directory.rglob("*"))
                if p.is_file()
            }
        repo = self.repos.setdefault(repo_id, FakeRepo())
        digest = hashlib.sha1(repo_id.encode())
        digest.update(str(len(repo.commits)).encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha1(files[name]).digest())
        commit = digest.hexdigest()
        repo.commits[commit] = files
        if branch is not None:
            repo.refs[branch] = commit
        if gated_token is not None:
            repo.gated_token = gated_token
        return commit

    def requested(self, suffix: str) -> list[Logged]:
        """The logged requests whose path ends with ``suffix``."""
        with self.lock:
            return [r for r in self.log if r.path.endswith(suffix)]

    def downloads(self) -> list[str]:
        """The paths of the files whose content was asked for (GET on resolve)."""
        with self.lock:
            return [r.path for r in self.log if r.method == "GET" and "/resolve/" in r.path]

    # -- serving -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: open connections are cut and later ones refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self.lock:
            connections = list(self._connections)
        for connection in connections:  # a client's pooled connection must not outlive us
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._server is not None


_API = re.compile(r"^/api/models/(?P<rest>.+)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the hub keeps its own log

    def setup(self) -> None:
        super().setup()
        with self.fake.lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake.lock:
            self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # cut by stop()

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    # -- dispatch ----------------------------------------------------------------------------

    def _answer(self, body: bool) -> None:
        if not self.fake.running:  # stopped while this connection was open
            self.close_connection = True
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        self._logged_path = path
        api = _API.match(path)
        if api is not None:
            self._api(api["rest"], query)
        elif "/resolve/" in path:
            self._resolve(path, body)
        else:
            self._error(404, "RepoNotFound", "Not found")

    def send_response(self, code: int, message: str | None = None) -> None:
        # logged before the client can see the answer, so that a test reads a complete log
        with self.fake.lock:
            self.fake.log.append(Logged(self.command, self._logged_path, code))
        super().send_response(code, message)

    def _repo(self, text: str) -> tuple[str, FakeRepo, str] | None:
        """The repository that ``text`` starts with, and what follows it."""
        for repo_id in sorted(self.fake.repos, key=len, reverse=True):
            if text == repo_id or text.startswith(repo_id + "/"):
                return repo_id, self.fake.repos[repo_id], text[len(repo_id) :]
        return None

    def _api(self, rest: str, query: dict[str, list[str]]) -> int:
        found = self._repo(rest)
        if found is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        repo_id, repo, tail = found
        revision, tree_path, is_tree = "main", "", False
        if tail.startswith("/revision/"):
            revision = tail[len("/revision/") :]
        elif tail.startswith("/tree/"):
            is_tree = True
            revision, _, tree_path = tail[len("/tree/") :].partition("/")
        elif tail:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[commit]
        if not is_tree:
            info = {
                "id": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated_token else False,
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
            return self._json(info, commit)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        return self._json(_tree(files, tree_path, recursive), commit)

    def _resolve(self, path: str, body: bool) -> int:
        repo_path, _, tail = path.lstrip("/").partition("/resolve/")
        found = self._repo(repo_path)
        if found is None or found[2]:
            return self._error(404, "RepoNotFound", "Repository not found")
        _, repo, _ = found
        revision, _, name = tail.partition("/")
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if repo.gated_token and self.headers.get("authorization") != f"Bearer {repo.gated_token}":
            return self._error(401, "GatedRepo", "Access to this model is restricted")
        if repo.forbidden:
            return self._error(403, None, "Your token has no read access to this repository")
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", commit=commit)
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("range", ""))
        if ranged is not None and body:
            start = min(int(ranged[1]), len(data))
        status = 206 if start else 200
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        git_etag = hashlib.sha1(data).hexdigest()
        if name.endswith(LFS_SUFFIXES):
            self.send_header("ETag", f'"{git_etag}"')
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
        else:
            self.send_header("ETag", f'"{git_etag}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return status
        cut = self.fake.break_after
        if cut is not None and cut[0] == name:
            self.wfile.write(data[start : start + cut[1]])
            self.wfile.flush()
            self._hang_up()
            return status
        self.wfile.write(data[start:])
        return status

    # -- answers -----------------------------------------------------------------------------

    def _hang_up(self) -> None:
        """Close this connection half-way and stop the whole server (it 'dies')."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        threading.Thread(target=self.fake.stop, daemon=True).start()

    def _json(self, value: object, commit: str) -> int:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)
        return 200

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> int:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)
        return status


def _tree(files: dict[str, bytes], under: str, recursive: bool) -> list[dict[str, object]]:
    """The Hub's tree listing: files (LFS ones with their sha256) and folders under ``under``."""
    prefix = f"{under.strip('/')}/" if under.strip("/") else ""
    entries: dict[str, dict[str, object]] = {}
    for name, data in sorted(files.items()):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if depth == 1 or recursive:
                entries.setdefault(
                    folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder}
                )
        if len(parts) > 1 and not recursive:
            continue
        entry: dict[str, object] = {
            "type": "file",
            "oid": hashlib.sha1(data).hexdigest(),
            "size": len(data),
            "path": name,
        }
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 134,
            }
        entries[name] = entry
    return list(entries.values())
