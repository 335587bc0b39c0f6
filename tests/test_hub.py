"""Hub search and download against the loopback Hub (tests/hub_server.py): real huggingface_hub
client, real HTTP, real files, real resume."""

from __future__ import annotations

import os
import sys

# huggingface_hub reads HF_ENDPOINT once, at import: start the loopback Hub and point it there
# before the first import, so that its constant can never name the real Hub. hub.py itself passes
# the endpoint explicitly on every call, and the `hub` fixture sets HF_ENDPOINT per test; the
# variable is put back at once so the other test modules do not see it.
from tests.hub_server import CHUNK, Faults, LoopbackHub

_HUB = LoopbackHub(page_size=2, cdn_threshold=32 * 1024).start()
if "huggingface_hub" not in sys.modules:
    _saved = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = _HUB.url
    import huggingface_hub  # noqa: F401

    if _saved is None:
        del os.environ["HF_ENDPOINT"]
    else:
        os.environ["HF_ENDPOINT"] = _saved

import hashlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from influence_tui import hub as hubmod
from influence_tui.hub import (
    MARKER_NAME,
    DownloadCancelled,
    DownloadProgress,
    HubError,
    RepoEntry,
    RepoListing,
    RetryPolicy,
    download_model,
    gguf_quant,
    plan_download,
    repo_files,
    resolve_endpoint,
    search_models,
)

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryPolicy(retries=3, backoff_s=0.01, timeout_s=5)

try:  # real tiny models when the fixtures module is there; random bytes otherwise
    from tests.tiny_models import write_tiny_gguf, write_tiny_llama_safetensors
except ImportError:  # pragma: no cover - depends on another module's progress
    write_tiny_gguf = write_tiny_llama_safetensors = None  # type: ignore[assignment]


@pytest.fixture(scope="module", autouse=True)
def _loopback_module():
    yield
    _HUB.stop()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> LoopbackHub:
    """The loopback Hub, emptied, with no faults, and the only endpoint this test can see."""
    _HUB.repos.clear()
    _HUB.faults = Faults()
    _HUB.page_size = 2
    _HUB.reset_counters()
    monkeypatch.setenv("HF_ENDPOINT", _HUB.url)
    for var in ("INFLUENCE_MIRROR", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr(hubmod, "_token", lambda token: token or os.environ.get("HF_TOKEN"))  # ignore ~/.cache tokens
    return _HUB


# -- model files -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a tiny random Llama in safetensors (written once: it needs torch)."""
    if write_tiny_llama_safetensors is None:
        return {}
    d = write_tiny_llama_safetensors(tmp_path_factory.mktemp("tiny-llama"))
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def safetensors_repo(tiny: dict[str, bytes]) -> dict[str, bytes]:
    """A small Llama in safetensors plus the clutter a real repo has (README, pickles, ONNX)."""
    files: dict[str, bytes] = dict(tiny)
    if not files:
        files = {"config.json": json.dumps({"model_type": "llama"}).encode(), "tokenizer.json": b"{}",
                 "tokenizer_config.json": b"{}", "model.safetensors": os.urandom(120_000)}
    files.setdefault("generation_config.json", b'{"do_sample": false}')
    files.update({"README.md": b"# tiny", "pytorch_model.bin": os.urandom(4000), ".gitattributes": b"*.bin lfs",
                  "onnx/model.onnx": os.urandom(3000)})
    return files


def gguf_bytes(tmp_path: Path, qtype: str, size: int = 80_000) -> bytes:
    if write_tiny_gguf is not None and qtype in ("Q8_0", "F16", "F32", "Q4_0"):
        return Path(write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype)).read_bytes()
    return b"GGUF" + os.urandom(size)


def settled(hub: LoopbackHub, name: str) -> int:
    """The server's byte count for ``name`` once its handler noticed the client went away."""
    last = -1
    while (now := hub.sent(name)) != last:
        last = now
        time.sleep(0.15)
    return now


