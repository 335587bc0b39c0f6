"""Reasoning models: their <think> text comes apart from the answer, in the engine, for every client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from influence_tui.engine.reasoning import ThinkSplitter, opens_thinking, without_thinking

pytest.importorskip("torch")  # the tiny thinker is written with transformers

from influence_tui.engine import ChatMessage, GenerationRequest  # noqa: E402
from influence_tui.params import GenerationParams  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tests.tiny_models import THINKER_ANSWER, THINKER_REASONING, engine_on, write_tiny_thinker  # noqa: E402

GREEDY = GenerationParams().with_(temperature=0.0, max_tokens=20)


def _split(text: str, inside: bool, step: int) -> tuple[str, str]:
    splitter, thinking, answer = ThinkSplitter(inside), "", ""
    for i in range(0, len(text), step):
        t, a = splitter.feed(text[i : i + step])
        thinking, answer = thinking + t, answer + a
    t, a = splitter.flush()
    return thinking + t, answer + a


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])  # tags split across tokens anywhere
@pytest.mark.parametrize(("text", "inside", "expected"), [
    ("\nHmm.\n</think>\n\nThe answer.", True, ("Hmm.", "The answer.")),  # R1: the prompt opened the block
    ("<think>\nweigh a, b\n</think>\n\nB.", False, ("weigh a, b", "B.")),  # the model opens it itself
    ("  \n<think>x</think>y", False, ("x", "y")),
    ("Plain text with <think> in it", False, ("", "Plain text with <think> in it")),  # only at the start
    ("a </thinking> and </thin", True, ("a </thinking> and </thin", "")),  # cut off while thinking
    ("<thi", False, ("", "<thi")),  # a tag's start that never finished is text
    (" Hello", False, ("", " Hello")),
])
def test_the_splitter_finds_the_block_wherever_tokens_cut_it(text, inside, expected, step):
    assert _split(text, inside, step) == expected


def test_a_prompt_opens_or_closes_the_block():
    assert opens_thinking("<|Assistant|><think>\n") and not opens_thinking("<|Assistant|>")
    assert without_thinking("A<think>\n") == "A<think>\n\n</think>\n\n"
    assert without_thinking("A<think>\n\n</think>\n\n") == "A<think>\n\n</think>\n\n"  # Qwen3 closed it already
    assert without_thinking("A: ") == "A: <think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory):
    return write_tiny_thinker(tmp_path_factory.mktemp("thinker"))


@pytest.fixture(scope="module")
def thinker(thinker_dir):
    with engine_on(thinker_dir) as engine:
        yield engine


def _ask(engine, **kwargs):
    stream = engine.submit(GenerationRequest(messages=[ChatMessage("user", "What is six times seven?")],
                                             params=kwargs.pop("params", GREEDY), **kwargs))
    events = list(stream)
    return events, stream.result


def test_a_reasoning_models_thinking_streams_apart_from_its_answer(thinker):
    events, result = _ask(thinker)
    assert (result.thinking, result.text, result.finish_reason) == (THINKER_REASONING, THINKER_ANSWER, "stop")
    assert "".join(e.thinking for e in events) == THINKER_REASONING
    assert "".join(e.text for e in events) == THINKER_ANSWER
    first_answer = next(i for i, e in enumerate(events) if e.text)
    assert all(not e.thinking for e in events[first_answer:])  # the reasoning came first, the tags never


def test_told_not_to_think_it_answers_straight_away(thinker):
    _, result = _ask(thinker, think=False)
    assert (result.thinking, result.text) == ("", THINKER_ANSWER)
    assert result.usage.completion_tokens == 2  # the answer and the end of turn: no reasoning tokens


def test_an_answer_cut_off_while_thinking_keeps_its_reasoning(thinker):
    _, result = _ask(thinker, params=GREEDY.with_(max_tokens=1))
    assert (result.thinking, result.text, result.finish_reason) == (THINKER_REASONING, "", "length")


def test_a_model_that_opens_the_block_itself_as_qwen3_does(tmp_path):
    """Qwen3's template leaves "<think>" to the model and takes enable_thinking=False to close an
    empty block itself (not closed twice)."""
    with engine_on(write_tiny_thinker(tmp_path / "qwen3-style", style="qwen3"), max_batch=1) as engine:
        _, result = _ask(engine)
        assert (result.thinking, result.text) == (THINKER_REASONING, THINKER_ANSWER)
        _, quiet = _ask(engine, think=False)
        assert (quiet.thinking, quiet.text, quiet.usage.completion_tokens) == ("", THINKER_ANSWER, 2)
        assert quiet.usage.prompt_tokens == result.usage.prompt_tokens + 4  # <think> "\n\n" </think> "\n\n", once


def test_think_tags_marked_special_still_split(tmp_path):
    """A vocabulary may mark the tags special (a GGUF's CONTROL type): decoding skips special
    tokens, but not those two, or the whole answer would read as reasoning."""
    with engine_on(write_tiny_thinker(tmp_path / "special", special_tags=True), max_batch=1) as engine:
        _, result = _ask(engine)
        assert (result.thinking, result.text) == (THINKER_REASONING, THINKER_ANSWER)


def test_a_raw_prompt_is_the_callers_to_read(thinker):
    result = thinker.submit(GenerationRequest(prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n",
                                              raw=True, params=GREEDY)).wait()
    assert result.thinking == "" and result.text == f"{THINKER_REASONING}</think>\n\n{THINKER_ANSWER}"


def test_earlier_reasoning_does_not_go_back_to_the_model(thinker, thinker_dir):
    """The template drops an earlier answer's reasoning, as DeepSeek-R1's does: the next turn's
    prompt holds the answer only."""
    _, first = _ask(thinker)
    history = [ChatMessage("user", "What is six times seven?"),
               ChatMessage("assistant", f"<think>{first.thinking}</think>{first.text}"), ChatMessage("user", "Sure?")]
    second = thinker.submit(GenerationRequest(messages=history, params=GREEDY)).wait()
    reasoning = Tokenizer.from_file(str(thinker_dir / "tokenizer.json")).token_to_id(THINKER_REASONING)
    assert second.context.count(reasoning) == 1  # this answer's, not the first's
    assert (second.thinking, second.text) == (THINKER_REASONING, THINKER_ANSWER)


# --- the command line ------------------------------------------------------------------------------
def _influence(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_answer_on_stdout_and_the_thinking_on_stderr(thinker_dir):
    """`influence generate … > answer.txt` keeps the answer alone; the person at the terminal sees
    the model think."""
    out = _influence("generate", "-m", str(thinker_dir), "--temperature", "0", "What is six times seven?")
    assert out.returncode == 0, out.stderr
    assert out.stdout == THINKER_ANSWER + "\n"
    assert f"Thinking...\n{THINKER_REASONING}\n...done thinking." in out.stderr
    hidden = _influence("generate", "-m", str(thinker_dir), "--temperature", "0", "--hide-thinking", "Hi")
    assert hidden.stdout == THINKER_ANSWER + "\n" and THINKER_REASONING not in hidden.stderr
    off = _influence("--think", "off", "generate", "-m", str(thinker_dir), "--temperature", "0", "--json", "Hi")
    row = json.loads(off.stdout)
    assert row["text"] == THINKER_ANSWER and "thinking" not in row and row["completion_tokens"] == 2
    on = json.loads(_influence("generate", "-m", str(thinker_dir), "--temperature", "0", "--json", "Hi").stdout)
    assert (on["thinking"], on["text"]) == (THINKER_REASONING, THINKER_ANSWER)


def test_an_answer_cut_off_while_thinking_says_why_it_is_empty(thinker_dir):
    out = _influence("generate", "-m", str(thinker_dir), "--temperature", "0", "--max-tokens", "1", "--hide-thinking", "Hi")
    assert out.returncode == 0 and out.stdout == "\n"
    assert out.stderr.strip() == ("note: the model was still thinking after 1 tokens, so there is no answer: "
                                  "raise --max-tokens, or --think off")
    shown = _influence("generate", "-m", str(thinker_dir), "--temperature", "0", "--max-tokens", "1", "Hi")
    assert f"Thinking...\n{THINKER_REASONING}\n" in shown.stderr and "done thinking" not in shown.stderr


def test_batch_rows_carry_the_thinking_and_a_line_may_turn_it_off(thinker_dir):
    lines = '{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi", "think": false}\n'
    out = _influence("-m", str(thinker_dir), "--temperature", "0", "--batch", "-", stdin=lines)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["id"], r.get("thinking"), r["text"]) for r in rows] == [
        ("a", THINKER_REASONING, THINKER_ANSWER), ("b", None, THINKER_ANSWER)]
    bad = _influence("-m", str(thinker_dir), "--batch", "-", stdin='{"prompt": "Hi", "think": "no"}\n')
    assert bad.returncode == 1 and "line 1: think must be true or false" in bad.stderr


def test_a_bad_think_setting_is_one_line():
    out = _influence("--think", "maybe", "generate", "Hi")
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: --think='maybe' is not valid: expected on or off (true/false, yes/no, 1/0)")
