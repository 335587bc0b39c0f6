"""Pilot tests of the app. Chat tests use the real bundled model, loaded once for the module and
shared by every app (the app takes `engine=`); waits use `wait_until`, never fixed sleeps."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from influence_tui.config import Settings, settings_file
from influence_tui.tui.app import InfluenceApp
from influence_tui.tui.screens.chat import ChatScreen
from influence_tui.tui.widgets.messages import AssistantMessage, NoteMessage
from influence_tui.tui.widgets.prompt import PromptInput

ROOT = Path(__file__).resolve().parent.parent
SIZE = (100, 32)
LONG_PROMPT = "Write a long story about a dragon who learns to read. Use at least 300 words."
# greedy SmolLM2 writes ~1,500 tokens here: at ~150 tok/s an answer still streams 10 s later
VERY_LONG_PROMPT = ("Write a very long, detailed story in ten chapters about a dragon who learns to cook. "
                    "Give each chapter a title.")


async def wait_until(pilot: Any, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> None:
    """Let the app run until `predicate()` is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            shown = [str(n.message) for n in pilot.app._notifications]
            workers = [(w.name, w.state.name, str(w.error)) for w in pilot.app.workers]
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"notifications: {shown}; workers: {workers}; screen: {pilot.app.screen!r}")
        await pilot.pause(0.05)


@pytest.fixture(scope="module")
def engine() -> Any:
    from influence_tui.engine import Engine

    eng = Engine(Settings(warmup_tokens=0))
    eng.load("smollm2")
    yield eng
    eng.shutdown()


def make_settings(**changes: Any) -> Settings:
    settings = Settings.load()
    settings.temperature = 0.0
    settings.max_tokens = 24
    for name, value in changes.items():
        setattr(settings, name, value)
    return settings


def make_app(engine: Any = None, **kwargs: Any) -> InfluenceApp:
    settings = kwargs.pop("settings", None) or make_settings()
    return InfluenceApp(settings, engine=engine, autoload=engine is not None, **kwargs)


def chat(app: InfluenceApp) -> ChatScreen:
    assert isinstance(app.screen, ChatScreen)
    return app.screen


async def send(pilot: Any, text: str) -> None:
    prompt = pilot.app.screen.query_one(PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")


def notes(app: InfluenceApp) -> list[str]:
    return [n.text for n in app.screen.query(NoteMessage)]


def last_answer(app: InfluenceApp) -> AssistantMessage:
    return app.screen.query(AssistantMessage).last()


# -- chat with the real model -------------------------------------------------------------------
@pytest.mark.slow
async def test_answer_streams_then_ends_with_stats(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=24))
    async with app.run_test(size=SIZE) as pilot:
        assert app.model_state == "ready"
        await send(pilot, LONG_PROMPT)
        await wait_until(pilot, lambda: app.screen.query(AssistantMessage), what="the answer bubble")
        bubble = last_answer(app)
        await wait_until(pilot, lambda: app.answers_done == 1, what="the end of the answer")
        assert bubble.writes >= 2, "the answer was not streamed into the widget as it grew"
        stats = str(bubble.stats.render())
        for part in ("tokens", "tok/s", "first token", "context "):
            assert part in stats
        assert bubble.markdown.source == bubble.text  # the final full render has the whole answer
        assert [m.role for m in app.conversation.messages] == ["user", "assistant"]
        assert app.conversation.messages[1].content == bubble.text
        # /retry answers the same question again, replacing the answer (with a /set value)
        app.screen.query_one(PromptInput).text = ""
        await send(pilot, "/set max_tokens 3")
        await send(pilot, "/retry")
        await wait_until(pilot, lambda: app.answers_done == 2, what="the retried answer")
        assert [m.role for m in app.conversation.messages] == ["user", "assistant"]
        assert len(app.screen.query(AssistantMessage)) == 1
        assert "3 tokens" in str(last_answer(app).stats.render())


