"""Tool calling behind the real server, as the official Ollama and OpenAI clients speak it: tools go
in, calls come back in each dialect's shape (streamed and not), a call and its result go back in,
bad tool shapes and a model that takes no tools are 4xx before anything streams."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

pytest.importorskip("torch")  # the tiny tool caller is written with transformers

from influence_tui.config import Settings  # noqa: E402
from server_support import built_model_server, running_server, sse_data  # noqa: E402
from tests.tiny_models import WEATHER_TOOL, write_tiny_tool_caller  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "tiny-tool-caller"
PARIS = {"city": "Paris", "unit": "celsius"}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
OPTIONS = {"temperature": 0, "num_predict": 30}


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    yield from built_model_server(tmp_path_factory.mktemp("models"), NAME, write_tiny_tool_caller, 30)


@pytest.fixture(scope="module")
def url(caller) -> str:
    return caller.url


# --- OpenAI ---------------------------------------------------------------------------------------


def test_openai_chat_returns_the_call(openai_client):
    resp = openai_client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > len("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == PARIS


def test_responses_api_returns_the_call_and_takes_its_result(openai_client):
    tool = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses API's flat shape
    ask = {"model": NAME, "input": "What is the weather in Paris?", "tools": [tool], "temperature": 0}
    resp = openai_client.responses.create(**ask)
    [call] = resp.output  # no text: no message item
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == PARIS
    assert call.call_id and resp.status == "completed"
    with openai_client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == PARIS and final.output[0].name == "get_weather"
    # the call and its result go back in as items, and reach the prompt
    again = openai_client.responses.create(**{**ask, "input": [
        {"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}]})
    assert again.status == "completed" and again.usage.input_tokens > resp.usage.input_tokens + 10
    # tools and an output format together (the Agents SDK's agent with tools and an output_type):
    # the model may still call
    weather = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    typed = openai_client.responses.create(**ask, text={"format": {"type": "json_schema", "name": "w", "schema": weather}})
    assert [(item.type, item.name) for item in typed.output] == [("function_call", "get_weather")]
    chat = openai_client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], temperature=0,
                                                 response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": weather}})
    assert chat.choices[0].finish_reason == "tool_calls" and chat.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_anthropic_messages_return_tool_use_and_take_its_result(url):
    import anthropic

    claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    fn = WEATHER_TOOL["function"]
    tool = {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}
    ask = {"model": NAME, "max_tokens": 30, "messages": QUESTION, "tools": [tool]}
    msg = claude.messages.create(**ask)
    [use] = msg.content
    assert (use.type, use.name, use.input, msg.stop_reason) == ("tool_use", "get_weather", PARIS, "tool_use")
    with claude.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.input) for b in final.content] == [("tool_use", PARIS)] and final.stop_reason == "tool_use"
    again = claude.messages.create(**{**ask, "messages": [*QUESTION, {"role": "assistant", "content": [use.model_dump()]},
                                                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                                                       "content": '{"temperature": 21}'}]}]})
    assert again.usage.input_tokens > msg.usage.input_tokens + 10  # the call and its result reached the prompt
    plain = claude.messages.create(**{**ask, "tool_choice": {"type": "none"}})
    assert plain.stop_reason == "end_turn" and plain.content[0].type == "text"


def test_openai_stream_accumulates_to_the_call(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], temperature=0, stream=True,
        stream_options={"include_usage": True}))
    calls: dict[int, dict[str, str]] = {}  # by index, as clients put the deltas together
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            acc = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            acc["id"] += delta_call.id or ""
            acc["name"] += delta_call.function.name or ""
            acc["arguments"] += delta_call.function.arguments or ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == PARIS
    assert calls[0]["id"].startswith("call_")
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the call is not text


def test_openai_stream_helper_gives_the_parsed_call(openai_client):
    """The client's own accumulation (`.stream()`, which wants strict tools: `strict` is dropped here)."""
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    with openai_client.chat.completions.stream(model=NAME, messages=QUESTION, tools=[strict], temperature=0) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and call.function.parsed_arguments == PARIS


