"""OpenAI's Responses API (/v1/responses) through the official `openai` client, over the bundled
model: the same answer as chat completions, streamed as the API's typed events that the client's
own `responses.stream` helper puts together, structured outputs with `responses.parse`, and a 400
for what a stateless local server cannot do. Tool calls and reasoning items are tested beside the
tiny models that make them (test_tools_server.py, test_reasoning_server.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import BaseModel

from server_support import running_server

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "max_output_tokens": 24}


@pytest.fixture(scope="module")
def url():
    for url, _, _ in running_server():
        yield url


def test_the_answer_is_the_chat_completions_answer(openai_client):
    resp = openai_client.responses.create(model="smollm2", input="Tell me about the sea.", **GREEDY)
    chat = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell me about the sea."}],
                                                 temperature=0, max_tokens=24)
    assert resp.output_text == chat.choices[0].message.content and resp.output_text
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "smollm2"
    [message] = resp.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 24 and resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + 24


def test_instructions_and_a_conversation_of_items(openai_client):
    items = [{"type": None, "role": "user", "content": "My name is Ada."},  # (an EasyInputMessage dumped)
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "Hello Ada!", "annotations": []}]},
             {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": " Nice name."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]}]
    resp = openai_client.responses.create(model="smollm2", instructions="You are terse.", input=items, **GREEDY)
    chat = openai_client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "My name is Ada."},
                  {"role": "assistant", "content": "Hello Ada!"}, {"role": "assistant", "content": " Nice name."},
                  {"role": "user", "content": "What is my name?"}])
    assert resp.output_text == chat.choices[0].message.content
    assert resp.instructions == "You are terse."


def test_the_stream_helper_puts_the_events_together(openai_client):
    ask = {"model": "smollm2", "input": "Say hello.", "temperature": 0, "max_output_tokens": 60}
    whole = openai_client.responses.create(**ask)
    assert whole.status == "completed"  # (it ends before max_output_tokens: the helper needs response.completed)
    with openai_client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_stream_cut_short_ends_incomplete(openai_client, url):
    from openai.types.responses import Response

    whole = openai_client.responses.create(model="smollm2", input="Tell me about the sea.", **GREEDY)
    events = list(openai_client.responses.create(model="smollm2", input="Tell me about the sea.", stream=True, **GREEDY))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == whole.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert whole.output[0].status == last.response.output[0].status == "incomplete"  # the cut-off item, as OpenAI marks it
    raw = httpx.post(f"{url}/v1/responses", json={"model": "smollm2", "input": "Hi", **GREEDY}, timeout=60).json()
    Response.model_validate(raw)  # every field the client's types require


def test_logprobs_of_the_output_text(openai_client):
    ask = {"model": "smollm2", "input": "Tell me about the sea.", "include": ["message.output_text.logprobs"],
           "top_logprobs": 2, **GREEDY}
    resp = openai_client.responses.create(**ask)
    part = resp.output[0].content[0]
    assert "".join(t.token for t in part.logprobs) == part.text and all(len(t.top_logprobs) == 2 for t in part.logprobs)
    events = list(openai_client.responses.create(**ask, stream=True))
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in part.logprobs]


def test_structured_output_with_parse(openai_client):
    class Pet(BaseModel):
        kind: str
        name: str

    parsed = openai_client.responses.parse(model="smollm2", input="Name a pet.", text_format=Pet,
                                           temperature=0, max_output_tokens=80)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Pet)
    assert Pet.model_validate_json(parsed.output_text) == parsed.output_parsed


@pytest.mark.parametrize("body, message", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id is not supported"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "only function tools are supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image is not supported"),
    ({"input": []}, "input must be a string or a non-empty array"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens=0 is out of range"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "int"}}}},
     "JSON schema: #/type: unknown type 'int'"),
    ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort must be one of"),
    ({"input": "hi", "prompt": {"id": "pmpt_1"}}, "prompt is not supported"),
    ({"input": [{"role": "bogus", "content": "x"}]}, "input[0].role must be one of system, developer, user, assistant"),
    ({"input": [{"type": "function_call", "call_id": "c1", "arguments": "{}"}]}, "input[0].name must be a non-empty string"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c1", "output": {"t": 1}}]},
     "input[1].output must be a string or an array of text parts"),
    ({"input": "hi", "tools": [{"type": "function", "name": "has space"}]}, "tools[0].name must be 1-64 letters"),
    ({"input": "hi", "tool_choice": {"type": "allowed_tools", "tools": []}}, 'tool_choice must be "none", "auto"'),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": "cat"}}},
     "text.format.schema must be a JSON schema"),
])
def test_what_it_cannot_do_is_an_openai_400(url, body, message):
    resp = httpx.post(f"{url}/v1/responses", json={"model": "smollm2", **body}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_a_streamed_request_error_is_a_400_before_any_event(url):
    with httpx.stream("POST", f"{url}/v1/responses", timeout=60,
                      json={"model": "smollm2", "input": "hi " * 9000, "stream": True}) as resp:
        resp.read()
    assert resp.status_code == 400 and "context holds" in json.loads(resp.text)["error"]["message"]