@pytest.mark.slow
async def test_keys_work_while_streaming_and_escape_keeps_partial_answer(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=3000))
    async with app.run_test(size=SIZE) as pilot:
        # a long answer: still streaming when the keys arrive
        await send(pilot, VERY_LONG_PROMPT)
        await wait_until(pilot, lambda: app.screen.query(AssistantMessage) and len(last_answer(app).text) > 10,
                         what="some of the answer")
        # the keyboard is live while the model writes: typing goes into the prompt
        await pilot.press("o", "k")
        assert app.screen.query_one(PromptInput).text == "ok"
        assert not last_answer(app).finished
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.answers_done == 1, timeout=30, what="the stopped answer")
        bubble = last_answer(app)
        assert bubble.stopped and bubble.has_class("stopped")
        assert "stopped" in str(bubble.stats.render())
        kept = app.conversation.messages[-1]
        assert kept.role == "assistant" and kept.stopped and kept.content == bubble.text != ""


@pytest.mark.slow
async def test_settings_apply_to_the_next_answer(engine: Any) -> None:
    class Recording:
        def __init__(self, inner: Any) -> None:
            self.inner, self.requests = inner, []

        def submit(self, request: Any, model: Any = None) -> Any:
            self.requests.append(request)
            return self.inner.submit(request, model)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    rec = Recording(engine)
    app = make_app(rec)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        app.screen.query_one("#set-temperature").value = "0.3"
        app.screen.query_one("#set-max_tokens").value = "5"
        app.screen.query_one("#set-system_prompt").value = "Answer in French."
        await pilot.press("ctrl+s")
        await pilot.press("f2")
        await pilot.pause()
        await send(pilot, "Hello")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the answer")
        request = rec.requests[-1]
        assert (request.params.temperature, request.params.max_tokens) == (0.3, 5)
        assert request.system == "Answer in French."
        assert last_answer(app).text


@pytest.mark.slow
async def test_server_toggle_answers_http_while_chat_streams(engine: Any) -> None:
    import httpx

    app = make_app(engine, settings=make_settings(max_tokens=3000, port=0))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")
        await wait_until(pilot, app._server_running, timeout=30, what="the API server")
        url = app._server_field("url")
        # an answer that outlasts the HTTP request (a 300-word one finished first on a quiet CI run)
        await send(pilot, VERY_LONG_PROMPT)
        await wait_until(pilot, lambda: app.screen.query(AssistantMessage) and last_answer(app).text,
                         what="the chat answer to start")
        # an outside client generates through the same engine while the chat answer streams
        assert not last_answer(app).finished
        served_before = engine.status().served
        body = {"model": "smollm2", "prompt": "Say hi.", "stream": False, "options": {"num_predict": 8, "temperature": 0}}
        response = await asyncio.to_thread(httpx.post, f"{url}/api/generate", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["done"] is True
        assert response.json()["eval_count"] >= 1
        assert engine.status().served == served_before + 1
        if not last_answer(app).finished:
            await pilot.press("escape")
        await wait_until(pilot, lambda: app.server_status_text()[1].startswith(url), timeout=30, what="the status")
        bar = app.screen.query_one(".server-status")
        await wait_until(pilot, lambda: url in str(bar.render()), timeout=30, what="URL in the status bar")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the chat answer")
        await pilot.press("f6")
        await wait_until(pilot, lambda: not app._server_running(), timeout=30, what="the server to stop")


# -- slash commands and sessions (no generation) ------------------------------------------------
async def test_slash_commands() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "/help")
        assert any("/retry" in n for n in notes(app))
        await send(pilot, "/set temperature 0.25")
        assert app.settings.temperature == 0.25
        await send(pilot, "/set temperature 7")
        assert app.settings.temperature == 0.25 and "from 0 to 2" in notes(app)[-1]
        await send(pilot, "/set top_k 40")
        assert app.settings.top_k == 40
        await send(pilot, "/set seed 7")
        assert app.settings.seed == 7
        await send(pilot, "/set warp 9")
        assert "unknown setting" in notes(app)[-1]
        await send(pilot, "/frobnicate")
        assert "unknown command /frobnicate" in notes(app)[-1]
        await send(pilot, "/sa x.json extra")  # a prefix is not a command
        assert "Did you mean /save" in notes(app)[-1]
        await send(pilot, "/load")
        assert "/load needs FILE" in notes(app)[-1]
        await send(pilot, "/system You are terse.")
        assert app.conversation.system_prompt == "You are terse."
        await send(pilot, "/copy")
        assert "nothing to copy" in notes(app)[-1]
        await send(pilot, "/retry")
        assert "nothing to retry" in notes(app)[-1]
        app.conversation.add("user", "code please")
        app.conversation.add("assistant", "Here:\n```python\nprint('hi')\n```\nDone.")
        await send(pilot, "/copy code")
        assert app.last_copied == "print('hi')"
        await send(pilot, "/copy")
        assert app.last_copied is not None and app.last_copied.startswith("Here:")
        app.last_copied = None
        app.screen.query_one(PromptInput).focus()
        await pilot.press("ctrl+y")  # the key the help lists, over the prompt's own redo
        assert app.last_copied is not None and app.last_copied.startswith("Here:")
        await send(pilot, "/hist")  # a prefix the hint shows as one command runs it
        assert "2 messages" in notes(app)[-1]
        await send(pilot, "/history")
        assert "2 messages" in notes(app)[-1]
        await send(pilot, "/model no-such-model")
        assert "not found" in notes(app)[-1] and "F4" in notes(app)[-1]
        await send(pilot, "/clear")
        assert app.conversation.messages == [] and app.conversation.system_prompt == "You are terse."
        # completion: Tab completes a unique prefix
        prompt = app.screen.query_one(PromptInput)
        prompt.text = "/his"
        prompt.move_cursor(prompt.document.end)
        await pilot.press("tab")
        assert prompt.text == "/history "
        prompt.text = ""  # on an empty prompt Tab moves on instead of typing "/"
        prompt.focus()
        await pilot.press("tab")
        assert prompt.text == "" and not prompt.has_focus
        prompt.focus()
        # a newline key adds a line instead of sending
        prompt.text = "line one"
        prompt.move_cursor(prompt.document.end)
        await pilot.press("ctrl+j")
        assert prompt.text == "line one\n"
        await send(pilot, "/quit")
        await wait_until(pilot, lambda: not app.is_running, timeout=30, what="the app to exit")