def _round_trip_usage(openai_client, result: str) -> tuple[int, Any]:
    """Ask, send the call and its `result` back; (the second prompt's tokens, its answer)."""
    first = openai_client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], temperature=0)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*QUESTION, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": result}]
    assert history[1]["tool_calls"][0]["function"]["arguments"]  # the JSON string, as clients send it back
    second = openai_client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER_TOOL], temperature=0)
    return second.usage.prompt_tokens, second


def test_openai_round_trip_puts_the_result_in_the_prompt(openai_client, caller):
    from tokenizers import Tokenizer

    long = "18 C and sunny, a light breeze from the west, no rain expected until the evening"
    short_tokens, answer = _round_trip_usage(openai_client, "ok")
    long_tokens, _ = _round_trip_usage(openai_client, long)
    assert answer.choices[0].finish_reason == "tool_calls"  # the tiny model always calls
    tok = Tokenizer.from_file(str(caller.folder / "tokenizer.json"))
    grown = len(tok.encode(long, add_special_tokens=False).ids) - len(tok.encode("ok", add_special_tokens=False).ids)
    assert long_tokens - short_tokens == grown  # the tool result, and nothing else, made the difference


def test_tool_choice_none_sends_no_tools(openai_client):
    resp = openai_client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL],
                                                 tool_choice="none", temperature=0)
    choice = resp.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content.startswith("<tool_call>")  # the model's raw call, as text


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_other_tool_choices_send_the_tools(client, choice):
    body = client.post("/v1/chat/completions", json={"model": NAME, "messages": QUESTION, "tools": [WEATHER_TOOL],
                                                     "tool_choice": choice, "parallel_tool_calls": False}).json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_the_native_chat_route_speaks_tools_too(client):
    body = client.post("/chat/completions", json={"messages": QUESTION, "tools": [WEATHER_TOOL], "stream": False}).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == json.dumps(PARIS, separators=(",", ":"))


# --- Ollama ---------------------------------------------------------------------------------------


def test_ollama_chat_returns_the_call(ollama_client):
    resp = ollama_client.chat(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], options=OPTIONS)
    [call] = resp.message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", PARIS)
    assert resp.message.content == "" and resp.done_reason == "stop"


def test_ollama_chat_takes_python_functions_as_tools(ollama_client):
    def get_weather(city: str, unit: str = "celsius") -> str:
        """The weather in a city now.

        Args:
          city: the city
          unit: celsius or fahrenheit
        """
        return "sunny"

    resp = ollama_client.chat(model=NAME, messages=QUESTION, tools=[get_weather], options=OPTIONS)
    assert resp.message.tool_calls[0].function.name == "get_weather"


def test_ollama_stream_sends_the_calls_before_the_end(ollama_client):
    parts = list(ollama_client.chat(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], options=OPTIONS, stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and with_calls[0] is parts[-2] and not with_calls[0].done
    assert dict(with_calls[0].message.tool_calls[0].function.arguments) == PARIS
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].message.tool_calls is None
    assert "".join(p.message.content for p in parts) == ""


