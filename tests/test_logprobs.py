"""Log-probabilities of an answer's tokens: from the engine (the model's own distribution, whatever
the sampling settings), then through OpenAI's chat and legacy completions and Ollama's routes with
the official clients, streamed and not."""

from __future__ import annotations

import math

import httpx
import pytest

from server_support import running_server

pytestmark = pytest.mark.slow


def _ask(engine, prompt: str, logprobs: int, **params):
    from influence_tui.engine import GenerationRequest
    from influence_tui.params import GenerationParams

    return engine.generate(GenerationRequest(prompt=prompt, params=GenerationParams(**params), logprobs=logprobs))


def test_each_token_of_the_answer_with_its_bytes(engine):
    result = _ask(engine, "Écris trois mots accentués: été, ça, naïve. 日本語も。", 2, temperature=0.9, seed=4, max_tokens=40)
    entries = result.logprobs
    ended = 1 if result.finish_reason == "stop" else 0  # the end-of-turn token is not one of the answer's
    assert len(entries) == result.usage.completion_tokens - ended
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8") == result.text  # a split character's halves too
    for e in entries:
        assert e.logprob <= 0 and len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob
        assert e.logprob <= e.top[0].logprob + 1e-6
        assert sum(math.exp(t.logprob) for t in e.top) <= 1 + 1e-5


def test_greedy_takes_the_most_likely_token_and_the_values_do_not_depend_on_sampling(engine):
    greedy = _ask(engine, "The capital of France is", 3, temperature=0, repeat_penalty=1.0, max_tokens=6)
    for e in greedy.logprobs:
        assert math.isclose(e.logprob, e.top[0].logprob, abs_tol=1e-6)  # (a tie may name the other token)
    # the first step's distribution is the model's: the same under any temperature and penalties
    hot = _ask(engine, "The capital of France is", 3, temperature=1.5, repeat_penalty=1.3, seed=1, max_tokens=1)
    assert [(t.token, round(t.logprob, 4)) for t in hot.logprobs[0].top] == \
           [(t.token, round(t.logprob, 4)) for t in greedy.logprobs[0].top]


def test_the_end_of_the_answer_is_not_a_token_and_json_mode_composes(engine):
    from influence_tui.engine import ChatMessage, GenerationRequest
    from influence_tui.params import GenerationParams

    done = _ask(engine, "Say hi.", 0, temperature=0, max_tokens=200)
    assert done.finish_reason == "stop" and len(done.logprobs) == done.usage.completion_tokens - 1
    assert "".join(e.token for e in done.logprobs) == done.text and all(e.top == [] for e in done.logprobs)
    json_mode = engine.generate(GenerationRequest(messages=[ChatMessage("user", "A JSON object for a cat.")], format="json",
                                                  params=GenerationParams(temperature=0, max_tokens=200), logprobs=1))
    assert json_mode.finish_reason == "stop" and "".join(e.token for e in json_mode.logprobs) == json_mode.text


# --- through the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url():
    for url, _, _ in running_server():
        yield url


CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}


