"""The chat shows a reasoning model's thinking folded above its answer: streamed, timed, foldable,
kept in sessions, never sent back to the model; `think` off in /set and in Settings.

Driven with Pilot over a real Engine holding the tiny built thinker (tests/tiny_models.py), whose
greedy answer is always THINKER_REASONING in a think block, then THINKER_ANSWER.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from influence_tui.sessions import Session, SessionError, SessionMessage, load_session, save_session
from influence_tui.tui.app import InfluenceApp
from influence_tui.tui.widgets.messages import AssistantMessage, ThinkingSection
from tests.test_tui import make_settings, notes, send, wait_until

pytest.importorskip("torch")  # the tiny thinker is written with transformers

from tests.tiny_models import THINKER_ANSWER, THINKER_REASONING, engine_on, write_tiny_thinker  # noqa: E402

SIZE = (100, 32)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with engine_on(write_tiny_thinker(tmp_path_factory.mktemp("thinker"))) as engine:
        yield engine


def make_app(engine: Any, **changes: Any) -> InfluenceApp:
    return InfluenceApp(make_settings(max_tokens=20, **changes), engine=engine, autoload=True)


def answers(app: InfluenceApp) -> list[AssistantMessage]:
    return list(app.screen.query(AssistantMessage))


async def ask(pilot: Any, text: str = "What is six times seven?") -> AssistantMessage:
    app = pilot.app
    done = app.answers_done
    await send(pilot, text)
    await wait_until(pilot, lambda: app.answers_done == done + 1, timeout=60, what="the answer")
    await pilot.pause()
    return answers(app)[-1]


def assert_folded_reasoning(bubble: AssistantMessage, title_start: str) -> ThinkingSection:
    section = bubble.thinking_section
    assert section is not None and section.is_mounted
    assert section.collapsed and section.title.startswith(title_start)
    assert section.source == THINKER_REASONING
    assert not section.body.region  # folded: nothing of it is drawn
    assert bubble.markdown.source == THINKER_ANSWER  # the answer's own markdown, without the reasoning
    return section


# -- the chat with the tiny thinker -------------------------------------------------------------
async def test_reasoning_streams_into_a_section_that_folds_when_the_answer_starts(thinker: Any) -> None:
    app = make_app(thinker)
    async with app.run_test(size=SIZE) as pilot:
        bubble = await ask(pilot)
        section = assert_folded_reasoning(bubble, "Thought for ")
        assert section.title.endswith(" s") and bubble.thought_s is not None
        assert "tokens" in str(bubble.stats.render())
        assert len(bubble.query(ThinkingSection)) == 1
        # the history holds the answer, its reasoning apart; the model gets the answer only
        message = app.conversation.messages[-1]
        assert (message.role, message.content, message.thinking) == ("assistant", THINKER_ANSWER, THINKER_REASONING)
        assert [m.content for m in app.conversation.engine_messages()] == ["What is six times seven?", THINKER_ANSWER]
        # the keyboard opens and closes it: focus its title, Enter
        section.query_one("CollapsibleTitle").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: not section.collapsed and section.body.region.height > 0,
                         timeout=10, what="the section to open")
        assert THINKER_REASONING in "".join(str(b.render()) for b in section.body.children)
        await pilot.press("enter")
        await wait_until(pilot, lambda: section.collapsed, timeout=10, what="the section to close")
        # and the mouse
        await pilot.click(section.query_one("CollapsibleTitle"))
        await wait_until(pilot, lambda: not section.collapsed, timeout=10, what="a click to open it")
        # /copy copies the answer, not the reasoning
        await send(pilot, "/copy")
        assert app.last_copied == THINKER_ANSWER
        # the next turn: the earlier answer goes back without its reasoning
        second = await ask(pilot, "Sure?")
        assert_folded_reasoning(second, "Thought for ")
        sent = app.conversation.engine_messages()
        assert [m.content for m in sent] == ["What is six times seven?", THINKER_ANSWER, "Sure?", THINKER_ANSWER]
        assert not any(THINKER_REASONING in m.content for m in sent)


async def test_think_off_answers_without_a_section(thinker: Any) -> None:
    app = make_app(thinker)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "/set think off")
        assert app.settings.think is False and "think = off" in notes(app)[-1]
        bubble = await ask(pilot)
        assert bubble.markdown.source == THINKER_ANSWER
        assert bubble.thinking_section is None and not bubble.query(ThinkingSection)
        assert app.conversation.messages[-1].thinking == ""
        await send(pilot, "/set think on")
        assert app.settings.think is True
        assert (await ask(pilot)).thinking_section is not None
        await send(pilot, "/set think maybe")
        assert app.settings.think is True and "expected on or off" in notes(app)[-1]
        await pilot.press("ctrl+t")  # the key, with the prompt focused
        await wait_until(pilot, lambda: app.settings.think is False, timeout=10, what="ctrl+t to turn thinking off")
        assert "think = off" in notes(app)[-1] and (await ask(pilot)).thinking_section is None
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.settings.think is True, timeout=10, what="ctrl+t to turn it on")


async def test_a_saved_session_keeps_the_reasoning_and_shows_it_folded_again(thinker: Any, tmp_path: Path) -> None:
    app = make_app(thinker)
    async with app.run_test(size=SIZE) as pilot:
        await ask(pilot)
        await send(pilot, f"/save {tmp_path / 'chat.json'}")
        saved = json.loads((tmp_path / "chat.json").read_text())
        user, assistant = saved["messages"]
        assert "thinking" not in user
        assert (assistant["content"], assistant["thinking"]) == (THINKER_ANSWER, THINKER_REASONING)
        await send(pilot, "/clear")
        assert not answers(app)
        await send(pilot, f"/load {tmp_path / 'chat.json'}")
        (bubble,) = answers(app)
        await pilot.pause()
        section = assert_folded_reasoning(bubble, "Thought")
        assert app.conversation.messages[-1].thinking == THINKER_REASONING
        await send(pilot, "/history")
        history = notes(app)[-1]
        assert THINKER_ANSWER in history and THINKER_REASONING not in history and "reasoning" in history
        assert section.body.source == ""  # folded and never opened: not parsed (long sessions load fast)
        section.query_one("CollapsibleTitle").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: section.body.region.height > 0, timeout=10, what="the section to open")
        assert section.body.source == THINKER_REASONING


async def test_the_settings_screen_switches_thinking(thinker: Any) -> None:
    from influence_tui.config import Settings, settings_file

    app = make_app(thinker)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await pilot.pause()
        field = app.screen.query_one("#set-think")
        assert field.value == "on"
        field.value = "perhaps"
        await pilot.pause()
        assert "expected on or off" in str(app.screen.query_one("#err-think").render())
        field.value = "off"
        await pilot.press("ctrl+s")
        assert app.settings.think is False
        assert json.loads(settings_file().read_text())["think"] is False
        await pilot.press("f2")
        await pilot.pause()
        bubble = await ask(pilot)
        assert bubble.thinking_section is None and bubble.markdown.source == THINKER_ANSWER
    assert Settings.load().think is False


# -- a model that does not reason looks as before -------------------------------------------------
@pytest.mark.slow
async def test_the_bundled_model_answers_without_a_section() -> None:
    from influence_tui.config import Settings
    from influence_tui.engine import Engine

    engine = Engine(Settings(warmup_tokens=0))
    engine.load("smollm2")
    try:
        app = InfluenceApp(make_settings(max_tokens=6), engine=engine, autoload=True)
        async with app.run_test(size=SIZE) as pilot:
            bubble = await ask(pilot, "Hello")
            assert bubble.text and bubble.thinking_section is None and not bubble.query(ThinkingSection)
            assert app.conversation.messages[-1].thinking == ""
    finally:
        engine.shutdown()


async def test_the_widget_opens_the_section_while_thinking_and_folds_it_at_the_answer() -> None:
    """The live steps, one at a time (the tiny thinker is too quick to catch them)."""
    from textual.app import App

    class One(App[None]):
        def compose(self) -> Any:
            yield AssistantMessage()

    async with One().run_test() as pilot:
        bubble = pilot.app.query_one(AssistantMessage)
        bubble.start()
        bubble.feed("", "Let me ")
        await wait_until(pilot, lambda: bubble.thinking_section is not None and bubble.thinking_section.is_mounted,
                         timeout=10, what="the section")
        section = bubble.thinking_section
        assert not section.collapsed and section.title == "Thinking…"
        bubble.feed("", "see.")
        await wait_until(pilot, lambda: section.body.source == "Let me see.", timeout=10, what="more reasoning")
        assert not bubble.markdown.source
        bubble.feed("Four.")
        await wait_until(pilot, lambda: section.collapsed, timeout=10, what="the fold")
        assert section.title.startswith("Thought for ")
        await bubble.finish("1 tokens")
        assert (bubble.text, bubble.thinking, bubble.markdown.source) == ("Four.", "Let me see.", "Four.")
        # an answer without reasoning gets no section
        plain = AssistantMessage()
        await pilot.app.mount(plain)
        plain.start()
        plain.feed("Just an answer.")
        await plain.finish("3 tokens")
        assert plain.thinking_section is None and not plain.query(ThinkingSection)
        assert not AssistantMessage("from a file").thinking_section  # history without reasoning: none either
        # an answer cut off while thinking: the reasoning is all there is, so it stays open
        cut = AssistantMessage()
        await pilot.app.mount(cut)
        cut.start()
        cut.feed("", "First, the ")
        await wait_until(pilot, lambda: cut.thinking_section is not None and cut.thinking_section.is_mounted,
                         timeout=10, what="the cut answer's section")
        cut.feed("", "numbers")
        await cut.finish("2 tokens (length)")
        assert not cut.thinking_section.collapsed and cut.thinking_section.title.startswith("Thought for ")
        assert cut.thinking_section.body.source == "First, the numbers" and cut.text == ""


# -- session files --------------------------------------------------------------------------------
def test_session_files_keep_thinking_only_when_there_is_some(tmp_path: Path) -> None:
    session = Session(messages=[SessionMessage("user", "q"), SessionMessage("assistant", "a", thinking="hmm"),
                                SessionMessage("assistant", "b")])
    path = save_session(tmp_path / "s.json", session)
    raw = json.loads(path.read_text())["messages"]
    assert raw[1]["thinking"] == "hmm" and "thinking" not in raw[0] and "thinking" not in raw[2]
    assert load_session(path).messages == session.messages
    # the original tool's messages (no such key) load as before
    (tmp_path / "old.json").write_text(json.dumps({"messages": [{"role": "assistant", "content": "Arr!"}]}))
    assert load_session(tmp_path / "old.json").messages[0].thinking == ""
    (tmp_path / "bad.json").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x", "thinking": 3}]}))
    with pytest.raises(SessionError, match="thinking"):
        load_session(tmp_path / "bad.json")
