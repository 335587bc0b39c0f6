"""Tool calls: tools go into the prompt through the chat template, calls come back parsed."""

from __future__ import annotations

import pytest

from influence_tui.engine.tools import HERMES, JSON, PIPE_LIST, ToolCallParser, formats_of, mistral_ids, one_call_per_turn

pytest.importorskip("torch")  # the tiny tool caller is written with transformers

from tokenizers import Tokenizer  # noqa: E402

from influence_tui.engine import ChatMessage, GenerationRequest, ToolCall  # noqa: E402
from influence_tui.params import GenerationParams  # noqa: E402
from tests.tiny_models import WEATHER_TOOL, engine_on, write_tiny_tool_caller  # noqa: E402

GREEDY = GenerationParams().with_(temperature=0.0, max_tokens=30)
PARIS = {"city": "Paris", "unit": "celsius"}


NAMES = frozenset({"w", "a", "b", "get"})


def _parse(text: str, step: int, formats: frozenset[str] = formats_of(None)) -> tuple[str, list[tuple[str, dict]]]:
    parser, out = ToolCallParser(NAMES, formats), ""
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    out += parser.flush()
    return out, [(c.name, c.arguments) for c in parser.calls]


@pytest.mark.parametrize("step", [1, 3, 1000])  # tags and JSON cut across tokens anywhere
@pytest.mark.parametrize(("text", "expected"), [
    ('<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call>', ("", [("w", {"c": "P"})])),  # Hermes, Qwen
    ('Checking.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}'
     '</tool_call>\n', ("Checking.", [("a", {}), ("b", {"x": 1})])),  # text first; arguments as a JSON string; no blank content
    ('<tool_call>{"name": "w", "arguments": {"s": "a </tool_call> b"}}</tool_call>', ("", [("w", {"s": "a </tool_call> b"})])),
    ('<tool_call>{"name": "w", "arguments": null}', ("", [("w", {})])),  # never closed (max_tokens): still a call
    ('{"name": "Alice", "age": 30}', ('{"name": "Alice", "age": 30}', [])),  # JSON with a "name" is not a call
    ('{"name": "nope", "arguments": {}}', ('{"name": "nope", "arguments": {}}', [])),  # not a tool that was given
    ('{"name": "get", "parameters": {"q": 1}}', ("", [("get", {"q": 1})])),  # Llama 3.x
    ('[TOOL_CALLS] [{"name": "a", "arguments": {"k": [1]}}]', ("", [("a", {"k": [1]})])),  # Mistral
    ('<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "w", "arguments": {"c": "P"}}]',
     ("", [("a", {}), ("w", {"c": "P"})])),  # Granite 3
    ('<|tool_call|>[{"name": "w", "arguments": {"c": "P"}}]<|/tool_call|>', ("", [("w", {"c": "P"})])),  # Phi-4-mini
    ("<|tool_call|>not json", ("<|tool_call|>not json", [])),
    ("Just text.", ("Just text.", [])),
    ('{"answer": 42}', ('{"answer": 42}', [])),  # JSON that is not a call is the answer
    ("<tool_call>not json</tool_call> then", ("<tool_call>not json</tool_call> then", [])),
    ("<tool_call>cut off", ("<tool_call>cut off", [])),
    ("[a link](x)", ("[a link](x)", [])),
])
def test_calls_are_read_out_of_the_answer_wherever_tokens_cut_it(text, expected, step):
    assert _parse(text, step) == expected


def test_the_template_tells_the_format():
    qwen = "{% for tool in tools %}{{ tool | tojson }}{% endfor %} <tool_call>"
    assert formats_of(qwen) == {HERMES} and formats_of('tools "parameters"') == {JSON}
    assert formats_of("{{ tools }} <|tool_call|>") == {PIPE_LIST}
    # a Hermes model's answer that starts with a bracket streams at once: it cannot be a call
    parser = ToolCallParser(NAMES, formats_of(qwen))
    assert parser.feed("[Paris](https://en.wikipedia.org/wiki/Paris) is") == "[Paris](https://en.wikipedia.org/wiki/Paris) is"


