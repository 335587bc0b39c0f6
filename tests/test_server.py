"""The API server over the real engine and the bundled model, with raw HTTP: exact wire formats,
errors, limits, the API key, disconnects, concurrency, the runner and the serve command."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_support import ensure_loaded, running_server, shared_engine

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server():
    yield from running_server()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


def sse_events(lines: list[str]) -> list[str]:
    """The data of each event; checks the framing: every event is one `data:` line and a blank line."""
    out = []
    assert lines[-1] == "" or lines[-1].startswith("data:")
    it = iter(lines)
    for line in it:
        assert line.startswith("data: "), line
        out.append(line[len("data: "):])
        assert next(it, "") == "", "each event ends with a blank line"
    return out


def stream_lines(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    with client.stream("POST", path, json=body) as resp:
        lines = list(resp.iter_lines())
    return resp, lines


# --- native routes --------------------------------------------------------------------------------


def test_health(client):
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["model"] == "SmolLM2-135M-Instruct"
    assert body["device"] == "cpu" and body["uptime_s"] >= 0


def test_native_generate_json_and_sse(client):
    body = {"prompt": "Say hi", "max_tokens": 8, **GREEDY}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200
    plain = resp.json()
    assert plain["text"] and plain["finish_reason"] in ("stop", "length")
    assert plain["usage"]["completion_tokens"] <= 8 and plain["usage"]["prompt_tokens"] > 0

    resp, lines = stream_lines(client, "/generate", {**body, "stream": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["done"] is True and final["finish_reason"] == plain["finish_reason"]
    pieces = [json.loads(e)["text"] for e in events[:-2]]
    assert "".join(pieces) == final["text"] == plain["text"]


def test_native_generate_follows_a_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"]}
    resp = client.post("/generate", json={"prompt": "Tell me about Paris.", "max_tokens": 100, "format": schema, **GREEDY})
    answer = json.loads(resp.json()["text"])
    assert set(answer) == {"city", "population"} and isinstance(answer["population"], int) and answer["population"] >= 0
    bad = client.post("/generate", json={"prompt": "hi", "format": {"type": "object", "properties": {"n": {"type": "int"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "JSON schema: #/properties/n/type: unknown type 'int'"
    assert client.post("/generate", json={"prompt": "hi", "format": "yaml"}).status_code == 400


def test_native_chat_completions_is_openai_shaped(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, **GREEDY}
    # the original tool's curl example sends no `stream` and gets a stream
    resp = client.post("/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # a client that accepts only JSON (the openai client without /v1), or says stream false: one object
    resp = client.post("/chat/completions", json=body, headers={"Accept": "application/json"})
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"
    assert resp.json()["choices"][0]["message"]["content"] == streamed
    resp = client.post("/chat/completions", json={**body, "stream": False})
    assert resp.json()["object"] == "chat.completion"


# --- OpenAI ---------------------------------------------------------------------------------------


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "max_tokens": 10, **GREEDY}


def test_openai_chat_non_streamed(client):
    resp = client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "SmolLM2-135M-Instruct"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 10
    assert body["timings"]["predicted_n"] == usage["completion_tokens"]
    assert body["timings"]["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]


def test_openai_chat_sse_exact_format(client):
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    resp, lines = stream_lines(client, "/v1/chat/completions",
                               {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, last = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] and last["choices"][0]["delta"] == {}
    middle = chunks[1:-2]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in middle)
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert text == plain["choices"][0]["message"]["content"]


def test_openai_chat_stream_without_usage_has_no_usage_chunk(client):
    resp, lines = stream_lines(client, "/v1/chat/completions", {**CHAT, "stream": True})
    chunks = [json.loads(e) for e in sse_events(lines)[:-1]]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_openai_completions(client):
    body = {"prompt": "The capital of France is", "max_tokens": 6, **GREEDY}
    plain = client.post("/v1/completions", json=body).json()
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"]
    assert plain["usage"]["completion_tokens"] <= 6
    resp, lines = stream_lines(client, "/v1/completions", {**body, "stream": True})
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()
    assert echoed["choices"][0]["text"] == body["prompt"] + plain["choices"][0]["text"]


def test_openai_embeddings_float_and_base64(client):
    floats = client.post("/v1/embeddings", json={"input": ["hello", "world"]}).json()
    assert floats["object"] == "list" and floats["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in floats["data"]] == [0, 1] and len(floats["data"][0]["embedding"]) == 384
    assert floats["usage"]["prompt_tokens"] > 0
    b64 = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_openai_models(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "SmolLM2-135M-Instruct" in ids and "all-MiniLM-L6-v2" in ids
    assert client.get("/v1/models/smollm2").json()["id"] == "SmolLM2-135M-Instruct"
    assert client.get("/v1/models/nope").status_code == 404


# --- Ollama ---------------------------------------------------------------------------------------


FINAL_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


def test_ollama_probe_and_version(client):
    assert client.get("/").text == "Ollama is running"
    assert client.head("/").status_code == 200
    assert isinstance(client.get("/api/version").json()["version"], str)


def test_ollama_generate_ndjson(client):
    body = {"model": "smollm2", "prompt": "Say hi", "options": {"num_predict": 8, "temperature": 0}}
    resp, lines = stream_lines(client, "/api/generate", body)
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    objs = [json.loads(line) for line in lines if line]
    *pieces, final = objs
    assert pieces and all(p["done"] is False and p["model"] == "smollm2" and p["created_at"].endswith("Z") for p in pieces)
    assert final["done"] is True and final["response"] == "" and final["done_reason"] in ("stop", "length")
    for name in FINAL_FIELDS:
        assert isinstance(final[name], int), name
    assert final["eval_count"] <= 8 and final["prompt_eval_count"] > 0
    assert final["total_duration"] >= final["eval_duration"] > 0
    plain = client.post("/api/generate", json={**body, "stream": False}).json()
    assert plain["response"] == "".join(p["response"] for p in pieces)
    assert plain["done"] is True and all(name in plain for name in FINAL_FIELDS)


def test_ollama_generate_options_map_onto_params(client):
    # num_predict caps the answer; stop cuts it; seed+temperature make sampling repeatable
    body = {"prompt": "Count: 1, 2, 3,", "raw": True, "stream": False,
            "options": {"num_predict": 12, "temperature": 0.8, "seed": 7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                        "repeat_penalty": 1.1, "presence_penalty": 0.1, "frequency_penalty": 0.1, "num_ctx": 256}}
    a = client.post("/api/generate", json=body).json()
    b = client.post("/api/generate", json=body).json()
    assert a["response"] == b["response"] and a["eval_count"] <= 12
    short = client.post("/api/generate", json={**body, "options": {"num_predict": 3, "temperature": 0}}).json()
    assert short["eval_count"] <= 3 and short["done_reason"] == "length"


def test_ollama_chat_stream_and_not(client):
    body = {"model": "SmolLM2-135M-Instruct:latest", "messages": [{"role": "user", "content": "Hi"}],
            "options": {"num_predict": 8, "temperature": 0}}
    resp, lines = stream_lines(client, "/api/chat", body)
    objs = [json.loads(line) for line in lines if line]
    *pieces, final = objs
    assert all(p["message"]["role"] == "assistant" and p["done"] is False for p in pieces)
    assert final["done"] is True and final["message"]["content"] == "" and all(n in final for n in FINAL_FIELDS)
    plain = client.post("/api/chat", json={**body, "stream": False}).json()
    assert plain["message"]["content"] == "".join(p["message"]["content"] for p in pieces)


def test_ollama_models_routes(client):
    tags = client.get("/api/tags").json()["models"]
    assert client.post("/api/tags").json()["models"] == tags
    smol = next(m for m in tags if m["name"] == "SmolLM2-135M-Instruct:latest")  # Ollama's model:tag
    assert smol["details"] == {**smol["details"], "format": "gguf", "family": "llama", "parameter_size": "135M",
                               "quantization_level": "Q4_1"}
    assert smol["size"] > 0 and len(smol["digest"]) == 64
    show = client.post("/api/show", json={"model": "smollm2"}).json()
    assert show["model_info"]["general.architecture"] == "llama" and show["model_info"]["llama.context_length"] > 0
    assert show["details"]["quantization_level"] == "Q4_1" and "completion" in show["capabilities"]
    assert "<|im_start|>" in show["template"]  # the GGUF's own chat template
    ps = client.get("/api/ps").json()["models"]
    assert [m["name"] for m in ps] == ["SmolLM2-135M-Instruct:latest"]
    # the name it lists is one it answers to
    resp = client.post("/api/generate", json={"model": tags[0]["name"], "prompt": "Hi", "stream": False,
                                              "options": {"num_predict": 2}})
    assert resp.status_code == 200


def test_ollama_embed_and_embeddings(client):
    one = client.post("/api/embed", json={"input": "hello"}).json()
    two = client.post("/api/embed", json={"model": "minilm", "input": ["hello", "world"]}).json()
    assert len(one["embeddings"]) == 1 and len(two["embeddings"]) == 2 and two["model"] == "minilm"
    assert one["embeddings"][0] == pytest.approx(two["embeddings"][0], abs=1e-5)
    assert two["prompt_eval_count"] > 0 and isinstance(two["total_duration"], int)
    legacy = client.post("/api/embeddings", json={"prompt": "hello"}).json()
    assert legacy["embedding"] == pytest.approx(one["embeddings"][0], abs=1e-5)


def _tiny_model(folder: Path) -> None:
    """A usable-looking safetensors model folder: header, one tensor, config, tokenizer."""
    folder.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")


def test_ollama_delete(client, server):
    engine, settings = shared_engine()
    models = Path(settings.output_dir)
    _tiny_model(models / "org_tiny")
    assert "org_tiny:latest" in [m["name"] for m in client.get("/api/tags").json()["models"]]
    resp = client.request("DELETE", "/api/delete", json={"model": "org_tiny"})
    assert resp.status_code == 200 and not (models / "org_tiny").exists()
    again = client.request("DELETE", "/api/delete", json={"model": "org_tiny"})
    assert again.status_code == 404 and "org_tiny" in again.json()["error"]
    bundled = client.request("DELETE", "/api/delete", json={"model": "smollm2"})
    assert bundled.status_code == 403 and engine.status().model is not None


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions", "/generate"])
def test_malformed_json_is_400_in_dialect_shape(client, path):
    resp = client.post(path, content=b'{"model": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and "JSON" in error
    else:
        assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


@pytest.mark.parametrize("path,body,word", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/embeddings", {"input": 5}, "input"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "options": {"top_p": 2}}, "options.top_p"),
    ("/api/generate", {"prompt": "x", "options": {"num_predict": "ten"}}, "num_predict"),
    ("/api/generate", {"prompt": "x", "keep_alive": "soon"}, "keep_alive"),
    ("/api/generate", [1, 2], "object"),
    ("/generate", {"prompt": 3}, "prompt"),
    ("/generate", {"max_tokens": 5}, "prompt"),
])
def test_bad_values_are_400_with_a_message(client, path, body, word):
    resp = client.post(path, json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert word in message


def test_unknown_route_and_method(client):
    resp = client.get("/v1/nothing")
    assert resp.status_code == 404 and "/v1/nothing" in resp.json()["error"]["message"]
    resp = client.get("/api/nothing")
    assert resp.status_code == 404 and isinstance(resp.json()["error"], str)
    assert client.get("/api/chat").status_code == 405


def test_unknown_model_is_404_naming_it(client):
    for path, body in [("/api/chat", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
                       ("/api/generate", {"model": "no-such-model", "prompt": "x"}),
                       ("/api/show", {"model": "no-such-model"}),
                       ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/embeddings", {"model": "no-such-model", "input": "x"})]:
        resp = client.post(path, json=body)
        assert resp.status_code == 404, path
        assert "no-such-model" in json.dumps(resp.json())


def test_embedding_model_on_a_chat_route_is_400(client):
    resp = client.post("/api/chat", json={"model": "minilm", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 400 and "embedding" in resp.json()["error"]


def test_oversized_body_is_413():
    engine, settings = shared_engine()
    for url, _runner, _engine in running_server(max_body=1024):
        with httpx.Client(base_url=url, timeout=30) as c:
            big = {"messages": [{"role": "user", "content": "x" * 4096}]}
            assert c.post("/v1/chat/completions", json=big).status_code == 413
            assert c.post("/api/chat", json=big).json()["error"].startswith("request body is larger")

            def chunks():  # no Content-Length: the limit counts bytes as they arrive
                yield b'{"prompt": "'
                for _ in range(8):
                    yield b"y" * 512
                yield b'"}'

            assert c.post("/api/generate", content=chunks()).status_code == 413


def test_queue_full_is_503_with_retry_after(client):
    engine, _ = shared_engine()
    saved = engine.max_queue
    engine.max_queue = 0
    try:
        resp = client.post("/api/generate", json={"prompt": "x", "stream": False})
        assert resp.status_code == 503 and resp.headers["retry-after"].isdigit()
        resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "queue_full"
    finally:
        engine.max_queue = saved


class _LoadingEngine:
    """Only what /health reads: an engine in the middle of loading a model."""

    def status(self):
        from influence_tui.engine import EngineStatus

        return EngineStatus(state="loading", model=None, loading="big.gguf", error=None, in_flight=0, queued=0,
                            served=0, device="cpu")


def test_health_is_503_while_loading():
    from influence_tui.server import ServerRunner

    _, settings = shared_engine()
    runner = ServerRunner(_LoadingEngine(), settings, host="127.0.0.1", port=0)
    url = runner.start()
    try:
        resp = httpx.get(f"{url}/health", timeout=10)
        assert resp.status_code == 503 and resp.headers["retry-after"]
        assert resp.json()["loading"] == "big.gguf"
    finally:
        runner.stop()


def test_api_key():
    for url, _runner, _engine in running_server(api_key="s3cret"):
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200
        resp = httpx.get(f"{url}/api/tags")
        assert resp.status_code == 401 and "API key" in resp.json()["error"]
        resp = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_cors_off_by_default_and_on_when_configured(client):
    headers = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/api/chat", headers=headers).headers
    for url, _runner, _engine in running_server(cors_origins=["http://example.test"], api_key="k"):
        resp = httpx.options(f"{url}/api/chat", headers=headers)
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "http://example.test"


def test_openapi_describes_the_routes(client):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/health", "/generate", "/chat/completions", "/v1/chat/completions", "/v1/completions",
                 "/v1/embeddings", "/v1/models", "/api/generate", "/api/chat", "/api/tags", "/api/show",
                 "/api/embed", "/api/embeddings", "/api/ps", "/api/pull", "/api/delete", "/api/version", "/"):
        assert path in schema["paths"], path


# --- many clients, disconnects --------------------------------------------------------------------


PROMPTS = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "Name a planet."]


def _stream_chat_text(url: str, prompt: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "stream": True, **GREEDY}
    with httpx.Client(base_url=url, timeout=120) as c:
        _, lines = stream_lines(c, "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in sse_events(lines)[:-1]]
    return "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])


def _concurrently(url: str, prompts: list[str]) -> tuple[list[str], int]:
    """The streamed texts of the prompts sent all at once, and the most requests seen in flight."""
    engine, _ = shared_engine()
    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.status().in_flight)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: _stream_chat_text(url, p), prompts))
    finally:
        done.set()
        watcher.join()
    return together, peak


def test_eight_concurrent_streams_all_complete_together(url):
    together, peak = _concurrently(url, PROMPTS * 2)
    assert all(together) and peak > 1, "requests were not decoded together"
    # each stream carries its own answer (nothing crossed between connections)
    assert "Bonjour" in together[2] and "Bonjour" in together[6]
    assert "Bonjour" not in together[0] + together[1] + together[3]


def test_eight_concurrent_streams_match_their_text_alone(url):
    prompts = PROMPTS * 2
    alone = {p: _stream_chat_text(url, p) for p in PROMPTS}
    together, _ = _concurrently(url, prompts)
    assert together == [alone[p] for p in prompts]


def _wait_idle(engine, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while engine.status().in_flight or engine.status().queued:
        assert time.monotonic() - start < timeout, "the generation was not cancelled"
        time.sleep(0.05)
    return time.monotonic() - start


def test_disconnect_cancels_a_streamed_generation(url):
    engine, _ = shared_engine()
    served = engine.status().served
    body = {"prompt": "Write a very long story about the sea.", "options": {"num_predict": 2000, "temperature": 0}}
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/api/generate", json=body) as resp:
            lines = resp.iter_lines()
            assert json.loads(next(lines))["done"] is False
            assert engine.status().in_flight == 1
    # closing the response closed the connection: the server cancels well before 2000 tokens
    _wait_idle(engine)
    assert engine.status().served >= served


def test_disconnect_cancels_a_non_streamed_generation(url):
    engine, _ = shared_engine()
    body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
    _wait_idle(engine)


# --- load / unload, runner, serve command ------------------------------------------------------------


def test_runner_status_counts_requests(server, client):
    url, runner, _ = server
    before = runner.status()
    client.get("/api/tags")
    after = runner.status()
    assert after.running and after.url == url and after.model == "SmolLM2-135M-Instruct"
    assert after.requests_served == before.requests_served + 1 and after.in_flight == 0


def test_runner_reports_a_busy_port(server):
    from influence_tui.server import ServerError, ServerRunner

    url, _, engine = server
    port = int(url.rsplit(":", 1)[1])
    _, settings = shared_engine()
    with pytest.raises(ServerError, match="in use"):
        ServerRunner(engine, settings, host="127.0.0.1", port=port).start()


def test_keep_alive_zero_unloads_and_empty_prompt_loads(client):
    engine, _ = shared_engine()
    resp = client.post("/api/generate", json={"model": "smollm2", "prompt": "", "keep_alive": 0})
    body = resp.json()
    assert resp.status_code == 200 and body["done"] is True and body["done_reason"] == "unload"
    assert engine.status().model is None
    assert client.get("/api/ps").json()["models"] == []
    resp = client.post("/api/chat", json={"model": "smollm2", "messages": []})
    body = resp.json()
    assert body["done_reason"] == "load" and body["message"]["content"] == ""
    assert engine.status().model is not None
    ensure_loaded(engine)


def test_serve_status_and_stop_without_a_server(capsys):
    from influence_tui.server.cli import is_loopback, run_serve

    import argparse

    _, settings = shared_engine()
    assert run_serve(argparse.Namespace(status=True, stop=False, detached=False), settings) == 1
    assert run_serve(argparse.Namespace(status=False, stop=True, detached=False), settings) == 1
    assert "no detached server" in capsys.readouterr().out
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_detached_status_and_stop(tmp_path):
    """`influence serve --detached` starts a background server with pid and log files; --stop ends it."""
    import os
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "INFLUENCE_CONFIG_DIR": str(tmp_path / "cfg"), "INFLUENCE_API_KEY": "detached-key"}
    cmd = [sys.executable, "-m", "influence_tui", "serve"]
    started = subprocess.run([*cmd, "--detached", "--port", str(port)], env=env, capture_output=True, text=True,
                             timeout=240)
    try:
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        info = json.loads((tmp_path / "cfg" / "server.pid").read_text())
        assert (tmp_path / "cfg" / "server.log").is_file()
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["model"] == "SmolLM2-135M-Instruct"
        # the key reached the child through its environment, not its command line
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags", timeout=10).status_code == 401
        status = subprocess.run([*cmd, "--status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and str(info["pid"]) in status.stdout
    finally:
        stopped = subprocess.run([*cmd, "--stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert not (tmp_path / "cfg" / "server.pid").exists()


# --- what Ollama and OpenAI clients rely on beyond the basics --------------------------------------


def test_load_duration_reports_the_load_a_request_waited_for(client):
    engine, _ = shared_engine()
    client.post("/api/generate", json={"model": "smollm2", "keep_alive": 0})
    assert engine.status().model is None
    ask = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    first = client.post("/api/generate", json=ask).json()
    again = client.post("/api/generate", json=ask).json()
    assert first["load_duration"] > 0 and again["load_duration"] == 0
    assert first["total_duration"] > first["load_duration"]
    ensure_loaded(engine)


def test_generate_context_continues_a_conversation(client):
    ask = {"model": "smollm2", "stream": False, "options": {"num_predict": 6, "temperature": 0}}
    first = client.post("/api/generate", json={**ask, "prompt": "My name is Ada."}).json()
    context = first["context"]
    assert all(isinstance(t, int) for t in context)
    assert len(context) == first["prompt_eval_count"] + first["eval_count"]
    alone = client.post("/api/generate", json={**ask, "prompt": "What is my name?"}).json()
    follow = client.post("/api/generate", json={**ask, "prompt": "What is my name?", "context": context}).json()
    # the earlier conversation's tokens, then the new prompt's: the model sees both
    assert follow["prompt_eval_count"] == len(context) + alone["prompt_eval_count"]
    assert follow["context"][: len(context)] == context
    # streamed, the last line carries it too
    lines = [json.loads(x) for x in client.post("/api/generate", json={**ask, "stream": True, "prompt": "Hi"}).text.splitlines()]
    assert lines[-1]["done"] and lines[-1]["context"] and "context" not in lines[0]
    bad = client.post("/api/generate", json={**ask, "prompt": "Hi", "context": [10**9]})
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]
    chat = client.post("/api/chat", json={"model": "smollm2", "stream": False, "messages": [{"role": "user", "content": "Hi"}],
                                          "options": {"num_predict": 2}}).json()
    assert "context" not in chat  # /api/chat keeps its messages instead


def test_seed_minus_one_means_random_and_repeat_last_n_minus_one_the_whole_context(client):
    ask = {"model": "smollm2", "prompt": "Tell a story.", "stream": False,
           "options": {"num_predict": 16, "temperature": 1.5, "seed": -1}}
    texts = {client.post("/api/generate", json=ask).json()["response"] for _ in range(3)}
    assert len(texts) > 1  # Ollama's and llama.cpp's -1: a new seed each time
    fixed = {"model": "smollm2", "prompt": "Tell a story.", "stream": False,
             "options": {"num_predict": 16, "temperature": 1.5, "seed": 7}}
    assert len({client.post("/api/generate", json=fixed).json()["response"] for _ in range(2)}) == 1
    resp = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "seed": -1, "max_tokens": 2})
    assert resp.status_code == 200
    resp = client.post("/api/generate", json={**fixed, "options": {"repeat_last_n": -1, "num_predict": 2}})
    assert resp.status_code == 200


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_keep_alive_of_a_generation_request(client):
    from datetime import datetime, timezone

    engine, _ = shared_engine()
    ask = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    client.post("/api/generate", json={**ask, "keep_alive": "10m"})
    expires = datetime.fromisoformat(client.get("/api/ps").json()["models"][0]["expires_at"].replace("Z", "+00:00"))
    assert 590 < (expires - datetime.now(timezone.utc)).total_seconds() <= 600
    client.post("/api/generate", json=ask)  # none asked for: the model stays
    assert client.get("/api/ps").json()["models"][0]["expires_at"].startswith("2318")
    # 0: unloaded once the answer is sent (streamed or not)
    lines = client.post("/api/chat", json={"model": "smollm2", "keep_alive": 0, "options": {"num_predict": 2},
                                           "messages": [{"role": "user", "content": "Hi"}]}).text.splitlines()
    assert json.loads(lines[-1])["done"]
    assert _wait_until(lambda: engine.status().model is None)
    assert client.get("/api/ps").json()["models"] == []
    ensure_loaded(engine)
    # a short keep_alive expires after the answer, not during it
    body = client.post("/api/generate", json={**ask, "keep_alive": "1s"}).json()
    assert body["done"] and engine.status().model is not None
    assert _wait_until(lambda: engine.status().model is None, timeout=15)
    ensure_loaded(engine)


def test_embed_truncate_false_refuses_a_text_too_long(client):
    long = "hello " * 2000
    cut = client.post("/api/embed", json={"model": "all-minilm", "input": long})
    assert cut.status_code == 200 and cut.json()["prompt_eval_count"] == 512
    refused = client.post("/api/embed", json={"model": "all-minilm", "input": ["short", long], "truncate": False})
    assert refused.status_code == 400 and "input 1 is longer than the 512 tokens" in refused.json()["error"]


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 9000}], "stream": True}, "openai"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hello " * 9000}]}, "ollama"),
    ("/api/generate", {"prompt": "hello " * 9000}, "ollama"),
    ("/generate", {"prompt": "hello " * 9000, "stream": True, "raw": False}, "openai"),
])
def test_a_streamed_request_the_engine_refuses_gets_a_4xx_not_a_200(client, path, body, shape):
    """A chat too long for the context even without its history (a raw prompt is cut instead)."""
    resp = client.post(path, json={"model": "smollm2", **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    message = error if shape == "ollama" else error["message"]
    assert "context holds" in message
    if shape == "openai":
        assert error["type"] == "invalid_request_error"


def test_openai_error_codes_are_strings_or_null(client):
    bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] is None
    missing = client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]})
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    typed = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                                                      "stream_options": {"include_usage": "yes"}})
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "stream_options.include_usage"


def test_a_request_with_a_lone_surrogate_fails_alone(client):
    """JSON may escape a lone surrogate; the tokenizer cannot take it. That request gets a 400, and
    requests admitted with it in the same step still answer."""
    good = {"model": "smollm2", "stream": False, "options": {"num_predict": 3, "temperature": 0}}
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(client.post, "/api/generate", content='{"model": "smollm2", "prompt": "hi \\udcce", "stream": false}',
                          headers={"content-type": "application/json"})
        fine = [pool.submit(client.post, "/api/generate", json={**good, "prompt": f"Say {i}"}) for i in range(3)]
        assert bad.result().status_code == 400 and "lone surrogate" in bad.result().json()["error"]
        assert all(f.result().status_code == 200 and f.result().json()["done"] for f in fine)


def test_keep_alive_out_of_range_values(client):
    ask = {"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    nan = client.post("/api/generate", content=json.dumps({**ask, "keep_alive": float("nan")}),
                      headers={"content-type": "application/json"})
    assert nan.status_code == 400 and "keep_alive" in nan.json()["error"]
    for forever in ("1e400", "1e12", '"99999999999999h"'):  # JSON's 1e400 parses to infinity
        body = json.dumps(ask)[:-1] + f', "keep_alive": {forever}}}'
        assert client.post("/api/generate", content=body, headers={"content-type": "application/json"}).status_code == 200
        ps = client.get("/api/ps")
        assert ps.status_code == 200 and ps.json()["models"][0]["expires_at"].startswith("2318")


def test_an_explicit_unload_waits_for_the_answers_being_streamed(client):
    """keep_alive 0 with an empty prompt (ollama stop) while another client streams: that answer
    finishes whole, then the model goes."""
    engine, _ = shared_engine()
    body = {"model": "smollm2", "prompt": "Write a long story about a lighthouse.", "stream": False,
            "options": {"num_predict": 60, "temperature": 0}}
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(client.post, "/api/generate", json=body)
        assert _wait_until(lambda: engine.status().in_flight == 1)
        unload = client.post("/api/generate", json={"model": "smollm2", "keep_alive": 0})
        assert unload.json()["done_reason"] == "unload"
        result = answer.result().json()
    assert result["eval_count"] == 60 and result["done_reason"] == "length"
    assert _wait_until(lambda: engine.status().model is None)
    ensure_loaded(engine)