async def test_save_load_round_trip_original_file_and_broken_file(tmp_path: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.conversation.system_prompt = "Be kind."
        app.conversation.add("user", "Hi there")
        app.conversation.add("assistant", "Hello! **How** can I help?")
        await send(pilot, f"/save {tmp_path / 'chat.json'}")
        saved = json.loads((tmp_path / "chat.json").read_text())
        assert saved["version"] == 1 and len(saved["messages"]) == 2 and saved["system_prompt"] == "Be kind."
        await send(pilot, "/clear")
        await send(pilot, "/system Other")
        await send(pilot, f"/load {tmp_path / 'chat.json'}")
        assert [m.content for m in app.conversation.messages] == ["Hi there", "Hello! **How** can I help?"]
        assert app.conversation.system_prompt == "Be kind."
        assert len(app.screen.query(AssistantMessage)) == 1

        original = {
            "model_path": "./models/TinyLlama_TinyLlama-1.1B-Chat-v1.0", "system_prompt": "You are a pirate.",
            "max_tokens": 128, "temperature": 0.5, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.2,
            "messages": [{"role": "user", "content": "Ahoy?", "timestamp": "2026-01-29 14:30:15"},
                         {"role": "assistant", "content": "Arr!", "timestamp": "2026-01-29 14:30:16"}],
            "created_at": "2026-01-29 14:30:10",
        }
        (tmp_path / "old.json").write_text(json.dumps(original))
        await send(pilot, f"/load {tmp_path / 'old.json'}")
        assert [m.content for m in app.conversation.messages] == ["Ahoy?", "Arr!"]
        assert (app.settings.temperature, app.settings.max_tokens, app.settings.top_k) == (0.5, 128, 40)
        assert "TinyLlama" in notes(app)[-1]  # says which model the session was recorded with
        assert "its settings apply: max_tokens 128, temperature 0.5" in notes(app)[-1]  # and what it changed

        before = list(app.conversation.messages)
        (tmp_path / "broken.json").write_text('{"messages": [{"role": "user", "content": "x"}')
        await send(pilot, f"/load {tmp_path / 'broken.json'}")
        assert app.conversation.messages == before and app.settings.temperature == 0.5
        assert "not valid JSON" in notes(app)[-1]
        assert any("not valid JSON" in str(n.message) and n.severity == "error" for n in app._notifications)


async def test_save_on_exit_and_start_session(tmp_path: Path) -> None:
    start = tmp_path / "start.json"
    start.write_text(json.dumps({"messages": [{"role": "user", "content": "from file"}]}))
    out = tmp_path / "out.json"
    app = make_app(session_path=str(start), save_on_exit=str(out))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, timeout=30, what="the session to load")
        app.conversation.add("assistant", "an answer")
        await pilot.press("ctrl+q")
    data = json.loads(out.read_text())
    assert [m["content"] for m in data["messages"]] == ["from file", "an answer"]


