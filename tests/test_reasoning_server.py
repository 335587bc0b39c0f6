"""A reasoning model behind the real server: its reasoning reaches each dialect's clients where they
look for it (Ollama's `thinking`, OpenAI's `reasoning_content`, the native `thinking`), apart from
the answer, and a model that does not reason sends no such field at all."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import pytest

pytest.importorskip("torch")  # the tiny thinker is written with transformers

from server_support import built_model_server, running_server, sse_data  # noqa: E402
from tests.tiny_models import THINKER_ANSWER, THINKER_REASONING, write_tiny_thinker  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "tiny-thinker"
QUESTION = [{"role": "user", "content": "What is six times seven?"}]
OPTIONS = {"temperature": 0, "num_predict": 20}


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    yield from built_model_server(tmp_path_factory.mktemp("models"), NAME, write_tiny_thinker, 20)


@pytest.fixture(scope="module")
def url(thinker) -> str:
    return thinker.url


# --- Ollama ---------------------------------------------------------------------------------------


def test_ollama_chat_gives_thinking_apart_from_the_answer(ollama_client):
    resp = ollama_client.chat(model=NAME, messages=QUESTION, options=OPTIONS)
    assert (resp.message.thinking, resp.message.content) == (THINKER_REASONING, THINKER_ANSWER)
    parts = list(ollama_client.chat(model=NAME, messages=QUESTION, options=OPTIONS, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THINKER_REASONING
    assert "".join(p.message.content for p in parts) == THINKER_ANSWER
    assert all(p.message.content == "" for p in parts if p.message.thinking)  # Ollama's reasoning chunks
    assert parts[-1].done and parts[-1].message.thinking is None
    assert parts[-1].eval_count == resp.eval_count  # the reasoning's tokens count as Ollama counts them


def test_ollama_told_not_to_think_answers_alone(ollama_client):
    resp = ollama_client.chat(model=NAME, messages=QUESTION, options=OPTIONS, think=False)
    assert resp.message.thinking is None and resp.message.content == THINKER_ANSWER
    assert resp.eval_count == 2  # the answer and the end of turn: no reasoning tokens
    leveled = ollama_client.chat(model=NAME, messages=QUESTION, options=OPTIONS, think="high")  # gpt-oss's levels
    assert leveled.message.thinking == THINKER_REASONING


def test_ollama_generate_gives_top_level_thinking(ollama_client, client):
    resp = ollama_client.generate(model=NAME, prompt="What is six times seven?", options=OPTIONS, think=True)
    assert (resp.thinking, resp.response) == (THINKER_REASONING, THINKER_ANSWER)
    parts = list(ollama_client.generate(model=NAME, prompt="What is six times seven?", options=OPTIONS, stream=True))
    assert "".join(p.thinking or "" for p in parts) == THINKER_REASONING
    assert "".join(p.response for p in parts) == THINKER_ANSWER
    raw = client.post("/api/generate", json={"model": NAME, "prompt": "Hi", "stream": False, "think": False,
                                             "options": OPTIONS}).json()
    assert "thinking" not in raw and raw["response"] == THINKER_ANSWER


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {"messages": QUESTION, "think": "max"}),
    ("/api/generate", {"prompt": "Hi", "think": 1}),
    ("/api/chat", {"messages": [], "think": "yes"}),  # checked before an empty chat loads the model
])
def test_a_bad_think_is_an_ollama_400(client, path, body):
    resp = client.post(path, json={"model": NAME, "stream": False, **body})
    assert resp.status_code == 400
    assert resp.json() == {"error": "think must be true, false, \"low\", \"medium\" or \"high\""}


def test_show_reports_the_thinking_capability(client):
    body = client.post("/api/show", json={"model": NAME}).json()
    assert body["capabilities"] == ["completion", "thinking"]


def test_the_servers_setting_is_the_default(thinker):
    """INFLUENCE_THINK=off: a request that does not say gets no reasoning; one that asks does."""
    import ollama

    from influence_tui.server import ServerRunner

    engine, settings = thinker.engine, thinker.settings
    runner = ServerRunner(engine, dataclasses.replace(settings, think=False), host="127.0.0.1", port=0)
    off = ollama.Client(host=runner.start())
    try:
        plain = off.chat(model=NAME, messages=QUESTION, options=OPTIONS)
        asked = off.chat(model=NAME, messages=QUESTION, options=OPTIONS, think=True)
    finally:
        runner.stop()
    assert plain.message.thinking is None and plain.message.content == THINKER_ANSWER
    assert asked.message.thinking == THINKER_REASONING


# --- OpenAI ---------------------------------------------------------------------------------------


def test_openai_chat_gives_reasoning_content(openai_client):
    resp = openai_client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0)
    message = resp.choices[0].message
    assert (message.reasoning_content, message.content) == (THINKER_REASONING, THINKER_ANSWER)
    assert message.model_extra == {"reasoning_content": THINKER_REASONING}
    chunks = list(openai_client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THINKER_REASONING
    assert "".join(d.content or "" for d in deltas) == THINKER_ANSWER
    assert resp.usage.completion_tokens == 5  # reasoning, </think>, blank line, answer, end of turn
    assert resp.usage.completion_tokens_details.reasoning_tokens == 2  # reasoning, </think>
    # log-probabilities are the answer's (as OpenAI's): the reasoning's tokens are not among them
    scored = openai_client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, logprobs=True)
    assert "".join(t.token for t in scored.choices[0].logprobs.content) == THINKER_ANSWER


def test_anthropic_messages_give_a_thinking_block(url):
    import anthropic

    claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    ask = {"model": NAME, "max_tokens": 20, "messages": QUESTION}
    msg = claude.messages.create(**ask)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in msg.content] == \
           [("thinking", THINKER_REASONING), ("text", THINKER_ANSWER)]
    with claude.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == THINKER_REASONING and final.content[1].text == THINKER_ANSWER
    alone = claude.messages.create(**ask, thinking={"type": "disabled"})
    assert [b.type for b in alone.content] == ["text"] and alone.content[0].text == THINKER_ANSWER


def test_responses_api_gives_a_reasoning_item(openai_client):
    ask = {"model": NAME, "input": "What is six times seven?", "temperature": 0}
    resp = openai_client.responses.create(**ask)
    reasoning, message = resp.output
    assert reasoning.type == "reasoning" and reasoning.content[0].type == "reasoning_text"
    assert reasoning.content[0].text == THINKER_REASONING and message.type == "message"
    assert resp.output_text == THINKER_ANSWER and resp.usage.output_tokens_details.reasoning_tokens == 2
    with openai_client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THINKER_REASONING
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    assert final.output_text == THINKER_ANSWER and final.output[0].content[0].text == THINKER_REASONING
    alone = openai_client.responses.create(**ask, reasoning={"effort": "none"})
    assert [item.type for item in alone.output] == ["message"] and alone.output_text == THINKER_ANSWER
    cut = openai_client.responses.create(**ask, max_output_tokens=1)  # cut off while thinking: the reasoning alone
    assert [(item.type, item.status) for item in cut.output] == [("reasoning", "incomplete")] and cut.status == "incomplete"
    events = list(openai_client.responses.create(**ask, max_output_tokens=1, stream=True))
    assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning"]


@pytest.mark.parametrize("ask", [{"reasoning_effort": "none"}, {"extra_body": {"reasoning": {"effort": "none"}}},
                                 {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}])
def test_openai_reasoning_effort_none_answers_alone(openai_client, ask):
    resp = openai_client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, **ask)
    message = resp.choices[0].message
    assert message.content == THINKER_ANSWER and "reasoning_content" not in (message.model_extra or {})
    thought = openai_client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, reasoning_effort="low")
    assert thought.choices[0].message.reasoning_content == THINKER_REASONING


@pytest.mark.parametrize(("body", "param"), [({"reasoning_effort": "max"}, "reasoning_effort"),
                                             ({"reasoning": {"effort": 3}}, "reasoning.effort"),
                                             ({"reasoning": "high"}, "reasoning")])
def test_a_bad_reasoning_effort_is_an_openai_400(client, body, param):
    resp = client.post("/v1/chat/completions", json={"messages": QUESTION, **body})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_a_raw_completion_is_unchanged(client):
    body = client.post("/v1/completions", json={"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n",
                                                "temperature": 0}).json()
    assert body["choices"][0]["text"] == f"{THINKER_REASONING}</think>\n\n{THINKER_ANSWER}"


# --- native ---------------------------------------------------------------------------------------


def test_native_generate_reports_thinking(client):
    body = client.post("/generate", json={"prompt": "What is six times seven?"}).json()
    assert (body["thinking"], body["text"]) == (THINKER_REASONING, THINKER_ANSWER)
    with client.stream("POST", "/generate", json={"prompt": "What is six times seven?", "stream": True}) as resp:
        events = sse_data(resp)
    *pieces, done = events
    assert "".join(e["text"] for e in pieces) == THINKER_ANSWER  # an old client that reads `text` only
    assert "".join(e.get("thinking", "") for e in pieces) == THINKER_REASONING
    assert done["done"] and (done["thinking"], done["text"]) == (THINKER_REASONING, THINKER_ANSWER)
    plain = client.post("/generate", json={"prompt": "What is six times seven?", "think": False}).json()
    assert "thinking" not in plain and plain["text"] == THINKER_ANSWER
    bad = client.post("/generate", json={"prompt": "Hi", "think": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "think must be a boolean"


def test_native_chat_route_is_openai_shaped(client):
    with client.stream("POST", "/chat/completions", json={"messages": QUESTION}) as resp:
        deltas = [e["choices"][0]["delta"] for e in sse_data(resp) if e.get("choices")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THINKER_REASONING
    assert "".join(d.get("content", "") for d in deltas) == THINKER_ANSWER
    plain = client.post("/chat/completions", json={"messages": QUESTION, "stream": False, "think": False}).json()
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": THINKER_ANSWER}


# --- a model that does not reason -----------------------------------------------------------------


def _keys(obj: Any) -> set[str]:
    """Every key anywhere in a JSON value."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


