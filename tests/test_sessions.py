"""Session files: round trip, the original tool's files, broken and foreign files, atomic saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from influence_tui import sessions
from influence_tui.sessions import Session, SessionError, SessionMessage, load_session, save_session

ORIGINAL = {
    "model_path": "./models/TinyLlama_TinyLlama-1.1B-Chat-v1.0",
    "system_prompt": "You are a helpful assistant.",
    "max_tokens": 256,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "repeat_penalty": 1.1,
    "messages": [
        {"role": "user", "content": "What is the capital of France?", "timestamp": "2026-01-29 14:30:15"},
        {"role": "assistant", "content": "The capital of France is Paris.", "timestamp": "2026-01-29 14:30:17"},
    ],
    "created_at": "2026-01-29 14:30:10",
}


def test_round_trip(tmp_path: Path) -> None:
    session = Session(model_path="m.gguf", system_prompt="be brief", max_tokens=64, temperature=0.2, top_p=0.8,
                      top_k=None, repeat_penalty=1.05,
                      messages=[SessionMessage("user", "hi"), SessionMessage("assistant", "hello ```x", stopped=True)])
    path = save_session(tmp_path / "s.json", session)
    data = json.loads(path.read_text())
    assert data["version"] == sessions.VERSION
    assert set(ORIGINAL) <= set(data)
    loaded = load_session(path)
    assert loaded.messages == session.messages
    assert (loaded.model_path, loaded.system_prompt, loaded.max_tokens, loaded.temperature) == ("m.gguf", "be brief", 64, 0.2)
    assert loaded.messages[1].stopped


def test_loads_original_tool_file(tmp_path: Path) -> None:
    path = tmp_path / "original.json"
    path.write_text(json.dumps(ORIGINAL, indent=2))
    s = load_session(path)
    assert s.version == sessions.VERSION
    assert s.top_k == 50 and s.repeat_penalty == 1.1
    assert [m.role for m in s.messages] == ["user", "assistant"]
    assert s.messages[0].timestamp == "2026-01-29 14:30:15"
    assert s.created_at == "2026-01-29 14:30:10"


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"model": "x", "prompt": "y"}), "no \"messages\""),
        (json.dumps({"messages": "hi"}), "must be a list"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
        (json.dumps({"messages": [{"role": "user"}]}), "no text"),
        (json.dumps({"messages": [], "temperature": "hot"}), "must be a number"),
        (json.dumps({"messages": [], "version": 99}), "newer version"),
    ],
)
def test_broken_or_foreign_files(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SessionError) as err:
        load_session(path)
    message = str(err.value)
    assert words in message
    assert "\n" not in message


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="no session file"):
        load_session(tmp_path / "nope.json")
    with pytest.raises(SessionError, match="folder"):
        load_session(tmp_path)


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.json"
    save_session(path, Session(messages=[SessionMessage("user", "old")]))
    before = path.read_bytes()

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(SessionError, match="No space left"):
        save_session(path, Session(messages=[SessionMessage("user", "new")]))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left behind
