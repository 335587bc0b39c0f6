"""Anthropic's Messages API (/v1/messages) through the official `anthropic` client, over the
bundled model: the same answer as chat completions, streamed as Anthropic's events that the
client's stream helper puts together, stop sequences, structured outputs with `messages.parse`,
the key as x-api-key, and Anthropic-shaped errors. Tool use and thinking blocks are tested beside
the tiny models that make them (test_tools_server.py, test_reasoning_server.py)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel

from server_support import running_server

pytestmark = pytest.mark.slow
KEY = "anthropic-key"
GREEDY = {"extra_body": {"temperature": 0}}  # (this client sends no sampling fields of its own)
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server():
    yield from running_server(api_key=KEY)


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def claude(url):
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)


def test_the_answer_is_the_chat_completions_answer(claude, url):
    msg = claude.messages.create(model="smollm2", max_tokens=40, system="Be brief.", messages=HELLO, **GREEDY)
    chat = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120, json={
        "model": "smollm2", "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."}, *HELLO]}).json()
    [block] = msg.content
    assert block.type == "text" and block.text == chat["choices"][0]["message"]["content"]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_") and msg.model == "smollm2"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == chat["usage"]["prompt_tokens"] - msg.usage.cache_read_input_tokens
    assert msg.usage.output_tokens == chat["usage"]["completion_tokens"]


def test_the_stream_helper_puts_the_events_together(claude):
    whole = claude.messages.create(model="smollm2", max_tokens=40, messages=HELLO, **GREEDY)
    with claude.messages.stream(model="smollm2", max_tokens=40, messages=HELLO, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_stop",
                                                  "message_delta", "message_stop")]
    assert kinds == ["message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    [start] = [e for e in events if e.type == "message_start"]  # the prompt is counted from the start, as Anthropic's
    assert start.message.usage.input_tokens + start.message.usage.cache_read_input_tokens == \
           whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_max_tokens_and_stop_sequences(claude):
    cut = claude.messages.create(model="smollm2", max_tokens=3, messages=HELLO, **GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    full = claude.messages.create(model="smollm2", max_tokens=40, messages=HELLO, **GREEDY).content[0].text
    word = full.split()[2]
    stopped = claude.messages.create(model="smollm2", max_tokens=40, messages=HELLO, stop_sequences=["QQQ", word], **GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.content[0].text == full[: full.index(word)]


def test_structured_output_with_parse(claude):
    class Pet(BaseModel):
        kind: str
        name: str

    parsed = claude.messages.parse(model="smollm2", max_tokens=80, output_format=Pet,
                                   messages=[{"role": "user", "content": "Name a pet."}], **GREEDY)
    assert isinstance(parsed.parsed_output, Pet)


def test_errors_are_anthropic_shaped(url):
    post = lambda body, **kw: httpx.post(f"{url}/v1/messages", json={"model": "smollm2", **body}, timeout=60,  # noqa: E731
                                         headers={"x-api-key": KEY, **kw.get("headers", {})})
    cases = [
        (post({"messages": HELLO}), 400, "max_tokens is required"),
        (post({"max_tokens": 5, "messages": []}), 400, "messages: must be a non-empty array"),
        (post({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}), 400,
         "image blocks are not supported"),
        (post({"max_tokens": 5, "messages": HELLO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}), 400,
         "only client tools"),
        (post({"max_tokens": 5, "messages": HELLO, "output_config": {"format": {"type": "json_schema", "schema": {"type": "int"}}}}),
         400, "JSON schema: #/type: unknown type 'int'"),
        (post({"max_tokens": 5, "messages": HELLO, "stop_sequences": [""]}), 400, "non-empty strings"),
        (post({"max_tokens": 5, "messages": [{"role": "user", "content": "hi " * 5000}]}), 400,
         "tokens > 4096 maximum"),  # Anthropic's words, which Claude Code reads to compact
        (post({"max_tokens": 5, "messages": HELLO}, headers={"x-api-key": "wrong"}), 401, "missing or invalid API key"),
    ]
    assert cases[-2][0].json()["error"]["message"].startswith("prompt is too long: 50")
    for resp, status, message in cases:
        body = resp.json()
        assert resp.status_code == status and body["type"] == "error" and message in body["error"]["message"], body
    assert cases[-1][0].json()["error"]["type"] == "authentication_error"
    either = post({"max_tokens": 1, "messages": HELLO}, headers={"Authorization": "Bearer other"})  # the x-api-key is right
    assert either.status_code == 200


def test_a_final_assistant_message_is_continued(claude, server):
    from influence_tui.engine import ChatMessage, GenerationRequest

    ask = [{"role": "user", "content": "Give me a JSON object for a cat."}, {"role": "assistant", "content": '{"name":'}]
    msg = claude.messages.create(model="smollm2", max_tokens=12, messages=ask, **GREEDY)
    assert not msg.content[0].text.lstrip().startswith("{")  # it goes on from the prefill, not a new turn
    scheduler = server[2]._scheduler
    ids, _, _ = scheduler.build_prompt(GenerationRequest(messages=[ChatMessage(m["role"], m["content"]) for m in ask]))
    assert scheduler.tok.decode(ids).endswith('<|im_start|>assistant\n{"name":')


def test_count_tokens_is_the_prompt_the_model_reads(claude):
    counted = claude.messages.count_tokens(model="smollm2", system="Be brief.", messages=HELLO)
    answered = claude.messages.create(model="smollm2", max_tokens=2, system="Be brief.", messages=HELLO, **GREEDY)
    assert counted.input_tokens == answered.usage.input_tokens + answered.usage.cache_read_input_tokens > 5
    # however long: Claude Code asks when a conversation grows past the context
    long = claude.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": "hi " * 5000}]).input_tokens
    assert long > 5000
    # a failed tool's result says so to the model
    turn = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {}}]}]
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "timeout"}]}
    ok = claude.messages.count_tokens(model="smollm2", messages=[*turn, {"role": "user", "content": [result]}])
    failed = claude.messages.count_tokens(model="smollm2", messages=[*turn, {"role": "user", "content": [{**result, "is_error": True}]}])
    assert failed.input_tokens > ok.input_tokens