def test_mistral_call_ids_become_nine_letters_and_digits():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abcdefabcdef", "function": {"name": "a"}},
                                                              {"id": "", "function": {"name": "b"}}]},
            {"role": "tool", "content": "1", "tool_call_id": "call_abcdefabcdef"}, {"role": "tool", "content": "2"}]
    out = mistral_ids(msgs)
    ids = [c["id"] for c in out[1]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == 2
    assert [out[2]["tool_call_id"], out[3]["tool_call_id"]] == ids  # each result answers its call
    assert msgs[1]["tool_calls"][0]["id"] == "call_abcdefabcdef"  # the caller's messages are left alone


def test_llama_turns_hold_one_call_each():
    """Llama 3.x's template raises on an assistant turn with several calls: they go as turns of
    one call each, each followed by its result."""
    calls = [{"id": "1", "function": {"name": "a"}}, {"id": "2", "function": {"name": "b"}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Both.", "tool_calls": calls},
            {"role": "tool", "content": "ra"}, {"role": "tool", "content": "rb"}, {"role": "user", "content": "next"}]
    out = one_call_per_turn(msgs)
    assert [(m["role"], m["content"], [c["id"] for c in m.get("tool_calls", [])]) for m in out] == [
        ("user", "q", []), ("assistant", "Both.", ["1"]), ("tool", "ra", []), ("assistant", "", ["2"]),
        ("tool", "rb", []), ("user", "next", [])]
    assert one_call_per_turn(msgs[:1]) == msgs[:1]


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


def test_call_tags_marked_special_are_still_read(tmp_path):
    with engine_on(write_tiny_tool_caller(tmp_path / "special", special_tags=True), max_batch=1) as engine:
        result = engine.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL])).wait()
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", PARIS)] and result.text == ""


def test_a_model_that_thinks_before_it_calls(tmp_path):
    """Qwen3's way: reasoning, then the call; each comes apart from the (empty) answer."""
    from tests.tiny_models import THINKER_REASONING

    with engine_on(write_tiny_tool_caller(tmp_path / "thinks", thinks=True), max_batch=1) as engine:
        stream = engine.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL]))
        events = list(stream)
    result = stream.result
    assert (result.thinking, result.text) == (THINKER_REASONING, "")
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", PARIS)]
    assert "".join(e.thinking for e in events) == THINKER_REASONING and not any(e.text for e in events)


def test_with_tools_a_json_format_lets_the_answer_open_with_a_call(caller, tmp_path):
    """As OpenAI's API (and the Agents SDK with tools and an output type) expects: the model calls
    a tool or answers in the format. Its call tag may open the answer; then the call is read."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    for fmt in ({"format": "json"}, {"format": "json", "json_schema": schema}):
        result = caller.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL], **fmt)).wait()
        assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", PARIS)] and result.text == ""
    # a model whose calls are bare JSON objects (Llama 3's way) could not call: refused
    from tests.tiny_models import write_chain_model
    from tokenizers import AddedToken

    template = ('{% if tools %}Call one of {{ tools | tojson }} as {"name": ..., "parameters": {...}}\n{% endif %}'
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    bare = write_chain_model(tmp_path / "bare", [AddedToken("{}", normalized=False)], ("Ċ", "{}", "<|im_end|>"), template)
    with engine_on(bare, max_batch=1) as engine:
        refused = engine.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL], format="json")).wait()
    assert refused.finish_reason == "error" and refused.error_kind == "request" and "JSON mode and tools" in refused.error


def test_a_model_that_calls_as_granite_does(tmp_path):
    """<|tool_call|> then a JSON list: read as calls, and with a JSON format the tag may open the answer."""
    from tests.tiny_models import write_tiny_pipe_caller

    with engine_on(write_tiny_pipe_caller(tmp_path / "pipe"), max_batch=1) as engine:
        for fmt in ({}, {"format": "json"}):
            result = engine.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL], **fmt)).wait()
            assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", PARIS)] and result.text == ""


def test_without_tools_the_call_is_plain_text(caller):
    result = caller.submit(GenerationRequest(messages=[QUESTION], params=GREEDY)).wait()
    assert result.tool_calls == [] and result.text.startswith("<tool_call>")


def test_a_model_whose_template_takes_no_tools_refuses_them(engine):
    result = engine.submit(GenerationRequest(messages=[QUESTION], params=GREEDY, tools=[WEATHER_TOOL])).wait()
    assert result.finish_reason == "error" and result.error_kind == "request"
    assert "does not support tools" in result.error and not engine.status().model.tools
