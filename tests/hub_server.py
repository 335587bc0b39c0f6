"""A loopback Hugging Face Hub for the tests.

Implements the part of the Hub HTTP API that huggingface_hub's ``HfApi`` (list_models, model_info,
list_repo_tree) and influence_tui.hub's own Range-based downloader use:

- ``GET /api/models`` with search/author/filter/sort/limit and cursor pagination in a ``Link`` header;
- ``GET /api/models/{id}`` and ``/api/models/{id}/revision/{rev}`` with ``sha`` and ``siblings``;
- ``GET /api/models/{id}/tree/{rev}?recursive=true`` (paginated too);
- ``HEAD/GET /{id}/resolve/{rev}/{file}`` with ``ETag``, ``X-Repo-Commit``, ``Content-Length``,
  ``Accept-Ranges`` and ``Range`` -> 206; files over ``cdn_threshold`` bytes answer 302 to a second
  "CDN" server (``X-Linked-Etag``/``X-Linked-Size``), like the real Hub's LFS files;
- 404s carry ``X-Error-Code: RepoNotFound|RevisionNotFound|EntryNotFound``; gated repos answer 401
  without a token and 403 with a token that has no access; private repos look like missing repos.

Fault injection lives in ``hub.faults`` (see :class:`Faults`); ``hub.bytes_sent[file]`` counts the
body bytes sent per file so a test can prove a resumed download did not fetch bytes twice.

Usage::

    with LoopbackHub() as hub:
        hub.add_repo("org/model", {"config.json": b"{}"})
        ... HF_ENDPOINT=hub.url ...
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

CHUNK = 16 * 1024
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".model", ".msgpack", ".h5")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as the ``oid`` of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RepoFileEntry:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        return git_blob_sha1(self.data)

    @property
    def etag(self) -> str:
        # The Hub's ETag is the sha256 for LFS files and the git blob id otherwise.
        return f'"{self.sha256 if self.lfs else self.oid}"'


@dataclass
class Repo:
    repo_id: str
    files: dict[str, RepoFileEntry]
    sha: str
    gated: bool = False
    private: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens that may read a gated/private repo
    branches: set[str] = field(default_factory=lambda: {"main"})
    downloads: int = 0
    likes: int = 0
    pipeline_tag: str | None = "text-generation"
    tags: list[str] = field(default_factory=list)
    last_modified: str = "2024-01-01T00:00:00.000Z"


@dataclass
class Faults:
    """Faults the server injects, each consumed as it fires."""

    cut_after: dict[str, int] = field(default_factory=dict)  # file -> close the socket after N body bytes (once)
    status_503: dict[str, int] = field(default_factory=dict)  # file -> answer 503 this many times
    api_503: int = 0  # answer 503 on this many /api requests
    corrupt: set[str] = field(default_factory=set)  # files whose served bytes are altered (every time)
    slow: dict[str, float] = field(default_factory=dict)  # file -> seconds to sleep after each chunk
    ignore_range: set[str] = field(default_factory=set)  # files served whole (200) even when a Range is asked


class LoopbackHub:
    """Two threaded HTTP servers on 127.0.0.1: the Hub itself and its "CDN"."""

    def __init__(self, *, page_size: int = 1000, tree_page_size: int = 1000, cdn_threshold: int = 64 * 1024) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.page_size = page_size
        self.tree_page_size = tree_page_size
        self.cdn_threshold = cdn_threshold
        self.bytes_sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        self._hub = _Server(("127.0.0.1", 0), _HubHandler, self)
        self._cdn = _Server(("127.0.0.1", 0), _CdnHandler, self)
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> LoopbackHub:
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repo store --------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        gated: bool = False,
        private: bool = False,
        tokens: set[str] | None = None,
        revision_sha: str | None = None,
        branches: set[str] | None = None,
        downloads: int = 0,
        likes: int = 0,
        pipeline_tag: str | None = "text-generation",
        tags: list[str] | None = None,
        last_modified: str = "2024-01-01T00:00:00.000Z",
    ) -> Repo:
        entries = {p: RepoFileEntry(p, d, p.endswith(LFS_SUFFIXES) or len(d) > 10 * 1024) for p, d in files.items()}
        sha = revision_sha or hashlib.sha1(repo_id.encode() + b"".join(sorted(e.oid.encode() for e in entries.values()))).hexdigest()
        auto_tags = list(tags or [])
        if any(p.endswith(".gguf") for p in files):
            auto_tags.append("gguf")
        if any(p.endswith(".safetensors") for p in files):
            auto_tags.append("safetensors")
        repo = Repo(
            repo_id, entries, sha, gated, private, set(tokens or ()), set(branches or {"main"}),
            downloads, likes, pipeline_tag, auto_tags, last_modified,
        )
        self.repos[repo_id] = repo
        return repo

    def sent(self, path: str) -> int:
        with self.lock:
            return self.bytes_sent.get(path, 0)

    def reset_counters(self) -> None:
        with self.lock:
            self.bytes_sent.clear()
            self.requests.clear()

    # -- helpers used by the handlers --------------------------------------------------------------
    def model_json(self, repo: Repo, *, full: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": repo.sha,
            "lastModified": repo.last_modified,
            "createdAt": "2023-06-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": repo.downloads,
            "likes": repo.likes,
            "pipeline_tag": repo.pipeline_tag,
            "library_name": "transformers",
            "tags": repo.tags,
        }
        if full:
            data["siblings"] = [{"rfilename": p} for p in sorted(repo.files)]
        return data

    def tree_json(self, repo: Repo) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path in sorted(repo.files):
            parts = path.split("/")[:-1]
            for i in range(len(parts)):
                folders.add("/".join(parts[: i + 1]))
        for folder in sorted(folders):
            out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
        for path in sorted(repo.files):
            e = repo.files[path]
            item: dict[str, Any] = {"type": "file", "oid": e.oid, "size": len(e.data), "path": path}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": len(e.data), "pointerSize": 134}
            out.append(item)
        return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type, hub: LoopbackHub) -> None:
        super().__init__(addr, handler)
        self.hub = hub


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def hub(self) -> LoopbackHub:
        return self.server.hub

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None, head: bool = False) -> None:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        self._send(status, json.dumps(data).encode(), h, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        h = {"X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        self._json(status, {"error": message}, h, head)

    def _serve_bytes(self, entry: RepoFileEntry, repo: Repo, head: bool, extra: dict[str, str]) -> None:
        """Send a file's body, honouring Range and the injected faults."""
        hub = self.hub
        path = entry.path
        rng = self.headers.get("Range")
        with hub.lock:
            hub.requests.append((self.command, self.path, rng))
            n503 = hub.faults.status_503.get(path, 0)
            if n503 and not head:
                hub.faults.status_503[path] = n503 - 1
        if n503 and not head:
            self._error(503, None, "Service Unavailable (injected)")
            return
        data = entry.data
        if path in hub.faults.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        total = len(data)
        start, end = 0, total - 1
        status = 200
        if rng and path not in hub.faults.ignore_range and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else 0
            end = int(b) if b else total - 1
            if start >= total:
                self._send(416, b"", {"Content-Range": f"bytes */{total}"}, head)
                return
            end = min(end, total - 1)
            status = 206
        headers = {
            "ETag": entry.etag,
            "X-Repo-Commit": repo.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(end - start + 1),
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        headers.update(extra)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        with hub.lock:
            cut = hub.faults.cut_after.pop(path, None)
        slow = hub.faults.slow.get(path, 0.0)
        pos = start
        sent = 0
        while pos <= end:
            n = min(CHUNK, end - pos + 1)
            if cut is not None and sent + n > cut:
                n = cut - sent
            try:
                if n > 0:
                    self.wfile.write(data[pos : pos + n])
                    self.wfile.flush()
            except OSError:
                return  # the client went away (killed or cancelled)
            with hub.lock:
                hub.bytes_sent[path] = hub.bytes_sent.get(path, 0) + n
            pos += n
            sent += n
            if cut is not None and sent >= cut:
                # Drop the connection abruptly, mid-body, like a network failure.
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if slow:
                time.sleep(slow)


class _HubHandler(_Base):
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _authorized(self, repo: Repo) -> tuple[bool, str | None]:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        return (token is not None and token in repo.tokens), token

    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = parts.path  # still quoted: a revision like "refs%2Fpr%2F1" is one segment
        query = parse_qs(parts.query)
        if path.startswith("/api/"):
            with self.hub.lock:
                n = self.hub.faults.api_503
                if n:
                    self.hub.faults.api_503 = n - 1
            if n:
                self._error(503, None, "Service Unavailable (injected)", head)
                return
        if path == "/api/models":
            return self._search(query, head)
        if path.startswith("/api/models/"):
            return self._api_model(path[len("/api/models/") :], query, head)
        if "/resolve/" in path:
            return self._resolve(path, head)
        self._error(404, None, "Not Found", head)

    # /api/models ---------------------------------------------------------------------------------
    def _search(self, q: dict[str, list[str]], head: bool) -> None:
        repos = [r for r in self.hub.repos.values() if not r.private]
        if "search" in q:
            s = q["search"][0].lower()
            repos = [r for r in repos if s in r.repo_id.lower()]
        if "author" in q:
            a = q["author"][0].lower()
            repos = [r for r in repos if r.repo_id.lower().startswith(a + "/")]
        for f in q.get("filter", []):
            repos = [r for r in repos if f in r.tags or f == r.pipeline_tag]
        if "pipeline_tag" in q:
            repos = [r for r in repos if r.pipeline_tag == q["pipeline_tag"][0]]
        sort = q.get("sort", ["downloads"])[0]
        key = {"likes": lambda r: r.likes, "lastModified": lambda r: r.last_modified}.get(sort, lambda r: r.downloads)
        repos.sort(key=lambda r: (key(r), r.repo_id), reverse=True)
        limit = int(q["limit"][0]) if "limit" in q else len(repos)
        cursor = int(q["cursor"][0]) if "cursor" in q else 0
        # Like the real Hub, a page holds at most `limit` (capped) items; the total honours `limit`
        # because huggingface_hub stops iterating once it has `limit` items.
        page_size = max(1, min(limit, self.hub.page_size))
        page = repos[cursor : cursor + page_size]
        headers = {}
        if cursor + page_size < len(repos):
            nq = {k: v for k, v in q.items() if k != "cursor"}
            nq["cursor"] = [str(cursor + page_size)]
            headers["Link"] = f'<{self.hub.url}/api/models?{urlencode(nq, doseq=True)}>; rel="next"'
        with self.hub.lock:
            self.hub.requests.append(("GET", self.path, None))
        self._json(200, [self.hub.model_json(r, full="siblings" in q.get("expand", []) or "full" in q) for r in page], headers, head)

    def _find_repo(self, rest: str) -> tuple[Repo | None, str]:
        # repo ids are "org/name" (two segments) or a bare "name"
        segs = rest.split("/")
        for n in (2, 1):
            rid = unquote("/".join(segs[:n]))
            if rid in self.hub.repos:
                return self.hub.repos[rid], "/".join(segs[n:])
        return None, rest

    def _check_access(self, repo: Repo | None, head: bool, files: bool) -> bool:
        """Answer the error (and return False) when the repo cannot be read by this request."""
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return False
        ok, token = self._authorized(repo)
        if repo.private and not ok:
            self._error(401, "RepoNotFound", "Repository not found", head)
            return False
        if repo.gated and files and not ok:
            if token is None:
                self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.", head)
            else:
                self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.", head)
            return False
        return True

    def _revision_ok(self, repo: Repo, rev: str, head: bool) -> bool:
        if rev in repo.branches or rev == repo.sha:
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return False

    def _api_model(self, rest: str, q: dict[str, list[str]], head: bool) -> None:
        repo, tail = self._find_repo(rest)
        if not self._check_access(repo, head, files=False):
            return
        assert repo is not None
        if tail == "":
            return self._json(200, self.hub.model_json(repo), head=head)
        if tail.startswith("revision/"):
            if not self._revision_ok(repo, unquote(tail[len("revision/") :]), head):
                return
            return self._json(200, self.hub.model_json(repo), head=head)
        if tail.startswith("tree/"):
            rev, _, sub = tail[len("tree/") :].partition("/")
            rev, sub = unquote(rev), unquote(sub)
            if not self._revision_ok(repo, rev, head):
                return
            entries = self.hub.tree_json(repo)
            recursive = q.get("recursive", ["false"])[0].lower() == "true"
            prefix = sub.rstrip("/") + "/" if sub else ""
            entries = [e for e in entries if e["path"].startswith(prefix)]
            if not recursive:
                entries = [e for e in entries if "/" not in e["path"][len(prefix) :]]
            cursor = int(q["cursor"][0]) if "cursor" in q else 0
            size = self.hub.tree_page_size
            headers = {}
            if cursor + size < len(entries):
                nq = {k: v for k, v in q.items() if k != "cursor"}
                nq["cursor"] = [str(cursor + size)]
                url = f"{self.hub.url}/api/models/{repo.repo_id}/tree/{quote(rev, safe='')}"
                if sub:
                    url += "/" + quote(sub)
                headers["Link"] = f'<{url}?{urlencode(nq, doseq=True)}>; rel="next"'
            return self._json(200, entries[cursor : cursor + size], headers, head)
        self._error(404, None, "Not Found", head)

    # /{id}/resolve/{rev}/{file} ------------------------------------------------------------------
    def _resolve(self, path: str, head: bool) -> None:
        before, _, after = path.lstrip("/").partition("/resolve/")
        repo = self.hub.repos.get(unquote(before))
        if not self._check_access(repo, head, files=True):
            return
        assert repo is not None
        rev, _, filename = after.partition("/")
        rev, filename = unquote(rev), unquote(filename)
        if not self._revision_ok(repo, rev, head):
            return
        entry = repo.files.get(filename)
        if entry is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist on \"{rev}\"", head)
            return
        if entry.lfs and len(entry.data) > self.hub.cdn_threshold:
            # Big LFS files live on the CDN: the Hub answers a redirect with the linked metadata.
            with self.hub.lock:
                self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
            location = f"{self.hub.cdn_url}/repos/{quote(repo.repo_id)}/{quote(filename)}?sig=loopback"
            self._send(302, b"", {
                "Location": location,
                "ETag": entry.etag,
                "X-Linked-Etag": entry.etag,
                "X-Linked-Size": str(len(entry.data)),
                "X-Repo-Commit": repo.sha,
            }, head)
            return
        self._serve_bytes(entry, repo, head, {})


class _CdnHandler(_Base):
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if not path.startswith("/repos/"):
            return self._send(404, b"not found", head=head)
        rest = path[len("/repos/") :]
        for n in (2, 1):
            segs = rest.split("/")
            rid, filename = "/".join(segs[:n]), "/".join(segs[n:])
            repo = self.hub.repos.get(rid)
            if repo is not None and filename in repo.files:
                return self._serve_bytes(repo.files[filename], repo, head, {})
        self._send(404, b"not found", head=head)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