async def test_a_session_file_that_does_not_load_is_not_overwritten_on_exit(tmp_path: Path) -> None:
    """The README's `chat --session F --save-on-exit F` with a damaged F: F keeps its bytes."""
    damaged = tmp_path / "notes.json"
    damaged.write_text('{"messages": [{"role": "user", "content": "my important notes"')
    before = damaged.read_bytes()
    app = make_app(session_path=str(damaged), save_on_exit=str(damaged))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: any("left as it is" in str(n.message) for n in app._notifications),
                         timeout=30, what="the notice")
        app.conversation.add("user", "typed after")
        await pilot.press("ctrl+q")
    assert damaged.read_bytes() == before
    saved = json.loads((tmp_path / "notes.new.json").read_text())
    assert [m["content"] for m in saved["messages"]] == ["typed after"]


# -- settings, help, palette, theme ---------------------------------------------------------------
async def test_settings_validation_and_persistence() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#set-temperature").value = "hot"
        screen.query_one("#set-port").value = "70000"
        await pilot.pause()
        assert "expected a number from 0 to 2" in str(screen.query_one("#err-temperature").render())
        assert "1 to 65535" in str(screen.query_one("#err-port").render())
        await pilot.press("ctrl+s")
        assert not settings_file().exists() and app.settings.temperature == 0.0
        screen.query_one("#set-temperature").value = "1.25"
        screen.query_one("#set-port").value = "9090"
        screen.query_one("#set-mirror").value = "https://hf-mirror.com"
        await pilot.pause()
        assert str(screen.query_one("#err-temperature").render()) == ""
        await pilot.press("ctrl+s")
        stored = json.loads(settings_file().read_text())
        assert (stored["temperature"], stored["port"], stored["mirror"]) == (1.25, 9090, "https://hf-mirror.com")
        assert app.settings.temperature == 1.25
    assert Settings.load().temperature == 1.25


async def test_navigation_help_palette_and_theme() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        for key, name in (("f3", "HubScreen"), ("f4", "LibraryScreen"), ("f5", "SettingsScreen"), ("f2", "ChatScreen")):
            await pilot.press(key)
            await pilot.pause()
            assert type(app.screen).__name__ == name
        await pilot.press("f1")
        await pilot.pause()
        from influence_tui.tui.screens.help import HelpScreen, help_markdown

        assert isinstance(app.screen, HelpScreen)
        text = help_markdown()
        for key in ("f1", "f2", "f3", "f4", "f5", "f6", "ctrl+s", "escape", "ctrl+d", "/retry", "alt+⏎"):
            assert key in text, key
        await pilot.press("escape")
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("Hub screen", "Library screen", "Settings screen", "Chat screen", "API server on/off",
                      "Keys and commands", "Stop answer", "Retry", "Clear chat", "Copy answer"):
            assert title in titles
        for key, title in (("f3", "Download"), ("f4", "Delete model"), ("f5", "Save settings")):
            await pilot.press(key)
            await pilot.pause()
            assert title in [c.title for c in app.get_system_commands(app.screen)]
        app.theme = "nord"
        await pilot.pause()
    assert json.loads(settings_file().read_text())["theme"] == "nord"
    assert InfluenceApp(Settings.load(), autoload=False).theme == "nord"