@pytest.fixture(scope="module")
def plain_url():
    """The shared engine with the bundled model (SmolLM2: no think blocks)."""
    for url, _, _ in running_server():
        yield url


def test_a_model_that_does_not_reason_sends_no_reasoning_fields(plain_url):
    short = {"temperature": 0, "num_predict": 4}
    with httpx.Client(base_url=plain_url, timeout=120) as c:
        bodies = [c.post("/api/chat", json={"messages": QUESTION, "stream": False, "options": short}).json(),
                  c.post("/api/generate", json={"prompt": "Hi", "stream": False, "options": short}).json(),
                  c.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4}).json(),
                  c.post("/generate", json={"prompt": "Hi", "max_tokens": 4}).json()]
        lines = c.post("/api/chat", json={"messages": QUESTION, "options": short}).text.splitlines()
        bodies += [json.loads(line) for line in lines if line]
        with c.stream("POST", "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, "stream": True}) as resp:
            bodies += sse_data(resp)
        with c.stream("POST", "/generate", json={"prompt": "Hi", "max_tokens": 4, "stream": True}) as resp:
            bodies += sse_data(resp)
        show = c.post("/api/show", json={"model": "smollm2"}).json()
        # asked to think, it is a 400 as in Ollama (a client's think toggle reads it as "cannot");
        # told not to think, it answers (nothing to turn off)
        asked = [c.post("/api/chat", json={"model": "smollm2", "messages": QUESTION, "think": True, "stream": False}),
                 c.post("/api/generate", json={"model": "smollm2", "prompt": "Hi", "think": "high", "stream": False})]
        told_not = c.post("/api/chat", json={"model": "smollm2", "messages": QUESTION, "think": False, "stream": False,
                                             "options": short})
    assert all("error" not in b for b in bodies)
    assert not _keys(bodies) & {"thinking", "reasoning_content"}
    assert show["capabilities"] == ["completion"]
    assert [(r.status_code, r.json()) for r in asked] == [(400, {"error": '"smollm2" does not support thinking'})] * 2
    assert told_not.status_code == 200 and told_not.json()["message"]["content"]
