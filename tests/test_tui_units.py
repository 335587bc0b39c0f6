"""The app's pure parts: slash-command parsing and completion, the statistics line."""

from __future__ import annotations

import pytest

from influence_tui.engine.types import Result, Usage
from influence_tui.tui import slash
from influence_tui.tui.screens.chat import format_stats


def test_parse_and_validate() -> None:
    assert slash.parse("/save  chats/a.json ").arg == "chats/a.json"
    assert slash.parse("/SET temperature 0.5").name == "/set"
    for bad, words in (("/nope", "unknown command /nope"), ("/save", "/save needs FILE"), ("/clear now", "takes no argument"),
                       ("/set temperature", "usage: /set NAME VALUE"), ("/set heat 1", "unknown setting"),
                       ("/copy all", "`code`")):
        with pytest.raises(slash.SlashError, match=words):
            slash.parse(bad)
    assert not slash.is_command("hello /save") and not slash.is_command("//literal slash")


def test_completion() -> None:
    assert slash.complete("/s") == ["/save", "/set", "/system"]
    assert slash.complete("/set te") == ["/set temperature "]
    assert slash.complete("/q") == ["/quit"]
    assert slash.complete("hello") == []


def test_last_code_block() -> None:
    text = "a\n```py\nx = 1\n```\nb\n~~~\ny = 2\n~~~\n"
    assert slash.last_code_block(text) == "y = 2"
    assert slash.last_code_block("```\nunclosed\nstill") == "unclosed\nstill"
    assert slash.last_code_block("no code") is None


def test_stats_line_shows_speed_context_and_dropped_turns() -> None:
    usage = Usage(prompt_tokens=900, completion_tokens=101, dropped_tokens=350, context_length=1024, ttft_s=0.25, decode_s=2.0)
    line = format_stats(Result("x", "length", usage))
    assert "101 tokens" in line and "50.0 tok/s" in line and "first token 0.25s" in line
    assert "context 1001/1024" in line and "max_tokens" in line
    assert "350 tokens of old turns were dropped" in line
    stopped = format_stats(Result("x", "cancelled", Usage(completion_tokens=3)))
    assert stopped.startswith("⏹ stopped")


def test_launch_maps_chat_flags_onto_the_app() -> None:
    from influence_tui.cli import build_parser, settings_from_args
    from influence_tui.tui.launch import build_app

    args = build_parser().parse_args(["chat", "-m", "smollm2", "--system", "Be brief.", "--temperature", "0.2",
                                      "--session", "in.json", "--save-on-exit", "out.json"])
    app = build_app(args, settings_from_args(args))
    assert (app.model_request, app.session_path, app.save_on_exit_path) == ("smollm2", "in.json", "out.json")
    assert app.conversation.system_prompt == "Be brief." and app.settings.temperature == 0.2
    bare = build_parser().parse_args([])
    assert build_app(bare, settings_from_args(bare)).save_on_exit_path is None
