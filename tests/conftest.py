"""Shared test setup: every test runs with its own settings folder and an empty Hugging Face cache,
so nothing from the developer's machine leaks in and nothing is written to it."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="influence-tests-"))
os.environ["INFLUENCE_CONFIG_DIR"] = str(_SESSION_TMP / "config")
os.environ["HF_HUB_CACHE"] = str(_SESSION_TMP / "hf-cache")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
for name in list(os.environ):
    if name.startswith("INFLUENCE_") and name != "INFLUENCE_CONFIG_DIR":
        del os.environ[name]
os.environ["INFLUENCE_OUTPUT_DIR"] = str(_SESSION_TMP / "models")
# the app's chats folder (platformdirs' data folder): never the developer's own
os.environ["XDG_DATA_HOME"] = str(_SESSION_TMP / "data")
# converted-weights cache: per test session, never the developer's own cache folder
os.environ["INFLUENCE_CACHE_DIR"] = str(_SESSION_TMP / "cache")
# other apps' model stores: empty unless a test fills them (never the developer's own)
os.environ["OLLAMA_MODELS"] = str(_SESSION_TMP / "ollama")
os.environ["INFLUENCE_LMSTUDIO_DIR"] = str(_SESSION_TMP / "lmstudio")
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets a fresh settings folder (and chats folder) and runs in its own working directory (no stray .env)."""
    cfg = tmp_path / "_config"
    monkeypatch.setenv("INFLUENCE_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "_data"))  # so the chats folder is the test's own
    monkeypatch.chdir(tmp_path)
    return cfg


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    from influence_tui.library import bundled_gguf_path

    path = bundled_gguf_path()
    assert path is not None, "the bundled model is missing: run ./setup.sh"
    return path


@pytest.fixture(scope="module")
def engine():
    """An engine with the bundled model, default settings, 8 slots: one per test module that uses it."""
    from influence_tui.config import Settings
    from influence_tui.engine import Engine

    eng = Engine(Settings.load(env={}, use_file=False), max_batch=8)
    eng.load()
    yield eng
    eng.shutdown()


# --- clients of a server test module's `url` fixture (a module may define its own instead) --------
@pytest.fixture()
def client(url):
    """httpx on the module's server."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def ollama_client(url):
    import ollama

    return ollama.Client(host=url)


@pytest.fixture(scope="module")
def openai_client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