# -- library ------------------------------------------------------------------------------------
def _write_gguf(path: Path, rows: int = 64) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.zeros((rows, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


async def test_library_delete_with_confirm(tmp_path: Path) -> None:
    models = tmp_path / "models"
    doomed = _write_gguf(models / "org_mini" / "mini.Q8_0.gguf")
    app = make_app(settings=make_settings(output_dir=str(models)))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        screen = app.screen
        await wait_until(pilot, lambda: screen.models, timeout=30, what="the model list")
        assert screen.models[0].path == str(doomed)
        screen.query_one("#library-table").move_cursor(row=0)
        await pilot.press("d")
        await pilot.pause()
        from influence_tui.tui.screens.confirm_delete import ConfirmDelete

        assert isinstance(app.screen, ConfirmDelete)
        await pilot.press("n")
        await pilot.pause()
        assert doomed.exists() and app.screen is screen
        await pilot.press("d")
        await pilot.pause()
        await pilot.press("y")
        await wait_until(pilot, lambda: not doomed.exists(), timeout=30, what="the delete")
        await wait_until(pilot, lambda: all(m.path != str(doomed) for m in screen.models), timeout=30,
                         what="the table to refresh")
        # bundled models are never deleted from here
        bundled = next(i for i, m in enumerate(screen.models) if m.source == "bundled")
        screen.query_one("#library-table").move_cursor(row=bundled)
        await pilot.press("d")
        await pilot.pause()
        assert app.screen is screen


# -- hub against the loopback Hub ----------------------------------------------------------------
@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who has not set HF_HUB_OFFLINE (the engine's loader sets it process-wide when an
    earlier test loads the model; the app restores the user's value for the Hub screen)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


async def test_hub_search_download_progress_and_library(tmp_path: Path, online: None) -> None:
    from tests.hub_server import LoopbackHub

    gguf = _write_gguf(tmp_path / "src" / "mini.Q8_0.gguf").read_bytes()
    models = tmp_path / "models"
    with LoopbackHub(cdn_threshold=32 * 1024) as hub:
        hub.add_repo("acme/Mini-GGUF", {"README.md": b"# mini", "mini.Q8_0.gguf": gguf,
                                        "mini.F16.gguf": gguf}, downloads=42, likes=3)
        # ~1 MB at one 16 KiB chunk per 0.2 s: still downloading when the queue and cancel are checked
        slow_gguf = _write_gguf(tmp_path / "src" / "slow.Q8_0.gguf", rows=1024).read_bytes()
        hub.add_repo("acme/Slow-GGUF", {"slow.Q8_0.gguf": slow_gguf})
        hub.faults.slow["slow.Q8_0.gguf"] = 0.2
        app = make_app(settings=make_settings(output_dir=str(models), mirror=hub.url))
        async with app.run_test(size=(110, 36)) as pilot:
            await pilot.press("f3")
            await pilot.pause()
            screen = app.screen
            await pilot.press(*"gguf", "enter")
            await wait_until(pilot, lambda: len(screen.results) == 2, timeout=60, what="search results")
            assert {m.repo_id for m in screen.results} == {"acme/Mini-GGUF", "acme/Slow-GGUF"}
            row = next(i for i, m in enumerate(screen.results) if m.repo_id == "acme/Mini-GGUF")
            screen.query_one("#hub-results").move_cursor(row=row)
            await wait_until(pilot, lambda: screen.listing is not None and screen.listing.repo_id == "acme/Mini-GGUF",
                             timeout=60, what="the repo's files")
            assert set(screen.listing.quants) == {"Q8_0", "F16"}
            screen.query_one("#hub-quant").value = "Q8_0"
            await pilot.press("ctrl+d")
            await wait_until(pilot, lambda: screen.jobs and screen.jobs[0].row.finished, timeout=30, what="the download")
            job = screen.jobs[0]
            assert job.row.outcome == "done", job.row.query_one(".download-info").render()
            assert job.row.query_one("ProgressBar").percentage == 1.0
            assert (models / "acme_Mini-GGUF" / "mini.Q8_0.gguf").read_bytes() == gguf
            assert not (models / "acme_Mini-GGUF" / "mini.F16.gguf").exists()

            # a slow download can be cancelled
            row = next(i for i, m in enumerate(screen.results) if m.repo_id == "acme/Slow-GGUF")
            screen.query_one("#hub-results").move_cursor(row=row)
            await wait_until(pilot, lambda: screen.listing.repo_id == "acme/Slow-GGUF", timeout=30, what="files")
            await pilot.press("ctrl+d")
            slow = screen.jobs[1].row
            await wait_until(pilot, lambda: slow.last is not None, timeout=30, what="progress")
            # another download waits in the queue behind it
            row = next(i for i, m in enumerate(screen.results) if m.repo_id == "acme/Mini-GGUF")
            screen.query_one("#hub-results").move_cursor(row=row)
            await wait_until(pilot, lambda: screen.listing.repo_id == "acme/Mini-GGUF", timeout=30, what="files")
            await pilot.press("ctrl+d")
            again = screen.jobs[2].row
            assert "queued (1 ahead)" in str(again.query_one(".download-info").render())
            await pilot.press("ctrl+x")  # cancels the running one; the queued one starts
            await wait_until(pilot, lambda: slow.finished, timeout=30, what="the cancel")
            assert slow.outcome == "cancelled"
            await wait_until(pilot, lambda: again.finished, timeout=30, what="the queued download")
            assert again.outcome == "done"

            await pilot.press("f4")
            library = app.screen
            await wait_until(pilot, lambda: any(m.name.startswith("acme_Mini") or "mini" in m.path for m in library.models),
                             timeout=30, what="the download in the Library")


async def test_hub_failure_is_a_notification(online: None) -> None:
    app = make_app(settings=make_settings(mirror="http://127.0.0.1:9"))  # nothing listens on port 9
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press(*"x", "enter")
        await wait_until(pilot, lambda: any(n.severity == "error" for n in app._notifications), timeout=30,
                         what="an error notification")
        # what the user types is shown as typed, markup-like or not (a `[/]` crashed the app)
        search = app.screen.query_one("#hub-search")
        search.value = "foo[/]bar [b] x[y='z"
        search.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: sum(n.severity == "error" for n in app._notifications) >= 2, timeout=30,
                         what="the second error notification")
        assert app.is_running  # (Textual stops the app on an exception in a handler: run_test re-raises it)


# -- start-up -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_first_frame_paints_before_torch_is_imported(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from influence_tui.config import Settings
        from influence_tui.tui.app import InfluenceApp

        seen = {}

        class Probe(InfluenceApp):
            def on_ready(self):
                seen["ready"] = "torch" in sys.modules
                seen["state_at_ready"] = self.model_state  # InfluenceApp.on_ready runs next (MRO)

        async def auto_pilot(pilot):
            app = pilot.app
            while app.model_state in ("empty", "loading"):
                await pilot.pause(0.1)
            seen["final"] = app.model_state
            seen["torch_after_load"] = "torch" in sys.modules
            app.exit()

        at_import = "torch" in sys.modules
        s = Settings.load()
        s.warmup_tokens = 0
        Probe(s).run(headless=True, auto_pilot=auto_pilot, size=(80, 24))
        print(at_import, seen["ready"], seen["state_at_ready"], seen["final"], seen["torch_after_load"])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    at_import, at_ready, state, final, after = out.stdout.split()[-5:]
    assert (at_import, at_ready) == ("False", "False"), "torch was imported before the first frame"
    assert state == "loading"  # the first frame already says so
    # torch comes with the model, if at all: the kernel's own model (converted weights on disk) never loads it
    assert final == "ready" and after in ("True", "False")


async def test_no_jump_to_bottom_while_reading_history() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = chat(app)
        for i in range(30):
            await screen.note(f"note {i}")
        await pilot.pause()
        box = screen.query_one("#messages")
        await wait_until(pilot, lambda: box.scroll_y == box.max_scroll_y > 0, timeout=30, what="anchored at the bottom")
        box.focus()
        await pilot.press("pageup")  # the user scrolls up to read
        reading = -1.0
        while box.scroll_y != reading:  # (the scroll animates: read where it comes to rest)
            reading = box.scroll_y
            await pilot.pause(0.1)
        assert reading < box.max_scroll_y
        await screen.note("a new note arrives")
        await pilot.pause()
        assert box.scroll_y == reading, "the view jumped while the user was reading"
        await pilot.press("end")  # back at the bottom: following again
        await pilot.pause()
        await screen.note("another")
        await wait_until(pilot, lambda: box.scroll_y == box.max_scroll_y, timeout=30, what="following the bottom")


@pytest.mark.slow
async def test_library_load_marks_the_loaded_model_and_model_command(engine: Any) -> None:
    app = make_app(engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "/model smollm2")
        await wait_until(pilot, lambda: app.model_state == "ready" and "Loading" in notes(app)[-1], what="/model")
        await pilot.press("f4")
        screen = app.screen
        await wait_until(pilot, lambda: screen.models, what="the model list")
        row = next(i for i, m in enumerate(screen.models) if m.name == "SmolLM2-135M-Instruct")
        table = screen.query_one("#library-table")
        assert table.get_row_at(row)[0] == "●"  # the loaded one is marked
        table.move_cursor(row=row)
        await pilot.press("l")
        await wait_until(pilot, lambda: app.model_state == "ready", what="the load")
        assert app.is_loaded(screen.models[row].path)
        assert "loaded for chat" in str(screen.query_one("#library-detail").render())


@pytest.mark.slow
async def test_a_model_unloaded_by_an_api_client_loads_again_with_the_next_message(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        assert app.model_state == "ready"
        path = app.model_summary.path
        engine.unload()  # what an Ollama client's keep_alive 0 does through the server
        bar = app.screen.query_one(".model-status")
        await wait_until(pilot, lambda: "unloaded by an API client" in str(bar.render()), what="the status bar")
        await send(pilot, "Hi")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the answer")
        assert last_answer(app).text and engine.status().model.path == path
        await wait_until(pilot, lambda: "unloaded" not in str(bar.render()), what="the status bar")


@pytest.mark.slow
async def test_a_load_is_refused_while_an_answer_streams_and_a_too_long_question_comes_back(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=1500))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, VERY_LONG_PROMPT)
        await wait_until(pilot, lambda: app.screen.query(AssistantMessage) and last_answer(app).text, what="streaming")
        assert not app.switch_model(app.model_summary.path)  # what the Library's load and /model do
        await wait_until(pilot, lambda: any("being written" in str(n.message) for n in app._notifications),
                         what="the refusal")
        assert engine.status().in_flight == 1 and not last_answer(app).finished  # still streaming
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.answers_done == 1, timeout=60, what="the stop")
        assert "stopped (Esc)" in str(last_answer(app).stats.render())
        # a question longer than the context: an error, out of the history, back in the prompt
        question = "word " * 6000
        await send(pilot, question)
        await wait_until(pilot, lambda: app.answers_done == 2, timeout=60, what="the refusal")
        assert "context holds" in str(last_answer(app).stats.render())
        assert [m.role for m in app.conversation.messages] == ["user", "assistant"]
        assert app.screen.query_one(PromptInput).text == question
        # /retry sends the question on screen that got no answer (it said "nothing to retry")
        app.screen.query_one(PromptInput).text = ""
        await send(pilot, "/retry")
        await wait_until(pilot, lambda: app.answers_done == 3, timeout=60, what="the retried question")
        assert "context holds" in str(last_answer(app).stats.render())


