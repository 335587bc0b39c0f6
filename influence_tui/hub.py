"""Hugging Face Hub: search, file listings, download plans and resumable downloads.

Used by the CLI (``influence search`` / ``influence download``), the app's Hub screen and the
server's ``/api/pull``. No torch here.

Search and repo listings go through ``huggingface_hub.HfApi`` with an explicit endpoint (the
library reads ``HF_ENDPOINT`` once, at import, so we never rely on its constant). File transfers
use our own Range-based downloader on httpx, because huggingface_hub 2.4 restarts a file from byte
0 when a new process retries it: each file streams into ``<name>.part``, resumes from the size on
disk, is checked (size, sha256 of LFS files, git blob id of small files) and renamed into place.
A folder being downloaded holds ``.influence-download.json`` until every file is complete, so the
library shows it as a partial download and never as a usable model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
MARKER_NAME = ".influence-download.json"
PART_SUFFIX = ".part"
CHUNK_SIZE = 256 * 1024

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Everything a safetensors model needs besides its weights; the rest of a repo (README, images,
# ONNX/Flax/TF exports, pickles, "original/" checkpoints) is left on the Hub.
MODEL_SIDE_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
})
# When the asked-for quant is missing, the first of these the repo has is taken: Q4_K_M's
# neighbours in size and quality first, then bigger (better) files, then smaller ones.
QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q4_K_L", "Q4_K_XL", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q5_K_M", "Q5_K_S",
    "Q5_0", "Q5_1", "Q6_K", "Q6_K_L", "Q8_0", "Q3_K_L", "Q3_K_M", "Q3_K_XL", "IQ3_M", "Q3_K_S",
    "IQ3_XS", "IQ3_XXS", "BF16", "F16", "Q2_K", "Q2_K_L", "IQ2_M", "IQ2_XS", "IQ2_XXS", "F32",
)
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)
_QUANT_RE = re.compile(
    r"(?:^|[._\-])((?:ud-)?(?:i?q[1-8](?:_[0-9a-z]+)*|tq[12]_0|bf16|fp16|f16|f32|mxfp4(?:_moe)?))$", re.IGNORECASE
)


class HubError(Exception):
    """A failure a user can act on; ``str(err)`` is one line meant for them."""


class DownloadCancelled(Exception):
    """The cancel event was set; files on disk stay, the next download resumes them."""


# -- data that travels -----------------------------------------------------------------------------
@dataclass
class HubModel:
    repo_id: str
    downloads: int = 0
    likes: int = 0
    last_modified: datetime | None = None
    pipeline_tag: str | None = None
    formats: set[str] = field(default_factory=set)  # subset of {"gguf", "safetensors", "pickle"}
    tags: list[str] = field(default_factory=list)
    gated: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_modified"] = self.last_modified.isoformat() if self.last_modified else None
        d["formats"] = sorted(self.formats)
        return d


@dataclass
class RepoEntry:
    path: str
    size: int
    sha256: str | None = None  # LFS files: sha256 of the content
    blob_id: str | None = None  # git object id (of the content for non-LFS files)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass
class RepoListing:
    repo_id: str
    revision: str  # what was asked for ("main", a tag, a sha)
    sha: str  # the commit it resolved to; downloads use it so every file comes from one commit
    files: list[RepoEntry]
    gated: bool = False
    endpoint: str = DEFAULT_ENDPOINT

    @property
    def quants(self) -> dict[str, list[RepoEntry]]:
        """GGUF quantizations found in the file names: "Q4_K_M" -> its file(s) (shards)."""
        out: dict[str, list[RepoEntry]] = {}
        for e in self.files:
            q = gguf_quant(e.path)
            if q:
                out.setdefault(q, []).append(e)
        return out

    def find(self, path: str) -> RepoEntry | None:
        return next((e for e in self.files if e.path == path), None)


@dataclass
class DownloadPlan:
    repo_id: str
    revision: str
    sha: str
    kind: str  # "safetensors", "gguf" or "file"
    files: list[RepoEntry]
    quant: str | None = None
    note: str | None = None  # e.g. "Q4_K_M not in repo; took Q5_K_M"

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)


@dataclass
class DownloadProgress:
    file: str
    file_bytes: int
    file_total: int
    total_bytes: int
    total_done: int
    speed_bps: float
    eta_s: float | None
    files_done: int
    files_total: int
    status: str  # "downloading", "retrying", "verifying", "file_done", "done"
    message: str | None = None


@dataclass
class RetryPolicy:
    """How the downloader retries 5xx answers, timeouts and dropped connections."""

    retries: int = 5  # consecutive attempts without progress before giving up
    backoff_s: float = 1.0  # first wait; doubles each time
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0  # connect/read timeout

    @classmethod
    def from_env(cls) -> RetryPolicy:
        # Tests (and impatient users) shorten these without code changes.
        from influence_tui.config import ConfigError, env_number

        p = cls()
        for attr, var in (("retries", "INFLUENCE_HUB_RETRIES"), ("backoff_s", "INFLUENCE_HUB_BACKOFF"),
                          ("timeout_s", "INFLUENCE_HUB_TIMEOUT")):
            try:  # the ranges and message of the start-up check (config.ENV_NUMBERS)
                value = env_number(var)
            except ConfigError as exc:
                raise HubError(str(exc)) from None
            if value is not None:
                setattr(p, attr, value)
        return p


# -- endpoint and token ----------------------------------------------------------------------------
def resolve_endpoint(mirror: str | None = None) -> str:
    """``-r``/explicit mirror > ``INFLUENCE_MIRROR`` > ``HF_ENDPOINT`` > the official Hub."""
    for candidate in (mirror, os.environ.get("INFLUENCE_MIRROR"), os.environ.get("HF_ENDPOINT")):
        if candidate and candidate.strip():
            ep = candidate.strip().rstrip("/")
            if "://" not in ep:
                ep = "https://" + ep  # "hf-mirror.com" means the https site
            parts = urlsplit(ep)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise HubError(f"invalid mirror URL {candidate!r}: expected http(s)://host")
            return ep
    return DEFAULT_ENDPOINT


def _token(token: str | None) -> str | None:
    if token:
        return token
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    try:  # a token saved by `hf auth login`
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


# -- errors ----------------------------------------------------------------------------------------
def _one_line(text: object) -> str:
    s = str(text).strip()
    return s.splitlines()[0] if s else type(text).__name__


def _unreachable(endpoint: str, exc: BaseException) -> HubError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
    return HubError(f"cannot reach {endpoint}: {reason}")


def _status_error(status: int, headers: Any, repo_id: str, revision: str | None, endpoint: str,
                  token: str | None, what: str | None = None) -> HubError:
    """One user message for an HTTP error answer from the Hub (ours or huggingface_hub's)."""
    code = headers.get("X-Error-Code") if headers is not None else None
    message = headers.get("X-Error-Message", "") if headers is not None else ""
    if code == "RevisionNotFound":
        return HubError(f"revision {revision!r} not found in {repo_id}")
    if code == "EntryNotFound":
        return HubError(f"file {what!r} not found in {repo_id} at {revision or 'main'}")
    if message == "Invalid credentials in Authorization header":
        return HubError(f"{endpoint} rejected the token (invalid credentials): check HF_TOKEN")
    if code == "GatedRepo" or status == 403:
        if token:
            return HubError(f"{repo_id} is gated and this token has no access: accept its terms at "
                            f"{endpoint}/{repo_id} with the token's account, or set HF_TOKEN to another token")
        return HubError(f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then set HF_TOKEN "
                        "to an access token")
    if code == "RepoNotFound" or status in (401, 404):
        hint = "(or this token cannot see it)" if token else "(if it is private or gated, set HF_TOKEN)"
        return HubError(f"repository {repo_id} not found on {endpoint} {hint}")
    if status == 429:
        return HubError(f"{endpoint} is rate limiting requests (429): wait a little and run again")
    if status >= 500:
        return HubError(f"{endpoint} answered {status} (server error) for {repo_id}: try again later")
    return HubError(f"{endpoint} answered {status} for {repo_id}{': ' + message if message else ''}")


def _map_hf_exception(exc: Exception, endpoint: str, repo_id: str, revision: str | None,
                      token: str | None) -> HubError:
    """Turn huggingface_hub / httpx2 exceptions into one-line HubErrors."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set: unset it to reach the Hub")
    if isinstance(exc, hf_errors.HfHubHTTPError) and getattr(exc, "response", None) is not None:
        r = exc.response
        return _status_error(r.status_code, r.headers, repo_id, revision, endpoint, token)
    if _is_transport_error(exc):
        return _unreachable(endpoint, exc)
    if isinstance(exc, hf_errors.HFValidationError):
        return HubError(f"invalid repo id {repo_id!r}: {_one_line(exc)}")
    if isinstance(exc, (ValueError, json.JSONDecodeError)):
        return HubError(f"{endpoint} sent an answer that is not the Hub API ({_one_line(exc)}); is it a Hub mirror?")
    return HubError(f"{endpoint}: {_one_line(exc)}")


def _is_transport_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    mods = {c.__module__.split(".")[0] for c in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "NetworkError"}) and bool(mods & {"httpx", "httpx2"})


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Fail fast (one TCP connect) instead of letting huggingface_hub back off for ~30 s.

    Skipped behind a proxy, where a direct connection says nothing about reachability."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except socket.gaierror as exc:
        raise HubError(f"cannot reach {endpoint}: cannot resolve {parts.hostname} ({exc.strerror})") from None
    except OSError as exc:
        raise _unreachable(endpoint, exc) from None


def _api(endpoint: str, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False, library_name="influence-tui")


# -- search ----------------------------------------------------------------------------------------
_SORTS = {"downloads": "downloads", "likes": "likes", "updated": "last_modified", "last_modified": "last_modified"}


def formats_of(names: Iterable[str], tags: Iterable[str] = ()) -> set[str]:
    out: set[str] = set()
    for n in names:
        low = n.lower()
        if low.endswith(".gguf"):
            out.add("gguf")
        elif low.endswith(".safetensors"):
            out.add("safetensors")
        elif low.endswith(PICKLE_SUFFIXES):
            out.add("pickle")
    out |= {t for t in tags if t in ("gguf", "safetensors")}
    return out


def search_models(query: str | None, limit: int = 20, author: str | None = None, filter: str | None = None,
                  sort: str = "downloads", endpoint: str | None = None, token: str | None = None) -> list[HubModel]:
    """Models whose id contains ``query``, most downloaded (or liked, or recently updated) first."""
    if sort not in _SORTS:
        raise HubError(f"unknown sort {sort!r}: use downloads, likes or updated")
    if limit < 1:
        raise HubError("--limit must be at least 1")
    ep = endpoint or resolve_endpoint()
    tok = _token(token)
    _check_reachable(ep)
    api = _api(ep, tok)
    expand = ["downloads", "likes", "lastModified", "pipeline_tag", "tags", "siblings", "gated"]
    try:
        infos = list(api.list_models(search=query or None, author=author or None, filter=filter or None,
                                     sort=_SORTS[sort], limit=limit, expand=expand))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        response = getattr(exc, "response", None)
        if getattr(response, "status_code", None) == 404:  # the search route itself is missing
            raise HubError(f"{ep} has no model search (404 on /api/models): is it a Hugging Face Hub or mirror?") from None
        raise _map_hf_exception(exc, ep, query or "search", None, tok) from None
    out = []
    for m in infos:
        names = [s.rfilename for s in (m.siblings or [])]
        out.append(HubModel(
            repo_id=m.id, downloads=m.downloads or 0, likes=m.likes or 0, last_modified=m.last_modified,
            pipeline_tag=m.pipeline_tag, formats=formats_of(names, m.tags or []), tags=list(m.tags or []),
            gated=bool(m.gated),
        ))
    return out


# -- listing and planning --------------------------------------------------------------------------
def repo_files(repo_id: str, revision: str | None = None, endpoint: str | None = None,
               token: str | None = None) -> RepoListing:
    """Every file of ``repo_id`` at ``revision`` with sizes and hashes, pinned to one commit."""
    repo_id = repo_id.strip().strip("/")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id) or ".." in repo_id:
        raise HubError(f"invalid repo id {repo_id!r}: expected ORG/NAME")
    ep = endpoint or resolve_endpoint()
    tok = _token(token)
    rev = revision or "main"
    _check_reachable(ep)
    api = _api(ep, tok)
    try:
        info = api.model_info(repo_id, revision=rev)
        sha = info.sha or rev
        tree = api.list_repo_tree(repo_id, revision=sha, recursive=True)
        files = []
        for item in tree:
            if getattr(item, "size", None) is None or not hasattr(item, "blob_id"):
                continue  # a folder
            lfs = getattr(item, "lfs", None)
            files.append(RepoEntry(item.path, int(item.size), lfs.sha256 if lfs else None,
                                   None if lfs else item.blob_id))
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _map_hf_exception(exc, ep, repo_id, rev, tok) from None
    return RepoListing(repo_id, rev, sha, files, gated=bool(info.gated), endpoint=ep)


def gguf_quant(path: str) -> str | None:
    """The quantization in a GGUF file name ("x.Q4_K_M.gguf", "x-q4_k_m-00001-of-00002.gguf")."""
    name = path.rsplit("/", 1)[-1]
    if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
        return None
    stem = _SHARD_RE.sub("", name[: -len(".gguf")])
    m = _QUANT_RE.search(stem)
    if not m:
        return None
    q = m.group(1).upper()
    return "F16" if q == "FP16" else q


def _is_safe_name(name: str) -> bool:
    return name not in ("", ".", "..") and "\\" not in name and not name.startswith(".")


def plan_download(listing: RepoListing, quant: str | None = None, file: str | None = None) -> DownloadPlan:
    """Choose the files a model needs: one GGUF quant, or the safetensors weights plus config and tokenizer."""
    base = {"repo_id": listing.repo_id, "revision": listing.revision, "sha": listing.sha}
    if quant and file:
        raise HubError("use either --quant or --file, not both")
    if file:
        entry = listing.find(file.strip("/"))
        if entry is None:
            ggufs = [e.path for e in listing.files if e.path.lower().endswith(".gguf")]
            hint = f"; GGUF files: {', '.join(ggufs)}" if ggufs else ""
            raise HubError(f"no file {file!r} in {listing.repo_id}{hint}")
        if entry.path.lower().endswith(PICKLE_SUFFIXES):
            raise HubError(f"{entry.path} is a pickle file, which can run code when loaded; Influence does not download pickles")
        return DownloadPlan(**base, kind="gguf" if entry.path.lower().endswith(".gguf") else "file",
                            files=[entry], quant=gguf_quant(entry.path))

    quants = listing.quants
    weights = [e for e in listing.files if "/" not in e.path and e.path.endswith(".safetensors")]
    if quant:
        if not quants:
            raise HubError(f"{listing.repo_id} has no GGUF files; --quant applies to GGUF repos")
        return _gguf_plan(listing, quants, quant.upper(), explicit=True)
    if weights:
        # Mistral-style repos carry both HF shards and a "consolidated" copy: take only the shards.
        if any(not e.path.startswith("consolidated") for e in weights):
            weights = [e for e in weights if not e.path.startswith("consolidated")]
        keep = {e.path for e in weights}
        side = [e for e in listing.files if "/" not in e.path
                and (e.path in MODEL_SIDE_FILES or e.path.endswith(".safetensors.index.json"))]
        files = sorted([e for e in listing.files if e.path in keep] + side, key=lambda e: (e.size, e.path))
        return DownloadPlan(**base, kind="safetensors", files=files)
    if quants:
        return _gguf_plan(listing, quants, "Q4_K_M", explicit=False)
    if any(e.path.lower().endswith(".gguf") for e in listing.files):
        names = [e.path for e in listing.files if e.path.lower().endswith(".gguf")]
        raise HubError(f"cannot tell the quantization of the GGUF files in {listing.repo_id}; "
                       f"choose one with --file: {', '.join(names)}")
    pickles = [e.path for e in listing.files if e.path.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(f"{listing.repo_id} has only pickle weights ({', '.join(pickles[:3])}), which can run code "
                       "when loaded; Influence loads safetensors or GGUF only: look for a converted copy of this model")
    raise HubError(f"{listing.repo_id} has no model weights (no .safetensors or .gguf files)")


def _gguf_plan(listing: RepoListing, quants: dict[str, list[RepoEntry]], want: str, explicit: bool) -> DownloadPlan:
    base = {"repo_id": listing.repo_id, "revision": listing.revision, "sha": listing.sha}
    available = sorted(quants, key=lambda q: (_quant_rank(q), q))
    # "Q4_K_M" also matches "UD-Q4_K_M"-style names when the plain one is absent.
    chosen = want if want in quants else next((q for q in available if q.endswith("-" + want)), None)
    note = None
    if chosen is None:
        if explicit:
            raise HubError(f"no {want} file in {listing.repo_id}; available: {', '.join(available)}")
        ranked = [q for q in available if _quant_rank(q) < len(QUANT_PREFERENCE)]
        if ranked:
            chosen = ranked[0]
        elif len(available) == 1:
            chosen = available[0]
        else:
            raise HubError(f"{listing.repo_id} has no {want}; choose one with --quant: {', '.join(available)}")
        note = f"{want} is not in {listing.repo_id}; taking {chosen} (available: {', '.join(available)})"
    files = sorted(quants[chosen], key=lambda e: e.path)
    return DownloadPlan(**base, kind="gguf", files=files, quant=chosen, note=note)


def _quant_rank(q: str) -> int:
    plain = q.split("-")[-1]
    return QUANT_PREFERENCE.index(plain) if plain in QUANT_PREFERENCE else len(QUANT_PREFERENCE)


# -- download --------------------------------------------------------------------------------------
def model_dir_name(repo_id: str) -> str:
    """The original tool's layout: "TinyLlama/TinyLlama-1.1B" -> "TinyLlama_TinyLlama-1.1B"."""
    return repo_id.strip("/").replace("/", "_")


def download_model(repo_id: str, output_dir: str | os.PathLike[str], revision: str | None = None,
                   quant: str | None = None, file: str | None = None, endpoint: str | None = None,
                   token: str | None = None, progress: Callable[[DownloadProgress], None] | None = None,
                   cancel: threading.Event | None = None, retry: RetryPolicy | None = None,
                   plan: DownloadPlan | None = None) -> Path:
    """Download what ``repo_id`` needs into ``output_dir/org_name/`` and return that folder.

    Safe to call again after any interruption: finished files are kept, ``.part`` files resume.
    Raises HubError (one-line message) or DownloadCancelled."""
    ep = endpoint or resolve_endpoint()
    tok = _token(token)
    if plan is None:
        plan = plan_download(repo_files(repo_id, revision, ep, tok), quant=quant, file=file)
    folder = Path(output_dir).expanduser() / model_dir_name(plan.repo_id)
    return _Downloader(plan, folder, ep, tok, progress, cancel, retry or RetryPolicy.from_env()).run()


class _Retry(Exception):
    """A transient failure: wait and try the same file again (from what is on disk)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class _Downloader:
    def __init__(self, plan: DownloadPlan, folder: Path, endpoint: str, token: str | None,
                 progress: Callable[[DownloadProgress], None] | None, cancel: threading.Event | None,
                 retry: RetryPolicy) -> None:
        self.plan, self.folder, self.endpoint, self.token = plan, folder, endpoint, token
        self.progress_cb, self.cancel, self.retry = progress, cancel, retry
        self.total = plan.total_bytes
        self.files_done = 0
        self.done_before = 0  # bytes of the files finished so far
        self.samples: deque[tuple[float, int]] = deque()  # (time, bytes received) for the speed
        self.received = 0
        self.last_emit = 0.0

    # names ---------------------------------------------------------------------------------------
    def dest(self, entry: RepoEntry) -> Path:
        name = entry.name
        if not _is_safe_name(name):
            raise HubError(f"refusing to write a file named {entry.path!r}")
        return self.folder / name

    def run(self) -> Path:
        names = [e.name for e in self.plan.files]
        if len(set(names)) != len(names):
            raise HubError(f"{self.plan.repo_id}: two files of this download share a name; choose one with --file")
        created = not self.folder.exists()
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            with _FolderLock(self.folder, self.plan.repo_id):
                self._run(created)
        except OSError as exc:
            raise _disk_error(exc, self.folder) from None
        self._emit("", 0, 0, "done", force=True)
        return self.folder

    def _run(self, created: bool) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_marker()
            self._check_space()
            with self._client() as client:
                for entry in self.plan.files:
                    self._file(client, entry)
                    self.files_done += 1
                    self.done_before += entry.size
            (self.folder / MARKER_NAME).unlink(missing_ok=True)
        except OSError as exc:
            self._tidy(created)
            raise _disk_error(exc, self.folder) from None
        except HubError:
            self._tidy(created)
            raise

    def _tidy(self, created: bool) -> None:
        """After a failure before any byte landed (401, no space...), leave no empty "partial" folder."""
        if not created:
            return
        try:
            entries = list(self.folder.iterdir())
            if all(p.name == MARKER_NAME or (p.name.endswith(PART_SUFFIX) and p.stat().st_size == 0) for p in entries):
                for p in entries:
                    p.unlink(missing_ok=True)
                self.folder.rmdir()
        except OSError:
            pass

    def _client(self) -> Any:
        import httpx

        headers = {"User-Agent": "influence-tui"}
        if self.token:
            # httpx drops Authorization on a redirect to another host (the CDN), as it should.
            headers["Authorization"] = f"Bearer {self.token}"
        t = self.retry.timeout_s
        return httpx.Client(headers=headers, follow_redirects=True, timeout=httpx.Timeout(t, connect=min(t, 15.0)))

    def _write_marker(self) -> None:
        marker = self.folder / MARKER_NAME
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("sha") not in (None, self.plan.sha):
            # The repo moved to another commit since the interrupted run: its partial files are stale.
            for part in self.folder.glob("*" + PART_SUFFIX):
                part.unlink(missing_ok=True)
        data = {
            "repo_id": self.plan.repo_id, "revision": self.plan.revision, "sha": self.plan.sha,
            "kind": self.plan.kind, "quant": self.plan.quant, "endpoint": self.endpoint,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": [{"path": e.path, "name": e.name, "size": e.size, "sha256": e.sha256} for e in self.plan.files],
        }
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, marker)

    def _check_space(self) -> None:
        need = 0
        for e in self.plan.files:
            d = self.dest(e)
            if d.exists() and d.stat().st_size == e.size:
                continue
            part = d.with_name(d.name + PART_SUFFIX)
            need += e.size - (part.stat().st_size if part.exists() else 0)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise HubError(f"not enough disk space in {self.folder}: need {_human(need)}, {_human(free)} free")

    # one file ------------------------------------------------------------------------------------
    def _file(self, client: Any, entry: RepoEntry) -> None:
        dest = self.dest(entry)
        part = dest.with_name(dest.name + PART_SUFFIX)
        if dest.exists() and dest.stat().st_size == entry.size and not part.exists():
            self._emit(entry.name, entry.size, entry.size, "file_done", force=True)
            return  # finished (and verified) by an earlier run
        url = f"{self.endpoint}/{self.plan.repo_id}/resolve/{quote(self.plan.sha, safe='')}/{quote(entry.path)}"
        hasher: _Hasher | None = None
        failures = 0
        while True:
            self._check_cancel()
            if not part.exists():
                part.touch()  # so an empty file, or a 416 answer, still leaves a .part to verify
            have = part.stat().st_size
            if have > entry.size:
                part.unlink()
                have = 0
            if hasher is None or hasher.length != have:
                hasher = _Hasher.of_prefix(entry, part, have)
            try:
                if have < entry.size:
                    got = self._fetch(client, url, entry, part, have, hasher)
                    if got:
                        failures = 0
                if part.stat().st_size < entry.size:
                    raise _Retry("connection closed before the end of the file")
                break
            except _Retry as exc:
                if part.exists() and part.stat().st_size > have:
                    failures = 0  # bytes arrived before the trouble: a slow link, not a dead one
                failures += 1
                if failures > self.retry.retries:
                    if exc.unreachable:
                        raise HubError(f"cannot reach {self.endpoint}: {exc}") from None
                    raise HubError(f"download of {entry.path} failed after {self.retry.retries} retries: {exc}; "
                                   "run the same command again to resume") from None
                wait = min(self.retry.max_backoff_s, self.retry.backoff_s * 2 ** (failures - 1))
                self._emit(entry.name, part.stat().st_size if part.exists() else 0, entry.size, "retrying",
                           force=True, message=f"{exc}; retrying in {wait:.1f}s")
                self._sleep(wait)
        self._emit(entry.name, entry.size, entry.size, "verifying", force=True)
        self._verify(entry, part, hasher)
        os.replace(part, dest)
        self._emit(entry.name, entry.size, entry.size, "file_done", force=True)

    def _fetch(self, client: Any, url: str, entry: RepoEntry, part: Path, have: int, hasher: _Hasher) -> int:
        """One GET from byte ``have``; returns the bytes received. Raises _Retry on transient trouble."""
        import httpx

        headers = {"Range": f"bytes={have}-"} if have else {}
        received = 0
        try:
            with client.stream("GET", url, headers=headers) as r:
                if r.status_code == 416 and have:
                    # The server says we asked past the end: our .part is not what it serves; restart.
                    part.unlink(missing_ok=True)
                    raise _Retry("the server refused the resume range")
                if r.status_code in (408, 429) or r.status_code >= 500:
                    raise _Retry(f"{r.status_code} from {urlsplit(str(r.url)).netloc}")
                if r.status_code >= 400:
                    raise _status_error(r.status_code, r.headers, self.plan.repo_id, self.plan.revision,
                                        self.endpoint, self.token, entry.path)
                start = _range_start(r.headers.get("Content-Range")) if r.status_code == 206 else 0
                if start != have:
                    # A 200 (range ignored) or a range we did not ask for: start the file over.
                    have, start = 0, 0
                    hasher.reset()
                mode = "ab" if have else "wb"
                with open(part, mode) as f:
                    f.truncate(have)
                    pos = have
                    for chunk in r.iter_bytes():  # as they arrive: a buffered chunk would be lost on a cut
                        self._check_cancel()
                        f.write(chunk)
                        hasher.update(chunk)
                        received += len(chunk)
                        pos += len(chunk)
                        self._count(len(chunk))
                        self._emit(entry.name, pos, entry.size, "downloading")
        except httpx.TransportError as exc:
            raise _Retry(_one_line(exc) or type(exc).__name__, unreachable=isinstance(exc, httpx.ConnectError)) from None
        return received

    def _verify(self, entry: RepoEntry, part: Path, hasher: _Hasher) -> None:
        size = part.stat().st_size
        if size != entry.size:
            part.unlink(missing_ok=True)
            raise HubError(f"{entry.path}: got {size} bytes, expected {entry.size}; the partial file was removed, "
                           "run again")
        expected, got, kind = hasher.check(entry)
        if expected and got != expected:
            part.unlink(missing_ok=True)
            raise HubError(f"{entry.path}: {kind} mismatch (expected {expected[:12]}…, got {got[:12]}…); "
                           "the corrupt file was removed, run again")

    # progress, cancel ----------------------------------------------------------------------------
    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadCancelled("download cancelled")

    def _sleep(self, seconds: float) -> None:
        if self.cancel is not None:
            if self.cancel.wait(seconds):
                raise DownloadCancelled("download cancelled")
        else:
            time.sleep(seconds)

    def _count(self, n: int) -> None:
        self.received += n
        now = time.monotonic()
        self.samples.append((now, self.received))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.popleft()

    def _speed(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def _emit(self, name: str, file_bytes: int, file_total: int, status: str, force: bool = False,
              message: str | None = None) -> None:
        if self.progress_cb is None:
            return
        now = time.monotonic()
        if not force and now - self.last_emit < 0.1:
            return  # at most ten updates a second: enough for a bar, cheap for the UI thread
        self.last_emit = now
        done_total = self.total if status == "done" else self.done_before + (
            file_bytes if status != "file_done" else file_total)
        speed = self._speed()
        eta = (self.total - done_total) / speed if speed > 0 else None
        files_done = self.files_done + (1 if status == "file_done" else 0)
        self.progress_cb(DownloadProgress(
            file=name, file_bytes=file_bytes, file_total=file_total, total_bytes=self.total,
            total_done=done_total, speed_bps=speed, eta_s=eta, files_done=files_done,
            files_total=len(self.plan.files), status=status, message=message,
        ))


class _FolderLock:
    """One download per model folder at a time (the app, the server and the CLI may all try):
    an exclusive flock on a hidden file next to the folder, which the library does not list."""

    def __init__(self, folder: Path, repo_id: str) -> None:
        self.path = folder.parent / f".{folder.name}.lock"
        self.folder, self.repo_id = folder, repo_id
        self.fd: int | None = None

    def __enter__(self) -> _FolderLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent downloads are the user's call
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise HubError(f"{self.repo_id} is already being downloaded into {self.folder}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import fcntl

            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class _Hasher:
    """sha256 of LFS files; the git blob id (sha1 of "blob <size>\\0" + content) of the others."""

    def __init__(self, entry: RepoEntry) -> None:
        self.entry = entry
        self.reset()

    def reset(self) -> None:
        self.length = 0
        if self.entry.sha256:
            self.h = hashlib.sha256()
        else:
            self.h = hashlib.sha1(b"blob %d\0" % self.entry.size)

    def update(self, data: bytes) -> None:
        self.h.update(data)
        self.length += len(data)

    @classmethod
    def of_prefix(cls, entry: RepoEntry, part: Path, length: int) -> _Hasher:
        """Hash the bytes a previous run left in ``part`` so the check covers the whole file."""
        h = cls(entry)
        if length:
            with open(part, "rb") as f:
                left = length
                while left:
                    buf = f.read(min(CHUNK_SIZE * 4, left))
                    if not buf:
                        break
                    h.update(buf)
                    left -= len(buf)
        return h

    def check(self, entry: RepoEntry) -> tuple[str | None, str, str]:
        if entry.sha256:
            return entry.sha256.lower(), self.h.hexdigest(), "sha256"
        if entry.blob_id and re.fullmatch(r"[0-9a-f]{40}", entry.blob_id):
            return entry.blob_id, self.h.hexdigest(), "checksum"
        return None, "", ""


def _range_start(content_range: str | None) -> int:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range or "")
    return int(m.group(1)) if m else -1


def _disk_error(exc: OSError, folder: Path) -> HubError:
    if exc.errno == errno.ENOSPC:
        return HubError(f"disk full while writing to {folder}: free some space and run the same command again to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return HubError(f"cannot write to {folder}: {exc.strerror}")
    return HubError(f"cannot write to {folder}: {_one_line(exc)}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def is_partial_download(folder: str | os.PathLike[str]) -> bool:
    """True while ``folder`` holds an unfinished download (the library's "partial download")."""
    return (Path(folder) / MARKER_NAME).exists()