def test_ollama_round_trip_puts_the_result_in_the_prompt(ollama_client):
    first = ollama_client.chat(model=NAME, messages=QUESTION, tools=[WEATHER_TOOL], options=OPTIONS)

    def prompt_tokens(result: str) -> int:
        history = [*QUESTION, first.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
        resp = ollama_client.chat(model=NAME, messages=history, tools=[WEATHER_TOOL], options=OPTIONS)
        assert resp.message.tool_calls  # answered (the tiny model always calls)
        return resp.prompt_eval_count

    assert prompt_tokens("18 C and sunny, a light breeze from the west, no rain today") > prompt_tokens("ok") + 5


def test_show_reports_the_tools_capability(client):
    assert client.post("/api/show", json={"model": NAME}).json()["capabilities"] == ["completion", "tools"]


# --- bad input ------------------------------------------------------------------------------------

BAD_TOOLS = [
    ("x", "tools", "tools must be an array"),
    ([1], "tools[0]", "tools[0] must be an object"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type", "tools[0].type must be \"function\""),
    ([{"type": "function"}], "tools[0].function", "tools[0].function must be an object"),
    ([{"type": "function", "function": {"name": ""}}], "tools[0].function.name", "non-empty string"),
    ([WEATHER_TOOL, {"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[1].function.parameters",
     "must be an object"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description", "a string"),
    ([WEATHER_TOOL, WEATHER_TOOL], "tools[1].function.name", "given twice"),  # a call could not say which
]


def test_openai_tool_names_follow_openais_rule(client):
    """OpenAI takes names of 1-64 letters, digits, _ and -; Ollama has no rule (its clients send
    what they like)."""
    tools = [{"type": "function", "function": {"name": "get weather"}}]
    openai = client.post("/v1/chat/completions", json={"model": NAME, "messages": QUESTION, "tools": tools})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "tools[0].function.name"
    assert client.post("/api/chat", json={"model": NAME, "messages": QUESTION, "tools": tools, "stream": False,
                                          "options": OPTIONS}).status_code == 200


@pytest.mark.parametrize(("tools", "param", "says"), BAD_TOOLS)
def test_bad_tools_are_a_400_in_each_dialect(client, tools, param, says):
    openai = client.post("/v1/chat/completions", json={"model": NAME, "messages": QUESTION, "tools": tools, "stream": True})
    assert openai.status_code == 400
    error = openai.json()["error"]
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"
    ollama = client.post("/api/chat", json={"model": NAME, "messages": QUESTION, "tools": tools})
    assert ollama.status_code == 400 and list(ollama.json()) == ["error"] and says in ollama.json()["error"]


def test_empty_tools_mean_none(client):
    body = client.post("/v1/chat/completions", json={"model": NAME, "messages": QUESTION, "tools": []}).json()
    assert body["choices"][0]["message"]["content"].startswith("<tool_call>")


@pytest.mark.parametrize(("choice", "says"), [
    ("always", "tool_choice must be"), ({"type": "function"}, "tool_choice must be"),
    ({"type": "function", "function": {"name": "other"}}, "not in tools"),
])
def test_a_bad_tool_choice_is_a_400(client, choice, says):
    resp = client.post("/v1/chat/completions", json={"messages": QUESTION, "tools": [WEATHER_TOOL], "tool_choice": choice})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"
    assert says in resp.json()["error"]["message"]


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": "}}


@pytest.mark.parametrize(("message", "says"), [
    ({"role": "assistant", "content": None, "tool_calls": [CALL]}, "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}, "must be a JSON object"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}, "function.name"),
    ({"role": "assistant", "tool_calls": {"function": {"name": "f"}}}, "tool_calls must be an array"),
    ({"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}, "only assistant messages"),
    ({"role": "tool", "content": "18 C", "tool_call_id": 7}, "messages[1].tool_call_id must be a string"),
])
def test_bad_tool_messages_are_a_400_in_each_dialect(client, message, says):
    messages = [*QUESTION, message]
    openai = client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER_TOOL]})
    assert openai.status_code == 400 and says in openai.json()["error"]["message"]
    ollama = client.post("/api/chat", json={"model": NAME, "messages": messages, "tools": [WEATHER_TOOL]})
    assert ollama.status_code == 400 and says in ollama.json()["error"]


def test_a_tool_message_gets_the_name_of_the_call_it_answers():
    from influence_tui.server.common import parse_messages

    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(PARIS)}}
    msgs = parse_messages([*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_7", "content": "18 C"},
                           {"role": "tool", "tool_name": "clock", "content": "noon"}])
    assert msgs[1].content == "" and [(c.name, c.arguments, c.id) for c in msgs[1].tool_calls] == [("get_weather", PARIS, "call_7")]
    assert (msgs[2].role, msgs[2].tool_call_id, msgs[2].name, msgs[2].content) == ("tool", "call_7", "get_weather", "18 C")
    assert (msgs[3].tool_call_id, msgs[3].name) == (None, "clock")


# --- a model that takes no tools -------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain():
    """(url, engine): the shared engine with the bundled model (SmolLM2: its template has no place for tools)."""
    for url, _, engine in running_server():
        yield url, engine


@pytest.fixture(scope="module")
def plain_url(plain):
    return plain[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_without_tools_refuses_them_before_streaming(plain, stream):
    """The engine refuses them as it builds the prompt: a 400 in each dialect before any stream."""
    url, engine = plain
    with httpx.Client(base_url=url, timeout=60) as c:
        ollama = c.post("/api/chat", json={"model": "smollm2", "messages": QUESTION, "tools": [WEATHER_TOOL],
                                           "stream": stream})
        openai = c.post("/v1/chat/completions", json={"messages": QUESTION, "tools": [WEATHER_TOOL], "stream": stream})
    says = f"{engine.status().model.name} does not support tools (its chat template has no place for them)"
    assert ollama.status_code == 400 and ollama.json() == {"error": says}
    assert openai.status_code == 400 and openai.headers["content-type"] == "application/json"
    error = openai.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] == says