async def test_the_settings_form_follows_set_from_the_chat() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        assert app.screen.query_one("#set-temperature").value == "0.0"
        await pilot.press("f2")
        await pilot.pause()
        await send(pilot, "/set temperature 0.9")
        await pilot.press("f5")
        await pilot.pause()
        assert app.screen.query_one("#set-temperature").value == "0.9"
        app.screen.query_one("#set-max_tokens").value = "33"  # an edit in progress survives a visit
        await pilot.press("f2", "f5")
        await pilot.pause()
        assert app.screen.query_one("#set-max_tokens").value == "33"


async def test_a_long_session_loads_quickly_showing_its_newest_messages(tmp_path: Path) -> None:
    from influence_tui.tui.screens.chat import SHOWN_MESSAGES
    from influence_tui.tui.widgets.messages import UserMessage

    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(1000)]
    (tmp_path / "long.json").write_text(json.dumps({"messages": messages}))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        started = time.monotonic()
        await send(pilot, f"/load {tmp_path / 'long.json'}")
        took = time.monotonic() - started
        assert len(app.conversation.messages) == 1000  # all of it is the conversation
        shown = len(app.screen.query(UserMessage)) + len(app.screen.query(AssistantMessage))
        assert shown == SHOWN_MESSAGES and took < 30
        assert any("900 earlier messages" in n for n in notes(app))
        await send(pilot, "/history")
        assert "1000 messages" in notes(app)[-1] and "message 999" in notes(app)[-1]


