"""Tool calls: tools go into the prompt through the chat template, calls come back parsed."""

from __future__ import annotations

import pytest

from influence_tui.engine.tools import ToolCallParser

pytest.importorskip("torch")  # the tiny tool caller is written with transformers

from tokenizers import Tokenizer  # noqa: E402

from influence_tui.engine import ChatMessage, GenerationRequest, ToolCall  # noqa: E402
from influence_tui.params import GenerationParams  # noqa: E402
from tests.tiny_models import WEATHER_TOOL, engine_on, write_tiny_tool_caller  # noqa: E402

GREEDY = GenerationParams().with_(temperature=0.0, max_tokens=30)
PARIS = {"city": "Paris", "unit": "celsius"}


def _parse(text: str, step: int) -> tuple[str, list[tuple[str, dict]]]:
    parser, out = ToolCallParser(), ""
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    out += parser.flush()
    return out, [(c.name, c.arguments) for c in parser.calls]


@pytest.mark.parametrize("step", [1, 3, 1000])  # tags and JSON cut across tokens anywhere
@pytest.mark.parametrize(("text", "expected"), [
    ('<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call>', ("", [("w", {"c": "P"})])),  # Hermes, Qwen
    ('Checking.\n<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}'
     '</tool_call>', ("Checking.\n", [("a", {}), ("b", {"x": 1})])),  # text first; arguments as a JSON string
    ('{"name": "get", "parameters": {"q": 1}}', ("", [("get", {"q": 1})])),  # Llama 3.x
    ('[TOOL_CALLS] [{"name": "a", "arguments": {"k": [1]}}]', ("", [("a", {"k": [1]})])),  # Mistral
    ("Just text.", ("Just text.", [])),
    ('{"answer": 42}', ('{"answer": 42}', [])),  # JSON that is not a call is the answer
    ("<tool_call>not json</tool_call> then", ("<tool_call>not json</tool_call> then", [])),
    ("<tool_call>cut off", ("<tool_call>cut off", [])),
    ("[a link](x)", ("[a link](x)", [])),
])
def test_calls_are_read_out_of_the_answer_wherever_tokens_cut_it(text, expected, step):
    assert _parse(text, step) == expected


@pytest.fixture(scope="module")
def caller_dir(tmp_path_factory):
    return write_tiny_tool_caller(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def caller(caller_dir):
    with engine_on(caller_dir) as engine:
        yield engine


QUESTION = ChatMessage("user", "What is the weather in Paris?")


def test_a_model_calls_a_tool_it_was_given(caller):
    stream = caller.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL]))
    events = list(stream)
    result = stream.result
    assert result.finish_reason == "stop" and result.text == "" and not any(e.text for e in events)
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", PARIS)]
    assert caller.status().model.tools


def test_the_tools_and_a_calls_result_reach_the_prompt(caller, caller_dir):
    tok = Tokenizer.from_file(str(caller_dir / "tokenizer.json"))
    history = [QUESTION, ChatMessage("assistant", "", tool_calls=[ToolCall("get_weather", PARIS, id="call_1")]),
               ChatMessage("tool", "18 C and sunny", tool_call_id="call_1", name="get_weather")]
    result = caller.submit(GenerationRequest(messages=history, params=GREEDY, tools=[WEATHER_TOOL])).wait()
    prompt = tok.decode(result.context[: result.usage.prompt_tokens], skip_special_tokens=False)
    assert '"name": "get_weather"' in prompt and "The weather in a city now" in prompt  # the tool's description
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt


def test_without_tools_the_call_is_plain_text(caller):
    result = caller.submit(GenerationRequest(messages=[QUESTION], params=GREEDY)).wait()
    assert result.tool_calls == [] and result.text.startswith("<tool_call>")


def test_a_model_whose_template_takes_no_tools_refuses_them(engine):
    result = engine.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL])).wait()
    assert result.finish_reason == "error" and result.error_kind == "request"
    assert "does not support tools" in result.error and not engine.status().model.tools