def test_show_reports_no_tools_for_the_bundled_model(plain_url):
    with httpx.Client(base_url=plain_url, timeout=60) as c:
        assert "tools" not in c.post("/api/show", json={"model": "smollm2"}).json()["capabilities"]


def test_ollama_generate_points_tools_to_chat(client):
    resp = client.post("/api/generate", json={"model": NAME, "prompt": "Hi", "tools": [WEATHER_TOOL], "stream": False})
    assert resp.status_code == 400 and resp.json() == {"error": "tools are taken by /api/chat, not /api/generate"}


def test_the_deprecated_functions_are_a_clear_400(client):
    body = {"model": NAME, "messages": QUESTION, "functions": [WEATHER_TOOL["function"]]}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "functions" and "send tools" in resp.json()["error"]["message"]


def test_a_model_served_from_its_own_path_is_listed_and_found_by_name(tmp_path):
    """`influence serve -m PATH` with PATH outside the models folder: clients see it in /api/tags,
    /api/show finds it by name, and a request by name loads it again after an unload."""
    from influence_tui.engine import Engine
    from influence_tui.server import ServerRunner
    folder = write_tiny_tool_caller(tmp_path / "elsewhere" / "my-caller")
    settings = Settings(warmup_tokens=0, output_dir=str(tmp_path / "empty"), model_path=str(folder), max_tokens=30)
    engine = Engine(settings, max_batch=1)
    engine.load()
    runner = ServerRunner(engine, settings, host="127.0.0.1", port=0)
    url = runner.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert "my-caller:latest" in [m["name"] for m in c.get("/api/tags").json()["models"]]
            assert c.post("/api/show", json={"model": "my-caller"}).json()["capabilities"] == ["completion", "tools"]
            c.post("/api/generate", json={"model": "my-caller", "keep_alive": 0})  # unloads it
            body = {"model": "my-caller", "messages": QUESTION, "tools": [WEATHER_TOOL], "stream": False, "options": OPTIONS}
            reply = c.post("/api/chat", json=body)
            assert reply.status_code == 200 and reply.json()["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    finally:
        runner.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def reluctant(tmp_path_factory):
    from tests.tiny_models import write_tiny_reluctant_caller

    yield from built_model_server(tmp_path_factory.mktemp("reluctant"), "reluctant", write_tiny_reluctant_caller, 30)


def test_a_required_or_named_tool_choice_makes_the_answer_a_call(reluctant):
    """The model would answer in words; tool_choice required (OpenAI), any (Anthropic) or a named
    function makes its answer open with its call tag, so it calls."""
    import anthropic
    import openai

    from tests.tiny_models import RELUCTANT_ANSWER

    client = openai.OpenAI(base_url=f"{reluctant.url}/v1", api_key="none", max_retries=0)
    ask = {"model": "reluctant", "messages": QUESTION, "tools": [WEATHER_TOOL], "temperature": 0}
    assert client.chat.completions.create(**ask).choices[0].message.content == RELUCTANT_ANSWER  # auto: its choice
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        forced = client.chat.completions.create(**ask, tool_choice=choice).choices[0]
        assert forced.finish_reason == "tool_calls" and json.loads(forced.message.tool_calls[0].function.arguments) == PARIS
    fn = WEATHER_TOOL["function"]
    tool = {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}
    claude = anthropic.Anthropic(base_url=reluctant.url, api_key="none", max_retries=0)
    msg = claude.messages.create(model="reluctant", max_tokens=30, messages=QUESTION, tools=[tool], tool_choice={"type": "any"})
    assert msg.stop_reason == "tool_use" and msg.content[0].input == PARIS
    responses = client.responses.create(model="reluctant", input="Weather?", tools=[{"type": "function", **fn}],
                                        tool_choice="required", temperature=0)
    assert responses.output[0].type == "function_call"