async def test_ctrl_c_says_how_to_quit_in_plain_words() -> None:
    """Notifications are plain text here: Textual's own hint showed `Press [b]ctrl+q[/b]`."""
    app = make_app(settings=make_settings())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")  # a screen whose focus does not take ctrl+c as copy
        await pilot.pause()
        await pilot.press("ctrl+c")
        await pilot.pause()
        shown = [str(n.message) for n in app._notifications]
        assert "Press ctrl+q to quit the app" in shown and not any("[b]" in m for m in shown)


async def test_up_and_down_bring_back_what_was_sent() -> None:
    app = make_app()  # no model: each message gets its one-line error, the history is the prompt's
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.screen.query_one(PromptInput)
        for text in ("first question", "/set temperature 0.3", "/set temperature 0.3"):
            await send(pilot, text)
        await pilot.press("d", "r")  # a draft being typed
        await pilot.press("up")
        assert prompt.text == "/set temperature 0.3" and prompt.cursor_location == (0, len(prompt.text))
        await pilot.press("up")
        assert prompt.text == "first question"  # (the same text sent twice in a row comes back once)
        await pilot.press("up")
        assert prompt.text == "first question"  # the oldest: it stays
        await pilot.press("down")
        assert prompt.text == "/set temperature 0.3"
        await pilot.press("down")
        assert prompt.text == "dr"  # back to the draft
        await pilot.press("down")
        assert prompt.text == "dr"
        # on a second line, Up moves the cursor (no recall); on the first, it recalls
        prompt.text = "line one\nline two"
        prompt.move_cursor(prompt.document.end)
        await pilot.press("up")
        assert prompt.text == "line one\nline two" and prompt.cursor_location[0] == 0
        await pilot.press("up")
        assert prompt.text == "/set temperature 0.3"
        await pilot.press("end", "!")  # edited: now it is what is being typed
        await pilot.press("down")
        assert prompt.text == "/set temperature 0.3!"
        # one long line wrapped over rows: Up moves up a row first, recalls only from the top row
        prompt.text = "word " * 60
        prompt.move_cursor(prompt.document.end)
        await pilot.press("up")
        assert prompt.text == "word " * 60 and prompt.cursor_location[1] < len(prompt.text)


