"""An importable app in a fixed state for the snapshot tests and the screenshot script.

No model load (autoload off), a fixed model list, fixed settings and a short conversation with a
code block, so every run draws the same screens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from influence_tui import hub
from influence_tui.config import Settings
from influence_tui.hub import HubModel, RepoEntry, RepoListing
from influence_tui.library import ModelInfo
from influence_tui.sessions import Session, SessionMessage, save_session
from influence_tui.tui.app import InfluenceApp

MODELS = [
    ModelInfo(name="SmolLM2-135M-Instruct", path="/models/SmolLM2-135M-Instruct-Q4_1.gguf", format="gguf", source="bundled",
              architecture="llama", quantization="Q4_1", parameters=134_515_008, context_length=8192,
              size_bytes=98_000_000, file_count=1, aliases=["smollm2"], capabilities=["completion"]),
    ModelInfo(name="TinyLlama_TinyLlama-1.1B-Chat-v1.0", path="/models/TinyLlama_TinyLlama-1.1B-Chat-v1.0", format="safetensors",
              source="models", architecture="llama", quantization="BF16", parameters=1_100_048_384, context_length=2048,
              size_bytes=2_200_119_864, file_count=7, capabilities=["completion"]),
    ModelInfo(name="Qwen_Qwen2.5-0.5B-Instruct-GGUF", path="/models/Qwen_Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
              format="gguf", source="models", architecture="qwen2", quantization="Q4_K_M", parameters=494_032_768,
              context_length=32768, size_bytes=491_400_032, file_count=1, capabilities=["completion", "tools"]),
    ModelInfo(name="all-MiniLM-L6-v2", path="/models/all-MiniLM-L6-v2", format="safetensors", source="bundled",
              architecture="bert", quantization="F32", parameters=22_713_216, context_length=512, size_bytes=90_868_376,
              file_count=5, kind="embedding", capabilities=["embedding"]),
    ModelInfo(name="broken-model", path="/models/broken-model", format="pickle", source="models", status="unusable",
              reason="pickle weights (.bin) can run code when loaded; convert to safetensors"),
]

ANSWER = """Here is a function that reverses a string:

```python
def reverse(text: str) -> str:
    return text[::-1]
```

Call it as `reverse("influence")`."""


WHEN = datetime(2025, 11, 3, tzinfo=timezone.utc)
RESULTS = [
    HubModel("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", 120_345, 87, WHEN, "text-generation", {"gguf"}),
    HubModel("HuggingFaceTB/SmolLM2-135M-Instruct", 98_100, 210, WHEN, "text-generation", {"safetensors"}),
    HubModel("bartowski/SmolLM2-1.7B-Instruct-GGUF", 45_000, 31, WHEN, "text-generation", {"gguf"}),
]
FILES = [
    RepoEntry("README.md", 4_210),
    RepoEntry("smollm2-135m-instruct-q4_k_m.gguf", 105_468_736),
    RepoEntry("smollm2-135m-instruct-q8_0.gguf", 144_811_200),
    RepoEntry("smollm2-135m-instruct-f16.gguf", 270_898_432),
]


class CannedHub:
    """Answers the Hub screen's calls from memory: snapshots never touch the network."""

    HubError = hub.HubError
    DownloadCancelled = hub.DownloadCancelled
    gguf_quant = staticmethod(hub.gguf_quant)

    @staticmethod
    def resolve_endpoint(mirror: str | None = None) -> str:
        return "https://huggingface.co"

    @staticmethod
    def search_models(query: str, **kwargs: Any) -> list[HubModel]:
        return [m for m in RESULTS if query.lower() in m.repo_id.lower()]

    @staticmethod
    def repo_files(repo_id: str, **kwargs: Any) -> RepoListing:
        return RepoListing(repo_id, "main", "0" * 40, list(FILES))

    @staticmethod
    def download_model(*args: Any, **kwargs: Any) -> Any:
        raise hub.HubError("downloads are off in the snapshot app")


class SnapshotApp(InfluenceApp):
    def settings_file_label(self) -> str:
        return "~/.config/influence-tui/settings.json"

    def hub_client(self) -> Any:
        return CannedHub


def loaded_summary() -> Any:
    """What the engine reports for the bundled model, without loading it (no torch here)."""
    from types import SimpleNamespace

    m = MODELS[0]
    return SimpleNamespace(name=m.name, path=m.path, architecture="llama", format="gguf", quantization="Q4_1",
                           dtype="float32", device="cpu", context_length=8192, parameters=m.parameters,
                           size_bytes=m.size_bytes, load_s=1.2)


# The Chats list's folder: fixed (its path is on the screen) and filled afresh for every app, with
# times a few minutes back (what "5 min ago" says does not change within a run)
CHATS = Path(tempfile.gettempdir()) / "influence-snapshot-chats"
SAVED_CHATS = [
    ("Summarise the water cycle for a ten-year-old", "Water goes up as vapour…", None, 300),
    ("Explain the TCP three-way handshake", "SYN, SYN-ACK, ACK…", None, 600),
    ("Plan a three-day trip to Kyoto", "Day 1: Fushimi Inari…", "Kyoto trip", 2400),
]


def seed_chats() -> None:
    shutil.rmtree(CHATS, ignore_errors=True)
    for i, (question, answer, title, age_s) in enumerate(SAVED_CHATS):
        session = Session(model_path=MODELS[0].path, title=title, created_at="2026-01-29 14:30:15",
                          messages=[SessionMessage("user", question, "2026-01-29 14:30:15"),
                                    SessionMessage("assistant", answer, "2026-01-29 14:30:17")])
        path = save_session(CHATS / f"chat-{i}.json", session)
        os.utime(path, (time.time() - age_s, time.time() - age_s))


def make_app(**kwargs: Any) -> SnapshotApp:
    seed_chats()
    settings = Settings(output_dir="./models", chats_dir=str(CHATS))
    app = SnapshotApp(settings, autoload=False, list_models=lambda: list(MODELS), **kwargs)
    app.model_summary, app.model_state = loaded_summary(), "ready"  # shown as loaded; never used to chat
    app.conversation.messages = [
        SessionMessage("user", "Write a Python function that reverses a string.", "2026-01-29 14:30:15"),
        SessionMessage("assistant", ANSWER, "2026-01-29 14:30:17"),
    ]
    return app


app = make_app()
