"""Saved chats: the folder (chats.py), `influence chats`, `influence chat --continue`, and the app
keeping each conversation after every answer, with its Chats list (ctrl+o) driven by Pilot and
the real bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from influence_tui.chats import ago, chats_folder, delete_chat, list_chats, new_chat_path, rename_chat, title_of
from influence_tui.config import Settings
from influence_tui.sessions import Session, SessionMessage, load_session, save_session
from influence_tui.tui.screens.chats import ChatsScreen
from influence_tui.tui.screens.confirm_delete import ConfirmDelete
from tests.test_tui import SIZE, chat, make_app, make_settings, notes, send, wait_until


def write_chat(folder: Path, name: str, question: str, answer: str = "An answer.", age_s: float = 0, **extra: Any) -> Path:
    session = Session(model_path="/models/SmolLM2-135M-Instruct-Q4_1.gguf",
                      messages=[SessionMessage("user", question), SessionMessage("assistant", answer)], **extra)
    path = save_session(folder / name, session)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


# -- the folder ---------------------------------------------------------------------------------
def test_chats_are_listed_newest_first_under_their_first_question(tmp_path: Path) -> None:
    write_chat(tmp_path, "old.json", "How do I sort a list\n in Python?", age_s=7200)
    write_chat(tmp_path, "new.json", "Explain TCP handshakes", age_s=10)
    write_chat(tmp_path, "named.json", "something", age_s=3600, title="My [project] notes")
    (tmp_path / "notes.json").write_text('{"not": "a session"}')  # someone else's file: named, left alone
    (tmp_path / "readme.txt").write_text("not json")
    entries, problems = list_chats(tmp_path)
    assert [e.title for e in entries] == ["Explain TCP handshakes", "My [project] notes", "How do I sort a list in Python?"]
    assert [e.messages for e in entries] == [2, 2, 2]
    assert len(problems) == 1 and "notes.json" in problems[0] and "not a session file" in problems[0]
    assert (tmp_path / "notes.json").exists()
    # search: every word, in the title or any message, any case
    assert [e.title for e in entries if e.matches("tcp")] == ["Explain TCP handshakes"]
    assert [e.title for e in entries if e.matches("an ANSWER python")] == ["How do I sort a list in Python?"]
    assert list_chats(tmp_path / "missing") == ([], [])


def test_titles_file_names_rename_and_delete(tmp_path: Path) -> None:
    long = "Please explain, in detail, how the attention mechanism of a transformer works " * 2
    session = Session(messages=[SessionMessage("user", long)])
    assert title_of(session).endswith("…") and len(title_of(session)) == 60
    assert title_of(Session()) == "New chat"
    first = new_chat_path(tmp_path, session)
    assert first.name.endswith("-please-explain-in-detail-how-the.json")
    save_session(first, session)
    assert new_chat_path(tmp_path, session) != first  # never over another chat
    assert new_chat_path(tmp_path, Session(messages=[SessionMessage("user", "¿¿??")])).name.endswith("-chat.json")

    assert rename_chat(first, "  Attention,\n explained ").title == "Attention, explained"
    assert load_session(first).title == "Attention, explained"
    assert list_chats(tmp_path)[0][0].title == "Attention, explained"
    assert rename_chat(first, "  ").title is None  # back to its first question
    assert list_chats(tmp_path)[0][0].title == title_of(session)
    delete_chat(first)
    delete_chat(first)  # already gone: nothing to do
    assert list_chats(tmp_path) == ([], [])


def test_the_original_tools_session_lists_and_keeps_its_keys(tmp_path: Path) -> None:
    original = {"model_path": "./models/TinyLlama", "system_prompt": "Be brief.", "max_tokens": 100, "temperature": 0.7,
                "top_p": 0.9, "top_k": None, "repeat_penalty": 1.1, "created_at": "2026-01-29 14:30:15",
                "messages": [{"role": "user", "content": "Hi there", "timestamp": "2026-01-29 14:30:15"}]}
    (tmp_path / "old.json").write_text(json.dumps(original))
    [entry], _ = list_chats(tmp_path)
    assert (entry.title, entry.model, entry.created_at) == ("Hi there", "./models/TinyLlama", "2026-01-29 14:30:15")
    rename_chat(entry.path, "Greeting")
    saved = json.loads(entry.path.read_text())
    assert saved["title"] == "Greeting" and saved["system_prompt"] == "Be brief." and saved["messages"][0]["content"] == "Hi there"


def test_ago_reads_like_a_person_would_say_it() -> None:
    now = time.mktime((2026, 12, 8, 15, 0, 0, 0, 0, -1))
    assert ago(now - 20, now) == "just now"
    assert ago(now - 300, now) == "5 min ago"
    assert ago(now - 3 * 3600, now) == "3 h ago"
    assert ago(now - 24 * 3600, now) == "yesterday"
    assert ago(now - 10 * 24 * 3600, now) == "Nov 28"
    assert ago(now - 400 * 24 * 3600, now) == "2025-11-03"


def test_the_folder_follows_the_setting_else_the_data_folder(tmp_path: Path) -> None:
    assert chats_folder(Settings(chats_dir=str(tmp_path / "c"))) == tmp_path / "c"
    assert chats_folder(Settings()) == Path(os.environ["XDG_DATA_HOME"]) / "influence-tui" / "chats"


# -- influence chats ----------------------------------------------------------------------------
def run_cli(*args: str, chats: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFLUENCE_CHATS_DIR": str(chats)}
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, env=env, timeout=60)


def test_influence_chats_lists_searches_and_prints_json(tmp_path: Path) -> None:
    out = run_cli("chats", chats=tmp_path / "none")
    assert out.returncode == 0 and "No chat is saved" in out.stdout

    write_chat(tmp_path, "a.json", "How do I sort a list in Python?", age_s=100)
    write_chat(tmp_path, "b.json", "Explain TCP", answer="SYN, SYN-ACK, ACK.")
    (tmp_path / "broken.json").write_text("{")
    out = run_cli("chats", "--json", chats=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["title"] for r in rows] == ["Explain TCP", "How do I sort a list in Python?"]
    assert rows[0]["path"] == str(tmp_path / "b.json") and rows[0]["messages"] == 2
    assert "broken.json" in out.stderr and "warning" in out.stderr  # named, not fatal

    out = run_cli("chats", "syn-ack", "--json", chats=tmp_path)
    assert [r["title"] for r in json.loads(out.stdout)] == ["Explain TCP"]
    out = run_cli("chats", "--limit", "1", chats=tmp_path)
    assert "Explain TCP" in out.stdout and "sort a list" not in out.stdout
    assert "SmolLM2-135M-Instruct-Q4_1 " in out.stdout and "b.json" in out.stdout
    out = run_cli("chats", "nothing-like-this", chats=tmp_path)
    assert out.returncode == 0 and "No chat matches" in out.stdout


# -- the app (with the real model: conftest's module `engine`) ----------------------------------
def folder() -> Path:
    return chats_folder(Settings.load())


def notified(app: Any, text: str) -> bool:
    return any(text in str(n.message) for n in app._notifications)


async def delete_the_open_chat(pilot: Any, path: Path) -> None:
    """From the Chats list, where the open chat is the first row: delete it, close the list."""
    app = pilot.app
    chats = await open_list(pilot)
    assert "● open" in str(chats.query_one("#chats-list").get_option_at_index(0).prompt)
    await pilot.press("ctrl+d")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDelete), what="the confirmation")
    await pilot.press("y")
    await wait_until(pilot, lambda: not path.exists(), what="the delete")
    await pilot.press("escape")
    await wait_until(pilot, lambda: not app.conversation.messages, what="the open chat to go")


async def open_list(pilot: Any) -> ChatsScreen:
    await pilot.press("ctrl+o")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatsScreen) and pilot.app.screen.loaded, what="the Chats list")
    return pilot.app.screen


@pytest.mark.slow
async def test_every_answer_is_kept_and_the_chats_list_reopens_renames_and_deletes(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=6))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "What is the capital of France?")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the first answer")
        [first] = folder().glob("*.json")
        assert app.chat_path == first and first.name.endswith("-what-is-the-capital-of-france.json")
        saved = load_session(first)
        assert [m.role for m in saved.messages] == ["user", "assistant"]
        assert saved.messages[1].content == app.conversation.messages[1].content

        await pilot.press("ctrl+n")  # a new chat: the screen is empty, the first stays on disk
        await wait_until(pilot, lambda: not app.conversation.messages and app.chat_path is None, what="a new chat")
        await send(pilot, "Name a color.")
        await wait_until(pilot, lambda: app.answers_done == 2, what="the second answer")
        second = app.chat_path
        assert second is not None and second != first and len(list(folder().glob("*.json"))) == 2
        mtime = first.stat().st_mtime_ns

        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.loaded, what="the Chats list")
        chats = app.screen
        assert [e.path for e in chats.shown] == [second, first]  # newest first
        await pilot.press(*"france")  # the search field has the focus
        await wait_until(pilot, lambda: [e.path for e in chats.shown] == [first], what="the search")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat_path == first, what="the chat to open")
        assert app.conversation.messages[0].content == "What is the capital of France?"
        assert first.stat().st_mtime_ns == mtime  # opening (and leaving the other) rewrites nothing
        assert any("Loaded" in n for n in notes(app))

        await send(pilot, "And of Italy?")  # the opened chat goes on in its own file
        await wait_until(pilot, lambda: app.answers_done == 3, what="the follow-up")
        assert len(load_session(first).messages) == 4 and len(list(folder().glob("*.json"))) == 2

        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.loaded, what="the Chats list")
        assert app.screen.shown[0].path == first  # just changed: on top
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.screen.id == "rename-chat", what="the rename box")
        app.screen.query_one("#rename-input").value = "Capitals"
        await pilot.press("enter")
        await wait_until(pilot, lambda: load_session(first).title == "Capitals", what="the rename")
        assert app.conversation.title == "Capitals"  # the open chat keeps the name at its next save
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.shown
                         and app.screen.shown[0].title == "Capitals", what="the list to show the name")

        await pilot.press("ctrl+d")  # the open chat: asks, then it is gone from the disk and the screen
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDelete), what="the confirmation")
        await pilot.press("y")
        await wait_until(pilot, lambda: not first.exists(), what="the delete")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and len(app.screen.shown) == 1, what="the list")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, ChatsScreen), what="the list to close")
        assert not app.conversation.messages and app.chat_path is None
    assert not first.exists() and second.exists()  # leaving the app did not bring it back


@pytest.mark.slow
async def test_slash_commands_clear_keeps_the_chat_and_rename_names_it(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "/rename Early name")  # no message yet: nothing on disk
        assert not list(folder().glob("*.json"))
        assert notified(app, "once it has a message")
        await send(pilot, "Say hi.")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the answer")
        path = app.chat_path
        assert path is not None and load_session(path).title == "Early name"
        await send(pilot, "/system Answer in French.")  # saved at once in the open chat
        assert load_session(path).system_prompt == "Answer in French."
        await send(pilot, "/clear")
        await wait_until(pilot, lambda: not app.conversation.messages, what="the clear")
        assert app.chat_path is None and len(load_session(path).messages) == 2  # the turns stay in its file
        assert app.conversation.system_prompt == "Answer in French."  # /clear keeps the system prompt
        await send(pilot, "/chats")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.loaded, what="the Chats list")
        assert [e.title for e in app.screen.shown] == ["Early name"]


@pytest.mark.slow
async def test_save_chats_off_keeps_nothing(engine: Any) -> None:
    app = make_app(engine, settings=make_settings(max_tokens=3, save_chats=False))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "Hello")
        await wait_until(pilot, lambda: app.answers_done == 1, what="the answer")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.loaded, what="the Chats list")
        assert "save_chats is off" in str(app.screen.query_one("#chats-title").render())
    assert not folder().exists() or not list(folder().glob("*.json"))


@pytest.mark.slow
async def test_a_chats_folder_that_cannot_be_written_is_one_notification(engine: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    app = make_app(engine, settings=make_settings(max_tokens=3, chats_dir=str(blocker / "chats")))
    async with app.run_test(size=SIZE) as pilot:
        for i in range(2):
            await send(pilot, f"Hello {i}")
            await wait_until(pilot, lambda: app.answers_done == i + 1, what="the answer")
        failures = [n for n in app._notifications if n.title == "Chat not saved"]
        assert len(failures) == 1 and "/save FILE" in failures[0].message  # once, not after every answer
        assert len(app.conversation.messages) == 4  # the chat goes on
    assert blocker.read_text() == "in the way"


async def test_continue_opens_the_newest_chat_and_goes_on_in_its_file(tmp_path: Path) -> None:
    from influence_tui.tui.app import InfluenceApp

    app = InfluenceApp(make_settings(), autoload=False, continue_latest=True)
    async with app.run_test(size=SIZE) as pilot:  # nothing saved yet: a new chat, and why
        await wait_until(pilot, lambda: any(n.title == "No chat to continue" for n in app._notifications), what="the note")
        assert not app.conversation.messages
    write_chat(folder(), "older.json", "Older question", age_s=600)
    newest = write_chat(folder(), "newer.json", "Newer question", age_s=5)
    app = InfluenceApp(make_settings(), autoload=False, continue_latest=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the newest chat")
        assert app.conversation.messages[0].content == "Newer question" and app.chat_path == newest
        assert chat(app).query("UserMessage")


def test_chat_continue_and_session_are_exclusive(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "influence_tui", "chat", "--continue", "--session", "x.json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not allowed with" in out.stderr


async def test_session_takes_a_saved_chats_file_name() -> None:
    from influence_tui.tui.app import InfluenceApp

    saved = write_chat(folder(), "2026-12-08_101500-tcp.json", "Explain TCP")
    for name in ("2026-12-08_101500-tcp.json", "2026-12-08_101500-tcp"):
        app = InfluenceApp(make_settings(), autoload=False, session_path=name)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
            assert app.chat_path == saved  # it goes on in its own file
    app = InfluenceApp(make_settings(), autoload=False, session_path="no-such-chat.json")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: any(n.title == "Session not loaded" for n in app._notifications), what="the error")


async def test_a_session_file_only_read_is_not_copied_into_the_chats(tmp_path: Path) -> None:
    from influence_tui.tui.app import InfluenceApp

    outside = write_chat(tmp_path, "notes.json", "A question kept elsewhere")
    app = InfluenceApp(make_settings(), autoload=False, session_path=str(outside))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the session")
        assert app.chat_path is None  # not one of the chats: a new chat there once it changes
        await send(pilot, "/rename Kept elsewhere")
    [copy] = folder().glob("*.json")  # changed (named), so kept; the file it came from is untouched
    assert load_session(copy).title == "Kept elsewhere" and load_session(outside).title is None
    copy.unlink()
    app = InfluenceApp(make_settings(), autoload=False, session_path=str(outside))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the session")
    assert not list(folder().glob("*.json"))


async def test_save_md_writes_a_transcript_to_read(tmp_path: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.conversation.system_prompt = "Be kind."
        app.conversation.add("user", "What is 2 + 2?")
        app.conversation.add("assistant", "It is **4**.\n\n```python\nprint(2 + 2)\n```", thinking="Add them.")
        app.conversation.add("assistant", "Half an ans", stopped=True)
        app.conversation.add("user", "# not a heading\n```\nunclosed")
        app.conversation.add("assistant", "ok")
        await send(pilot, f"/save {tmp_path / 'chat.md'}")
        assert "Markdown" in notes(app)[-1]
        blocker = tmp_path / "folder.md"
        blocker.mkdir()
        await send(pilot, f"/save {blocker}")
        assert "is a folder" in notes(app)[-1]
    text = (tmp_path / "chat.md").read_text()
    assert text.startswith("# What is 2 + 2?\n")
    assert "> **System:** Be kind." in text
    assert "## You\n\nWhat is 2 + 2?" in text
    assert "<details><summary>Reasoning</summary>\n\nAdd them.\n\n</details>\n\nIt is **4**." in text
    assert "```python\nprint(2 + 2)\n```" in text and "## Assistant (stopped)\n\nHalf an ans" in text
    assert "\\# not a heading" in text and "```\nunclosed\n```\n\n## Assistant" in text
    with pytest.raises(Exception):
        json.loads(text)  # a transcript, not a session



# -- what a reviewer found: each a way to lose a chat, or a surprise ----------------------------------
async def test_the_open_chat_cannot_be_deleted_while_its_answer_waits() -> None:
    path = write_chat(folder(), "open.json", "First question")
    app = make_app(session_path=str(path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat_path == path.resolve(), what="the chat")
        app.model_state = "loading"  # (a model switch in progress: the answer waits for it)
        await send(pilot, "Second question")
        await wait_until(pilot, lambda: chat(app).busy, what="the answer to wait")
        await open_list(pilot)
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ChatsScreen) and notified(app, "waiting for or writing an answer")
        await pilot.press("escape")
        app.model_state = "error"
        await wait_until(pilot, lambda: not chat(app).busy, what="the answer to give up")
    assert path.exists()


@pytest.mark.slow
async def test_quitting_mid_answer_keeps_the_answer_as_far_as_it_got(engine: Any) -> None:
    from tests.test_tui import VERY_LONG_PROMPT

    app = make_app(engine, settings=make_settings(max_tokens=3000))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, VERY_LONG_PROMPT)
        await wait_until(pilot, lambda: chat(app).busy and len(chat(app)._current.text) > 20, what="some of the answer")
        await pilot.press("ctrl+q")
    [path] = folder().glob("*.json")
    saved = load_session(path)
    assert [m.role for m in saved.messages] == ["user", "assistant"]
    assert saved.messages[1].stopped and len(saved.messages[1].content) > 20


async def test_save_on_exit_keeps_its_chat_in_that_file_and_never_an_empty_one(tmp_path: Path) -> None:
    notes_file = write_chat(tmp_path, "notes.json", "My notes question", "My notes answer")
    for _ in range(2):  # resuming again and again: no copies pile up in the chats folder
        app = make_app(session_path=str(notes_file), save_on_exit=str(notes_file))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.conversation.messages, what="the session")
            app.conversation.add("user", "one more")
            app.conversation.add("assistant", "kept")
            assert app.autosave() == notes_file  # (what an answer's end does)
            assert len(load_session(notes_file).messages) == len(app.conversation.messages)
    assert not list(folder().glob("*.json"))
    assert len(load_session(notes_file).messages) == 6
    app = make_app(session_path=str(notes_file), save_on_exit=str(notes_file))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the session")
        await pilot.press("ctrl+n")  # a new, empty chat; quitting must not write it over the notes
        await wait_until(pilot, lambda: not app.conversation.messages, what="the new chat")
        await pilot.press("ctrl+q")
    assert len(load_session(notes_file).messages) == 6


async def test_a_chat_opened_by_a_relative_path_is_the_listed_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_chat(folder(), "2026-12-01_090000-relative.json", "Opened by its relative path")
    monkeypatch.chdir(folder())
    app = make_app(session_path=path.name)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        await delete_the_open_chat(pilot, path)
        app.conversation.add("user", "typed after")
        app.autosave()
    assert not path.exists()  # not brought back
    assert [load_session(p).messages[0].content for p in folder().glob("*.json")] == ["typed after"]


async def test_a_chat_changed_by_another_window_is_not_overwritten() -> None:
    path = write_chat(folder(), "shared.json", "Asked in two windows", age_s=60)
    app = make_app(session_path=str(path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        other = load_session(path)  # the other window answers first
        other.messages.append(SessionMessage("user", "from the other window"))
        save_session(path, other)
        app.conversation.add("user", "from this window")
        written = app.autosave()
        await pilot.pause()
        assert written is not None and written != path and notified(app, "changed by another window")
    assert load_session(path).messages[-1].content == "from the other window"
    assert load_session(written).messages[-1].content == "from this window"


async def test_sampling_settings_travel_with_a_chat_and_flags_win(tmp_path: Path) -> None:
    from influence_tui.tui.app import InfluenceApp

    hot = write_chat(folder(), "hot.json", "A chat with its own settings", max_tokens=3, temperature=1.7)
    settings = Settings.load(flags={"max_tokens": 64})  # as `influence chat --max-tokens 64`
    app = InfluenceApp(settings, autoload=False)
    async with app.run_test(size=SIZE) as pilot:
        own = (settings.temperature, settings.max_tokens)
        await open_list(pilot)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat_path == hot.resolve(), what="the chat")
        assert (settings.temperature, settings.max_tokens) == (1.7, 64)  # the chat's, but the flag's max_tokens
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: not app.conversation.messages, what="the new chat")
        assert (settings.temperature, settings.max_tokens) == own  # back to the user's own


async def test_rename_starts_from_the_full_name_and_keeps_the_chats_place() -> None:
    long_name = "Project Alpha: notes on the migration of the billing service to the new cluster"
    named = write_chat(folder(), "named.json", "Q1", age_s=600, title=long_name)
    untitled = write_chat(folder(), "untitled.json", "What is the airspeed velocity of an unladen swallow, roughly?",
                          age_s=1200)
    newest = write_chat(folder(), "newest.json", "Q3", age_s=10)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        chats = await open_list(pilot)
        await pilot.press("down")
        await wait_until(pilot, lambda: chats.selected() is not None and chats.selected().path == named, what="row 2")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.screen.id == "rename-chat", what="the rename box")
        assert app.screen.query_one("#rename-input").value == long_name  # whole, not the list's cut title
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen), what="the list")
        assert load_session(named).title == long_name
        await pilot.press("down")
        await wait_until(pilot, lambda: chats.selected().path == untitled, what="row 3")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.screen.id == "rename-chat", what="the rename box")
        assert app.screen.query_one("#rename-input").value == ""  # untitled: nothing to cut into a name
        app.screen.query_one("#rename-input").value = "Swallows"
        await pilot.press("enter")
        await wait_until(pilot, lambda: chats.loaded and [e.title for e in chats.shown][2:] == ["Swallows"], what="the list")
        assert [e.path for e in chats.shown] == [newest, named, untitled]  # a rename is not a change: same order
        assert chats.selected().path == untitled  # and the row stays selected


async def test_a_chats_folder_that_is_a_file_is_said_by_name(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    app = make_app(settings=make_settings(chats_dir=str(blocker)))
    async with app.run_test(size=SIZE) as pilot:
        app.conversation.add("user", "hello")
        assert app.autosave() is None
        await pilot.pause()
        assert notified(app, "is a file, not a folder")
        chats = await open_list(pilot)
        assert "is a file, not a folder" in str(chats.query_one("#chats-list").get_option_at_index(0).prompt)


async def test_a_new_chats_folder_takes_the_open_chat(tmp_path: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.conversation.add("user", "Which folder am I in?")
        old = app.autosave()
        assert old is not None and old.parent == folder()
        await pilot.press("f5")
        await pilot.pause()
        app.screen.query_one("#set-chats_dir").value = str(tmp_path / "elsewhere")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: notified(app, "now kept in"), what="the move")
        assert app.chat_path is not None and app.chat_path.parent == (tmp_path / "elsewhere").resolve()
        assert load_session(app.chat_path).messages[0].content == "Which folder am I in?"
    assert old.exists()  # the chats saved before stay where they were


# -- and what a second review found ------------------------------------------------------------------
async def test_save_on_exit_to_an_existing_file_with_another_chat_open(tmp_path: Path) -> None:
    opened = write_chat(folder(), "latest.json", "The latest chat", age_s=5)
    out = write_chat(tmp_path, "out.json", "An older export")
    app = make_app(continue_latest=True, save_on_exit=str(out))  # `influence chat -c --save-on-exit OUT`
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        app.conversation.add("user", "one more")
        assert app.autosave() == out
        await pilot.pause()
        assert not notified(app, "another window")
    assert [m.content for m in load_session(out).messages] == ["The latest chat", "An answer.", "one more"]
    assert len(load_session(opened).messages) == 2  # the chat it came from is as it was


async def test_save_on_exit_with_save_chats_off_says_new_chats_are_not_kept(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    app = make_app(settings=make_settings(save_chats=False), save_on_exit=str(out))
    async with app.run_test(size=SIZE) as pilot:
        app.conversation.add("user", "kept in out")
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: notified(app, "new ones are not kept (save_chats is off"), what="the note")
    assert load_session(out).messages[0].content == "kept in out"


async def test_a_rename_or_delete_in_another_window_is_not_undone() -> None:
    for change in ("rename", "delete"):
        path = write_chat(folder(), f"{change}.json", f"Shared for a {change}", age_s=60)
        app = make_app(session_path=str(path))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
            if change == "rename":
                rename_chat(path, "Named elsewhere")  # (keeps the file's time: only its inode tells)
            else:
                delete_chat(path)
            app.conversation.add("user", "from this window")
            written = app.autosave()
            await pilot.pause()
            assert written is not None and written != path and notified(app, "was changed by another window" if change == "rename" else "was deleted by another window")
        if change == "rename":
            assert load_session(path).title == "Named elsewhere" and len(load_session(path).messages) == 2
        else:
            assert not path.exists()


async def test_settings_saved_while_a_chat_applies_keep_the_users_own_values() -> None:
    write_chat(folder(), "hot.json", "A chat with its own settings", temperature=1.7, top_k=7)
    settings = make_settings(temperature=0.2, top_k=None)
    app = make_app(settings=settings, continue_latest=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        assert (settings.temperature, settings.top_k) == (1.7, 7)
        await pilot.press("f5")
        await pilot.pause()
        app.screen.query_one("#set-seed").value = "42"  # the only field edited
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: notified(app, "Saved to"), what="the save")
        stored = json.loads(Path(os.environ["INFLUENCE_CONFIG_DIR"], "settings.json").read_text())
        assert (stored["temperature"], stored["top_k"], stored["seed"]) == (0.2, None, 42)
        assert (settings.temperature, settings.top_k) == (1.7, 7)  # the chat's still apply to it
        await pilot.press("f2", "ctrl+n")
        await wait_until(pilot, lambda: not app.conversation.messages, what="the new chat")
        assert (settings.temperature, settings.top_k, settings.seed) == (0.2, None, 42)


async def test_keys_right_after_typing_act_on_the_searched_list() -> None:
    write_chat(folder(), "dragon.json", "A dragon story", age_s=5)
    banana = write_chat(folder(), "banana.json", "Banana bread recipe", age_s=500)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_list(pilot)
        await pilot.press(*"banana", "enter")  # within the search's delay
        await wait_until(pilot, lambda: app.chat_path == banana.resolve(), what="the searched chat")


async def test_save_on_exit_into_the_chats_folder_is_the_listed_chat() -> None:
    mine = folder() / "mine.json"
    app = make_app(save_on_exit=str(mine))
    async with app.run_test(size=SIZE) as pilot:
        app.conversation.add("user", "kept in mine")
        assert app.autosave() == mine
        await delete_the_open_chat(pilot, mine)
    assert not mine.exists()


async def test_quitting_while_the_answer_waits_keeps_the_question() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.model_state = "loading"
        await send(pilot, "A question typed while the model loads")
        await wait_until(pilot, lambda: chat(app).busy, what="the wait")
        await pilot.press("ctrl+q")
    [path] = folder().glob("*.json")
    saved = load_session(path)
    assert [m.role for m in saved.messages] == ["user", "assistant"] and saved.messages[1].stopped


async def test_renaming_the_open_chat_keeps_its_place_after_leaving_it() -> None:
    opened = write_chat(folder(), "open.json", "The open chat", age_s=900)
    newer = write_chat(folder(), "newer.json", "A newer chat", age_s=60)
    app = make_app(session_path=str(opened))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        await send(pilot, "/rename Renamed by command")
        chats = await open_list(pilot)
        assert [e.path for e in chats.shown] == [newer, opened]
        await pilot.press("down", "ctrl+r")
        await wait_until(pilot, lambda: app.screen.id == "rename-chat", what="the rename box")
        assert app.screen.query_one("#rename-input").value == "Renamed by command"
        app.screen.query_one("#rename-input").value = "Renamed in the list"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen) and chats.loaded
                         and chats.shown[1].title == "Renamed in the list", what="the rename")
        await pilot.press("ctrl+n")  # (leaving it)
    assert load_session(opened).title == "Renamed in the list"
    entries, _ = list_chats(folder())
    assert [e.path for e in entries] == [newer, opened]  # not moved up by the renames, nor by leaving it


# -- and a third ------------------------------------------------------------------------------------
async def test_edit_takes_back_the_unanswered_question_and_an_edit_given_up_loses_nothing() -> None:
    path = write_chat(folder(), "two.json", "Q1", "A1")
    session = load_session(path)
    session.messages += [SessionMessage("user", "Q2"), SessionMessage("assistant", "A2")]
    save_session(path, session)
    app = make_app(session_path=str(path))  # no model: a question sent now gets no answer
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app.conversation.messages) == 4, what="the chat")
        await send(pilot, "Q3")
        await wait_until(pilot, lambda: not chat(app).busy and chat(app)._unanswered == "Q3", what="the failed question")
        await send(pilot, "/edit")
        prompt = app.screen.query_one("PromptInput")
        assert prompt.text == "Q3" and [m.content for m in app.conversation.messages] == ["Q1", "A1", "Q2", "A2"]
        prompt.text = ""
        await send(pilot, "/edit")  # now the last exchange: held in the saved chat until a new message
        assert prompt.text == "Q2" and [m.content for m in app.conversation.messages] == ["Q1", "A1"]
        assert len(app.screen.query("UserMessage")) == 1
        await pilot.press("ctrl+n")  # the edit given up
        await wait_until(pilot, lambda: not app.conversation.messages, what="the new chat")
    assert [m.content for m in load_session(path).messages] == ["Q1", "A1", "Q2", "A2"]
    app = make_app(session_path=str(path))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        await send(pilot, "/edit")
        app.conversation.add("user", "Q2, edited")  # (what sending it does, before its answer)
        app.autosave()
    assert [m.content for m in load_session(path).messages] == ["Q1", "A1", "Q2, edited"]


async def test_renaming_the_open_chat_keeps_another_windows_turns() -> None:
    path = write_chat(folder(), "x.json", "Q1", "A1", age_s=60)
    for how in ("/rename", "list"):
        before = [m.content for m in load_session(path).messages]
        app = make_app(session_path=str(path))
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
            other = load_session(path)
            other.messages.append(SessionMessage("user", f"from the other window ({how})"))
            save_session(path, other)
            if how == "/rename":
                await send(pilot, "/rename Foo")
            else:
                chats = await open_list(pilot)
                await wait_until(pilot, lambda: chats.selected() is not None, what="a row")
                await pilot.press("ctrl+r")
                await wait_until(pilot, lambda: app.screen.id == "rename-chat", what="the rename box")
                app.screen.query_one("#rename-input").value = "Foo"
                await pilot.press("enter")
                await wait_until(pilot, lambda: isinstance(app.screen, ChatsScreen), what="the list")
                await pilot.press("escape")
            await wait_until(pilot, lambda: notified(app, "changed by another window"), what="the fork")
        assert load_session(path).messages[-1].content == f"from the other window ({how})"
        forked = [p for p in folder().glob("*.json") if p != path and load_session(p).title == "Foo"]
        assert forked and [m.content for m in load_session(forked[0]).messages] == before
        forked[0].unlink()


async def test_set_in_an_opened_chat_is_the_users_own_too() -> None:
    write_chat(folder(), "cold.json", "A cold chat", temperature=0.2)
    settings = make_settings(temperature=0.7)
    app = make_app(settings=settings, continue_latest=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        assert settings.temperature == 0.2
        await send(pilot, "/set temperature 0.9")
        await pilot.press("f5")
        await pilot.pause()
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: notified(app, "Saved to"), what="the save")
        stored = json.loads(Path(os.environ["INFLUENCE_CONFIG_DIR"], "settings.json").read_text())
        assert stored["temperature"] == 0.9
        await pilot.press("f2", "ctrl+n")
        await wait_until(pilot, lambda: not app.conversation.messages, what="the new chat")
        assert settings.temperature == 0.9
    [cold] = [p for p in folder().glob("*.json")]
    assert load_session(cold).temperature == 0.9  # and the chat carries it


async def test_save_to_the_file_a_chat_is_kept_in_is_not_another_window(tmp_path: Path) -> None:
    mine = write_chat(tmp_path, "mine.json", "Q1")
    app = make_app(session_path=str(mine), save_on_exit=str(mine))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.conversation.messages, what="the chat")
        app.conversation.add("user", "Q2")
        await send(pilot, f"/save {mine}")
        app.conversation.add("assistant", "A2")
        assert app.autosave() == mine
        await pilot.pause()
        assert not notified(app, "another window")
    assert not (tmp_path / "mine-2.json").exists() and len(load_session(mine).messages) == 4


def test_transcripts_close_tilde_blocks_and_escape_underlined_headings() -> None:
    from influence_tui.sessions import session_markdown

    session = Session(messages=[SessionMessage("user", "Summarize this\n---\nand this\n===\n- a list item"),
                                SessionMessage("assistant", "~~~text\ncut off", stopped=True),
                                SessionMessage("user", "next")])
    text = session_markdown(session, "T")
    assert "Summarize this\n\\---\nand this\n\\===\n- a list item" in text
    assert "~~~text\ncut off\n~~~\n\n## You\n\nnext" in text


def test_influence_config_names_the_chats_folder_in_use(tmp_path: Path) -> None:
    out = run_cli("config", "--json", chats=tmp_path / "c")
    assert json.loads(out.stdout)["chats_folder"] == str((tmp_path / "c").resolve())
    out = run_cli("config", chats=tmp_path / "c")
    assert f"chats folder: {(tmp_path / 'c').resolve()}" in out.stdout


async def test_retry_after_edit_answers_the_question_taken_back() -> None:
    path = write_chat(folder(), "retry.json", "Q1", "A1")
    session = load_session(path)
    session.messages += [SessionMessage("user", "Q2"), SessionMessage("assistant", "A2")]
    save_session(path, session)
    app = make_app(session_path=str(path))  # no model: the retried answer fails, which is enough here
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app.conversation.messages) == 4, what="the chat")
        await send(pilot, "/edit")
        assert [m.content for m in app.conversation.messages] == ["Q1", "A1"]
        app.screen.query_one("PromptInput").text = ""
        await send(pilot, "/retry")
        await wait_until(pilot, lambda: not chat(app).busy and chat(app)._unanswered == "Q2", what="the retry of Q2")
        assert [m.content for m in app.conversation.messages] == ["Q1", "A1"] and not app.conversation.held