async def test_clicking_a_code_block_copies_it() -> None:
    from textual.widgets.markdown import MarkdownFence

    app = make_app()
    app.conversation.add("user", "Show me code")
    app.conversation.add("assistant", "Two blocks:\n\n```python\nprint('one')\n```\n\nand\n\n```sh\nls -la\necho two\n```\n")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app.screen.query(MarkdownFence)) == 2, what="the code blocks")
        await pilot.click(app.screen.query(MarkdownFence).last())
        await wait_until(pilot, lambda: app.last_copied == "ls -la\necho two", what="the copy")
        assert any("Copied the code block (2 lines" in str(n.message) for n in app._notifications)
        app.last_copied = None
        await pilot.click(app.screen.query(AssistantMessage).last(), offset=(2, 0))  # not a code block: nothing
        await pilot.pause()
        assert app.last_copied is None


@pytest.mark.slow
async def test_edit_takes_the_last_question_back_into_the_prompt(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "What is the capital of Frnace?")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the answer")
        await send(pilot, "/edit")
        prompt = app.screen.query_one(PromptInput)
        assert prompt.text == "What is the capital of Frnace?" and not app.conversation.messages
        assert not app.screen.query(AssistantMessage) and not app.screen.query("UserMessage")
        prompt.text = "What is the capital of France?"
        prompt.move_cursor(prompt.document.end)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.answers_done == 2, what="the new answer")
        assert [m.content for m in app.conversation.messages if m.role == "user"] == ["What is the capital of France?"]
        assert len(app.screen.query(AssistantMessage)) == 1
        saved = json.loads(app.chat_path.read_text())  # the kept chat follows the edit
        assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["What is the capital of France?"]
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "/edit")
        assert "nothing to edit" in notes(app)[-1]