def big(n: int = 300_000, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


# -- endpoint --------------------------------------------------------------------------------------
def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("INFLUENCE_MIRROR", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://hf-endpoint.example/")
    assert resolve_endpoint() == "http://hf-endpoint.example"
    monkeypatch.setenv("INFLUENCE_MIRROR", "hf-mirror.com")
    assert resolve_endpoint() == "https://hf-mirror.com"
    assert resolve_endpoint("http://127.0.0.1:9999") == "http://127.0.0.1:9999"
    with pytest.raises(HubError, match="invalid mirror"):
        resolve_endpoint("ftp://x")


# -- search ----------------------------------------------------------------------------------------
def test_search_pages_sorts_and_filters(hub: LoopbackHub) -> None:
    for i in range(5):
        hub.add_repo(f"org{i % 2}/llama-{i}", {"model.safetensors": b"x", "config.json": b"{}"},
                     downloads=100 * i, likes=10 - i, last_modified=f"2024-0{i + 1}-01T00:00:00.000Z")
    hub.add_repo("bart/llama-9-GGUF", {"llama.Q4_K_M.gguf": b"x"}, downloads=50)
    hub.add_repo("other/bert", {"pytorch_model.bin": b"x"}, downloads=10_000, pipeline_tag="fill-mask")

    models = search_models("llama", limit=5)
    assert [m.repo_id for m in models] == ["org0/llama-4", "org1/llama-3", "org0/llama-2", "org1/llama-1", "bart/llama-9-GGUF"]
    pages = [p for (_, p, _) in hub.requests if p.startswith("/api/models?")]
    assert len(pages) == 3 and "cursor=" in pages[1]  # page_size 2: the client followed the Link header
    assert models[0].formats == {"safetensors"} and models[-1].formats == {"gguf"}
    assert models[0].last_modified is not None and models[0].last_modified.month == 5
    assert models[0].pipeline_tag == "text-generation"

    assert [m.repo_id for m in search_models("llama", limit=2, sort="likes")] == ["org0/llama-0", "org1/llama-1"]
    assert [m.repo_id for m in search_models("llama", limit=1, sort="updated")] == ["org0/llama-4"]
    assert {m.repo_id for m in search_models("llama", author="org1")} == {"org1/llama-1", "org1/llama-3"}
    assert [m.repo_id for m in search_models("", filter="gguf")] == ["bart/llama-9-GGUF"]
    assert search_models("", limit=1)[0].formats == {"pickle"}
    assert search_models("no-such-thing") == []


# -- planning --------------------------------------------------------------------------------------
def test_gguf_quant_names() -> None:
    assert gguf_quant("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf") == "Q4_K_M"
    assert gguf_quant("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "Q4_K_M"
    assert gguf_quant("Q8_0/Model-Q8_0-00001-of-00002.gguf") == "Q8_0"
    assert gguf_quant("model-IQ4_XS.gguf") == "IQ4_XS"
    assert gguf_quant("model-f16.gguf") == "F16"
    assert gguf_quant("mmproj-model-f16.gguf") is None
    assert gguf_quant("model.gguf") is None
    assert gguf_quant("model.safetensors") is None


def _listing(*names: str) -> RepoListing:
    return RepoListing("o/r", "main", "a" * 40, [RepoEntry(n, 10, "0" * 64) for n in names])


def test_plan_choices() -> None:
    st = _listing("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                  "pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth",
                  "chat_template.jinja", "onnx/model.onnx")
    assert sorted(e.path for e in plan_download(st).files) == [
        "chat_template.jinja", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]

    gg = _listing("m.Q2_K.gguf", "m.Q4_K_M.gguf", "m.Q8_0.gguf", "README.md")
    assert [e.path for e in plan_download(gg).files] == ["m.Q4_K_M.gguf"]
    assert [e.path for e in plan_download(gg, quant="q8_0").files] == ["m.Q8_0.gguf"]
    assert [e.path for e in plan_download(gg, file="m.Q2_K.gguf").files] == ["m.Q2_K.gguf"]
    with pytest.raises(HubError, match=r"no Q5_K_M file in o/r; available: Q4_K_M, Q8_0, Q2_K"):
        plan_download(gg, quant="Q5_K_M")
    with pytest.raises(HubError, match="no file 'x.gguf' in o/r; GGUF files: m.Q2_K.gguf"):
        plan_download(gg, file="x.gguf")

    near = plan_download(_listing("m.Q8_0.gguf", "m.Q5_K_M.gguf", "m.Q2_K.gguf"))
    assert near.quant == "Q5_K_M" and "Q4_K_M is not in o/r" in (near.note or "")
    sharded = plan_download(_listing("Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"))
    assert [e.name for e in sharded.files] == ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]
    with pytest.raises(HubError, match="o/r has no Q4_K_M; choose one with --quant: Q3_K_XXL, Q7_Z"):
        plan_download(_listing("m.Q7_Z.gguf", "m-Q3_K_XXL.gguf"))  # quants, but none we can rank
    with pytest.raises(HubError, match="cannot tell the quantization.*a.gguf, b.gguf"):
        plan_download(_listing("a.gguf", "b.gguf"))
    with pytest.raises(HubError, match="only pickle weights .*pytorch_model.bin.*safetensors or GGUF"):
        plan_download(_listing("config.json", "pytorch_model.bin"))
    with pytest.raises(HubError, match="pickle"):
        plan_download(_listing("pytorch_model.bin"), file="pytorch_model.bin")
    with pytest.raises(HubError, match="has no GGUF files"):
        plan_download(st, quant="Q4_K_M")
    with pytest.raises(HubError, match="no model weights"):
        plan_download(_listing("README.md"))


# -- downloads -------------------------------------------------------------------------------------
def _events() -> tuple[list[DownloadProgress], object]:
    seen: list[DownloadProgress] = []
    return seen, seen.append


def test_download_safetensors_repo(hub: LoopbackHub, tmp_path: Path, tiny_llama: dict[str, bytes]) -> None:
    files = safetensors_repo(tiny_llama)
    repo = hub.add_repo("TinyOrg/Tiny-Llama", files)
    seen, cb = _events()
    out = download_model("TinyOrg/Tiny-Llama", tmp_path / "models", progress=cb, retry=FAST)
    assert out == tmp_path / "models" / "TinyOrg_Tiny-Llama"
    wanted = {n for n in files if n.endswith(".safetensors") or n in hubmod.MODEL_SIDE_FILES}
    assert {p.name for p in out.iterdir()} == wanted  # no README, pickle, onnx, marker or .part
    for name in wanted:
        assert (out / name).read_bytes() == files[name]
    assert seen[-1].status == "done" and seen[-1].total_done == seen[-1].total_bytes == sum(len(files[n]) for n in wanted)
    assert seen[-1].files_done == seen[-1].files_total == len(wanted)
    # the big safetensors file went through the CDN redirect
    assert any(p.startswith("/repos/") or "resolve" in p for (_, p, _) in hub.requests)
    assert hub.sent("pytorch_model.bin") == 0 and repo.sha
    # a second run finds everything in place and fetches nothing
    hub.reset_counters()
    download_model("TinyOrg/Tiny-Llama", tmp_path / "models", retry=FAST)
    assert sum(hub.bytes_sent.values()) == 0


def test_download_one_quant_and_file(hub: LoopbackHub, tmp_path: Path) -> None:
    q4, q8 = gguf_bytes(tmp_path, "Q4_0"), gguf_bytes(tmp_path, "Q8_0")
    hub.add_repo("bart/Tiny-GGUF", {"tiny.Q4_K_M.gguf": q4, "tiny.Q8_0.gguf": q8, "README.md": b"x"})
    out = download_model("bart/Tiny-GGUF", tmp_path, retry=FAST)
    assert sorted(p.name for p in out.iterdir()) == ["tiny.Q4_K_M.gguf"]
    assert (out / "tiny.Q4_K_M.gguf").read_bytes() == q4 and hub.sent("tiny.Q8_0.gguf") == 0
    out = download_model("bart/Tiny-GGUF", tmp_path, file="tiny.Q8_0.gguf", retry=FAST)
    assert (out / "tiny.Q8_0.gguf").read_bytes() == q8 and not (out / MARKER_NAME).exists()


def test_resume_after_cut_connection(hub: LoopbackHub, tmp_path: Path) -> None:
    data = big(400_000)
    hub.add_repo("o/cut", {"model.safetensors": data, "config.json": b"{}"})
    hub.faults.cut_after["model.safetensors"] = 150_000
    seen, cb = _events()
    out = download_model("o/cut", tmp_path, progress=cb, retry=FAST)
    assert (out / "model.safetensors").read_bytes() == data
    assert len(data) <= hub.sent("model.safetensors") <= len(data) + CHUNK  # nothing fetched twice
    ranges = [r for (_, p, r) in hub.requests if p.startswith("/repos/") and r]
    assert ranges and ranges[0].startswith("bytes=1")  # the second request resumed mid-file
    assert any(p.status == "retrying" for p in seen)


def test_resume_after_cancel_and_server_ignoring_range(hub: LoopbackHub, tmp_path: Path) -> None:
    data = big(600_000, seed=1)
    hub.add_repo("o/slow", {"model.safetensors": data, "config.json": b"{}"})
    hub.faults.slow["model.safetensors"] = 0.01
    cancel = threading.Event()
    seen_cancel: list[DownloadProgress] = []

    def cb(p: DownloadProgress) -> None:
        seen_cancel.append(p)
        if p.file == "model.safetensors" and p.file_bytes > 200_000:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download_model("o/slow", tmp_path, progress=cb, cancel=cancel, retry=FAST)
    folder = tmp_path / "o_slow"
    part = folder / "model.safetensors.part"
    assert (folder / MARKER_NAME).exists() and part.exists() and 200_000 < part.stat().st_size < len(data)
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["repo_id"] == "o/slow" and {f["name"] for f in marker["files"]} == {"model.safetensors", "config.json"}
    assert hubmod.is_partial_download(folder)

    moving = [p for p in seen_cancel if p.status == "downloading" and p.speed_bps > 0]
    assert moving and moving[-1].eta_s is not None and moving[-1].total_bytes == len(data) + 2
    from influence_tui.library import scan_models_dir

    [row] = scan_models_dir(tmp_path)
    assert row.name == "o_slow" and not row.usable and "partial download" in row.reason
    hub.faults.slow.clear()
    have = part.stat().st_size
    sent_before = settled(hub, "model.safetensors")
    download_model("o/slow", tmp_path, retry=FAST)
    assert (folder / "model.safetensors").read_bytes() == data and not hubmod.is_partial_download(folder)
    assert hub.sent("model.safetensors") - sent_before == len(data) - have  # resumed, not restarted

    # a server that ignores Range (answers 200) is handled by starting the file over
    (folder / "model.safetensors").rename(part)
    with open(part, "r+b") as f:
        f.truncate(1000)
    hub.faults.ignore_range.add("model.safetensors")
    (folder / MARKER_NAME).write_text(json.dumps({"sha": marker["sha"]}))
    download_model("o/slow", tmp_path, retry=FAST)
    assert (folder / "model.safetensors").read_bytes() == data


def test_read_timeouts_are_retried_and_resume(hub: LoopbackHub, tmp_path: Path) -> None:
    data = big(3 * CHUNK + 100, seed=4)
    hub.add_repo("o/stall", {"model.safetensors": data, "config.json": b"{}"})
    hub.faults.slow["model.safetensors"] = 0.6  # the server stalls after every chunk
    seen, cb = _events()
    out = download_model("o/stall", tmp_path, progress=cb, retry=RetryPolicy(retries=2, backoff_s=0.01, timeout_s=0.25))
    assert (out / "model.safetensors").read_bytes() == data
    retries = [p for p in seen if p.status == "retrying"]
    assert len(retries) >= 3 and "timed out" in (retries[0].message or "")  # each attempt made progress


def test_one_download_per_folder_at_a_time(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("o/busy", {"model.safetensors": big(200_000), "config.json": b"{}"})
    hub.faults.slow["model.safetensors"] = 0.1  # ~1.2 s: still running when the second call is refused
    cancel, started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            download_model("o/busy", tmp_path, retry=FAST, cancel=cancel,
                           progress=lambda p: started.set() if p.file_bytes > 0 else None)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(10)
    with pytest.raises(HubError, match=r"o/busy is already being downloaded into .*o_busy"):
        download_model("o/busy", tmp_path, retry=FAST)
    cancel.set()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled)
    assert not (tmp_path / ".o_busy.lock").exists()
    hub.faults.slow.clear()
    assert (download_model("o/busy", tmp_path, retry=FAST) / "model.safetensors").stat().st_size == 200_000 - 200_000 % 32


def test_503_is_retried_then_gives_up(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("o/flaky", {"model.safetensors": big(50_000), "config.json": b"{}"})
    hub.faults.status_503["model.safetensors"] = 2
    out = download_model("o/flaky", tmp_path, retry=FAST)
    assert (out / "model.safetensors").stat().st_size == 50_000 - 50_000 % 32
    hub.faults.status_503["config.json"] = 10
    (out / "config.json").unlink()
    with pytest.raises(HubError, match=r"config.json failed after 3 retries: 503 .*run the same command again"):
        download_model("o/flaky", tmp_path, retry=FAST)
    assert hubmod.is_partial_download(out)


def test_revision_by_branch_and_commit(hub: LoopbackHub, tmp_path: Path) -> None:
    repo = hub.add_repo("o/rev", {"m.Q4_K_M.gguf": big(5000)}, branches={"main", "refs/pr/1"})
    assert repo_files("o/rev", "refs/pr/1").sha == repo.sha
    listing = repo_files("o/rev", repo.sha)
    assert listing.sha == repo.sha and [e.path for e in listing.files] == ["m.Q4_K_M.gguf"]
    assert listing.quants == {"Q4_K_M": listing.files}
    download_model("o/rev", tmp_path, revision="refs/pr/1", retry=FAST)
    marker_free = tmp_path / "o_rev"
    assert (marker_free / "m.Q4_K_M.gguf").exists() and not (marker_free / MARKER_NAME).exists()
    # every file came from the pinned commit, not from a moving branch name
    assert all(f"/resolve/{repo.sha}/" in p for (m, p, _) in hub.requests if "/resolve/" in p)


def test_loopback_hub_serves_huggingface_hub_downloads(hub: LoopbackHub, tmp_path: Path) -> None:
    """The stock client (HEAD, 302 to the CDN, X-Linked-*, ETag) works against the loopback Hub too."""
    from huggingface_hub import hf_hub_download

    data = big(100_000, seed=5)
    hub.add_repo("o/stock", {"model.safetensors": data, "config.json": b'{"x": 1}'})
    for name, content in (("model.safetensors", data), ("config.json", b'{"x": 1}')):
        path = hf_hub_download("o/stock", name, endpoint=hub.url, cache_dir=tmp_path / "cache", token=False)
        assert Path(path).read_bytes() == content
    assert any(m == "HEAD" for (m, _, _) in hub.requests)


def test_sha256_mismatch_is_caught(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("o/bad", {"model.safetensors": big(40_000), "config.json": b"{}"})
    hub.faults.corrupt.add("model.safetensors")
    with pytest.raises(HubError, match=r"model.safetensors: sha256 mismatch .*removed"):
        download_model("o/bad", tmp_path, retry=FAST)
    folder = tmp_path / "o_bad"
    assert not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.part").exists()
    assert hubmod.is_partial_download(folder)  # never shown as a usable model
    hub.faults.corrupt.clear()
    hub.faults.corrupt.add("config.json")  # small files are checked against their git blob id
    (folder / "config.json").unlink()
    with pytest.raises(HubError, match="config.json: checksum mismatch"):
        download_model("o/bad", tmp_path, retry=FAST)


def test_errors_are_one_clear_line(hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("o/ok", {"model.safetensors": b"x", "config.json": b"{}"})
    hub.add_repo("meta/gated", {"model.safetensors": b"x", "config.json": b"{}"}, gated=True, tokens={"hf_good"})
    hub.add_repo("o/private", {"model.safetensors": b"x"}, private=True, tokens={"hf_good"})
    hub.add_repo("o/pickle", {"pytorch_model.bin": b"x", "config.json": b"{}"})
    cases = [
        (dict(repo_id="o/missing"), r"^repository o/missing not found on http://127\.0\.0\.1:\d+ \(if it is private or gated, set HF_TOKEN\)$"),
        (dict(repo_id="o/private"), "repository o/private not found .*set HF_TOKEN"),
        (dict(repo_id="meta/gated"), r"^meta/gated is gated: accept its terms at .*/meta/gated, then set HF_TOKEN"),
        (dict(repo_id="meta/gated", token="hf_other"), "meta/gated is gated and this token has no access"),
        (dict(repo_id="o/ok", revision="v9"), r"^revision 'v9' not found in o/ok$"),
        (dict(repo_id="o/ok", quant="Q4_K_M"), "o/ok has no GGUF files"),
        (dict(repo_id="o/pickle"), "o/pickle has only pickle weights"),
        (dict(repo_id="o/ok", endpoint="http://127.0.0.1:9"), r"^cannot reach http://127\.0\.0\.1:9: .*refused"),
        (dict(repo_id="bad id!"), "invalid repo id"),
    ]
    for kwargs, pattern in cases:
        if kwargs["repo_id"] == "meta/gated":
            assert not (tmp_path / "meta_gated").exists()  # a refused download leaves no folder behind
        kwargs.setdefault("output_dir", tmp_path)
        with pytest.raises(HubError, match=pattern) as info:
            download_model(retry=FAST, **kwargs)
        assert "\n" not in str(info.value)
    assert download_model("meta/gated", tmp_path, token="hf_good", retry=FAST).is_dir()
    assert download_model("o/private", tmp_path, token="hf_good", retry=FAST).is_dir()
    assert not (tmp_path / "o_missing").exists()  # nothing written for a failed lookup
    assert not (tmp_path / "o_pickle").exists()

    monkeypatch.setattr(hubmod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1})())
    with pytest.raises(HubError, match=r"not enough disk space .*need 3 B, 1 B free"):
        download_model("o/ok", tmp_path / "full", retry=FAST)


def test_disk_full_while_writing(hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("o/ok", {"model.safetensors": big(40_000), "config.json": b"{}"})

    def enospc(*a: object, **k: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hubmod._Downloader, "_fetch", enospc)
    with pytest.raises(HubError, match=r"^disk full while writing to .*o_ok: free some space and run the same command again"):
        download_model("o/ok", tmp_path, retry=FAST)


# -- the CLI ---------------------------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "INFLUENCE_HUB_BACKOFF": "0.01", "INFLUENCE_HUB_RETRIES": "3", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
         "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    e.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=ROOT)


def test_cli_search_and_download(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("TinyOrg/Tiny-GGUF", {"t.Q4_K_M.gguf": big(5000), "t.Q8_0.gguf": big(9000)}, downloads=7)
    r = _cli("search", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    assert [m["repo_id"] for m in json.loads(r.stdout)] == ["TinyOrg/Tiny-GGUF"]
    r = _cli("search", "tiny")
    assert r.returncode == 0 and "TinyOrg/Tiny-GGUF" in r.stdout and "gguf" in r.stdout

    r = _cli("download", "-m", "TinyOrg/Tiny-GGUF", "-o", str(tmp_path), "--quant", "Q8_0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "TinyOrg_Tiny-GGUF" / "t.Q8_0.gguf").stat().st_size == 9000 - 9000 % 32
    assert "[1/1] t.Q8_0.gguf" in r.stderr  # plain progress lines when not on a terminal
    r = _cli("download", "-m", "TinyOrg/Tiny-GGUF", "-o", str(tmp_path), "--json")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and lines[-1]["event"] == "done" and lines[-1]["files"] == ["t.Q4_K_M.gguf"]

    for args, message in [
        (("download", "-m", "TinyOrg/nope"), "error: repository TinyOrg/nope not found"),
        (("download", "-m", "TinyOrg/Tiny-GGUF", "--quant", "Q5_K_M"), "error: no Q5_K_M file in TinyOrg/Tiny-GGUF; available: Q4_K_M, Q8_0"),
        (("download", "-m", "TinyOrg/Tiny-GGUF", "--revision", "nope"), "error: revision 'nope' not found"),
        (("search", "x", "-r", "http://127.0.0.1:9"), "error: cannot reach http://127.0.0.1:9"),
    ]:
        r = _cli(*args, "-o", str(tmp_path)) if args[0] == "download" else _cli(*args)
        assert r.returncode == 1 and r.stderr.startswith(message), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_mirror_precedence(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("o/m", {"m.Q4_K_M.gguf": big(3000)})
    dead = "http://127.0.0.1:9"
    args = ("download", "-m", "o/m", "-o", str(tmp_path))
    assert _cli(*args, env={"HF_ENDPOINT": hub.url}).returncode == 0
    r = _cli(*args, env={"HF_ENDPOINT": dead, "INFLUENCE_MIRROR": hub.url})
    assert r.returncode == 0, r.stderr  # INFLUENCE_MIRROR beats HF_ENDPOINT
    r = _cli(*args, "-r", hub.url, env={"HF_ENDPOINT": dead, "INFLUENCE_MIRROR": dead})
    assert r.returncode == 0, r.stderr  # -r beats both
    r = _cli(*args, "-r", dead, env={"HF_ENDPOINT": hub.url, "INFLUENCE_MIRROR": hub.url})
    assert r.returncode == 1 and "cannot reach http://127.0.0.1:9" in r.stderr


def test_cli_resume_after_killed_process(hub: LoopbackHub, tmp_path: Path) -> None:
    data = big(1_000_000, seed=3)
    hub.add_repo("o/killme", {"model.safetensors": data, "config.json": b"{}"})
    hub.faults.slow["model.safetensors"] = 0.02  # ~800 KB/s
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
    cmd = [sys.executable, "-m", "influence_tui", "download", "-m", "o/killme", "-o", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    part = tmp_path / "o_killme" / "model.safetensors.part"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 200_000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    have = part.stat().st_size
    assert 200_000 <= have < len(data)
    assert hubmod.is_partial_download(part.parent)

    hub.faults.slow.clear()
    sent = settled(hub, "model.safetensors")
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (part.parent / "model.safetensors").read_bytes() == data and not part.exists()
    assert not hubmod.is_partial_download(part.parent)
    # bytes on disk were not fetched again (beyond what was in flight when the process died)
    assert hub.sent("model.safetensors") - sent == len(data) - have
    assert hub.sent("model.safetensors") <= len(data) + 2 * CHUNK + (sent - have)


def test_cli_ctrl_c_says_how_to_resume(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("o/int", {"model.safetensors": big(500_000), "config.json": b"{}"})
    hub.faults.slow["model.safetensors"] = 0.05
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}
    cmd = [sys.executable, "-m", "influence_tui", "download", "-m", "o/int", "-o", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    part = tmp_path / "o_int" / "model.safetensors.part"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 50_000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "download interrupted; run the same command again to resume"
    assert part.exists() and hubmod.is_partial_download(part.parent)


def test_downloaded_tiny_models_are_listed_and_generate(hub: LoopbackHub, tmp_path: Path,
                                                       tiny_llama: dict[str, bytes]) -> None:
    """End to end: CLI download of real tiny models, `influence list` sees them, the engine runs one."""
    if write_tiny_gguf is None or not tiny_llama:
        pytest.skip("tests/tiny_models.py is not available")
    hub.add_repo("TinyOrg/Tiny-Llama", safetensors_repo(tiny_llama))
    hub.add_repo("TinyOrg/Tiny-Llama-GGUF", {"tiny-llama.Q8_0.gguf": gguf_bytes(tmp_path, "Q8_0"), "README.md": b"x"})
    models = tmp_path / "models"
    for repo in ("TinyOrg/Tiny-Llama", "TinyOrg/Tiny-Llama-GGUF"):  # the GGUF repo has no Q4_K_M: nearest is Q8_0
        r = _cli("download", "-m", repo, "-o", str(models))
        assert r.returncode == 0, r.stderr
    r = _cli("list", "--models-dir", str(models), "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout) if m["source"] == "models"}
    assert rows["TinyOrg_Tiny-Llama"]["status"] == "ok" and rows["TinyOrg_Tiny-Llama"]["format"] == "safetensors"
    assert rows["TinyOrg_Tiny-Llama-GGUF"]["status"] == "ok" and rows["TinyOrg_Tiny-Llama-GGUF"]["quantization"] == "Q8_0"
    r = _cli("generate", "hello", "-m", str(models / "TinyOrg_Tiny-Llama"), "--max-tokens", "3", "--temperature", "0",
             "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 3