def test_openai_chat_logprobs_streamed_and_not(openai_client):
    resp = openai_client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token for t in content)
    chunks = list(openai_client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = openai_client.chat.completions.create(**CHAT)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == resp.choices[0].message.content
    # a stop string that never completes holds the last text back until the end: its tokens go out with it
    held = openai_client.chat.completions.create(**{**CHAT, "max_tokens": 60}, logprobs=True, stop=["?QQQ", "!QQQ", ".QQQ"])
    assert "".join(t.token for t in held.choices[0].logprobs.content) == held.choices[0].message.content


def test_openai_legacy_completions_logprobs(openai_client):
    resp = openai_client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                            temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text and len(lp.token_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert all(top.get(tok, value) == value for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert max(lp.top_logprobs[0].values()) == lp.token_logprobs[0]  # greedy took the most likely
    # a character split across tokens: its halves are written as bytes, and offsets count characters
    asian = openai_client.completions.create(model="smollm2", max_tokens=12, temperature=0, logprobs=1,
                                             prompt="Write the word for Japan in Japanese characters: 日本. Now write Tokyo in Japanese:")
    text, lp = asian.choices[0].text, asian.choices[0].logprobs
    assert any(t.startswith("bytes:\\x") for t in lp.tokens)
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert token.startswith("bytes:") or text[offset:].startswith(token)


def test_ollama_logprobs_streamed_and_not(ollama_client):
    ask = {"model": "smollm2", "options": {"temperature": 0, "num_predict": 6}, "logprobs": True, "top_logprobs": 1}
    whole = ollama_client.generate(prompt="Say hi.", **ask)
    assert "".join(t.token for t in whole.logprobs) == whole.response
    assert all(len(t.top_logprobs) == 1 for t in whole.logprobs)
    parts = list(ollama_client.chat(messages=[{"role": "user", "content": "Say hi."}], stream=True, **ask))
    tokens = [t for p in parts for t in (p.logprobs or [])]
    assert "".join(t.token for t in tokens) == "".join(p.message.content for p in parts)


@pytest.mark.parametrize("path, body, message", [
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be from 0 to 20"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs must be from 0 to 5"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 1, "echo": True}, "echo with logprobs"),
    ("/api/chat", {"messages": CHAT["messages"], "logprobs": "yes"}, "logprobs must be a boolean"),
])
def test_bad_logprobs_are_400s(url, path, body, message):
    resp = httpx.post(url + path, json=body, timeout=60)
    assert resp.status_code == 400 and message in resp.text, resp.text


def test_a_token_that_holds_part_of_a_character_has_its_own_bytes():
    from influence_tui.engine.logprobs import TokenTexts
    from influence_tui.engine.tokenizer import load_gguf_tokenizer
    from influence_tui.library import default_model_path

    tok = load_gguf_tokenizer(default_model_path())
    texts = TokenTexts(tok)
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])][:50]
    assert partial  # a byte-level vocabulary has them
    for i in partial:
        text, raw = texts(i)
        assert raw and bytes(raw) != "\ufffd".encode()  # the byte itself, not the replacement character
    whole = "é日"
    ids = tok.encode(whole)
    assert bytes(b for i in ids for b in texts(i)[1]).decode() == whole
    assert texts(tok.encode(" the")[0]) == (" the", list(b" the"))  # as it reads inside a text


def test_generate_and_batch_print_logprobs(tmp_path):
    import json
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, timeout=180)

    out = cli("generate", "Say hi.", "--json", "--logprobs", "2", "--temperature", "0", "--max-tokens", "6")
    body = json.loads(out.stdout)
    assert "".join(t["token"] for t in body["logprobs"]) == body["text"]
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in body["logprobs"])
    bad = cli("generate", "Say hi.", "--logprobs", "2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --logprobs") and len(bad.stderr.splitlines()) == 1
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "Say hi.", "logprobs": 0, "temperature": 0, "max_tokens": 6}) + "\n"
                     + json.dumps({"prompt": "Say hi.", "logprobs": 50}) + "\n"
                     + json.dumps({"prompt": "def f():", "suffix": "return 1"}) + "\n")
    rows = [json.loads(line) for line in cli("--batch", str(batch)).stdout.splitlines()]
    assert "".join(t["token"] for t in rows[0]["logprobs"]) == rows[0]["text"]
    assert rows[1]["error"] == "line 2: logprobs must be a whole number of alternatives from 0 to 20"
    assert "does not support insert" in rows[2]["error"]


def test_logit_bias_bans_and_forces_tokens(openai_client, url):
    from influence_tui.engine.tokenizer import load_gguf_tokenizer
    from influence_tui.library import default_model_path

    tok = load_gguf_tokenizer(default_model_path())
    plain = openai_client.chat.completions.create(**CHAT, logprobs=True).choices[0]
    first = tok.tok.token_to_id(plain.logprobs.content[0].token)  # the greedy answer's first token
    banned = openai_client.chat.completions.create(**CHAT, logit_bias={str(first): -100}).choices[0].message.content
    assert not banned.startswith(plain.logprobs.content[0].token)
    hello = tok.tok.token_to_id("Hello")
    forced = openai_client.chat.completions.create(**{**CHAT, "max_tokens": 1}, logit_bias={str(hello): 100})
    assert forced.choices[0].message.content == "Hello"
    for bias, message in (({"x": 1}, "logit_bias maps token ids"), ({"5": 101}, "logit_bias maps token ids"),
                          ({"999999": 1}, "beyond this model's vocabulary")):
        resp = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "logit_bias": bias}, timeout=60)
        assert resp.status_code == 400 and message in resp.json()["error"]["message"]
