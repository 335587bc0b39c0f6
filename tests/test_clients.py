"""The official `ollama` and `openai` Python clients against the server, unchanged: what apps that
speak those APIs will do. `pull` downloads from the loopback Hub (tests/hub_server.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from server_support import running_server, shared_engine

pytestmark = pytest.mark.slow
KEY = "client-key"


@pytest.fixture(scope="module")
def server():
    yield from running_server(api_key=KEY)


@pytest.fixture(scope="module")
def ollama_client(server):
    import ollama

    return ollama.Client(host=server[0], headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


GREEDY = {"temperature": 0, "num_predict": 8}


# --- ollama ---------------------------------------------------------------------------------------


def test_ollama_generate(ollama_client):
    resp = ollama_client.generate(model="smollm2", prompt="Say hi", options=GREEDY)
    assert resp.done and resp.response and resp.done_reason in ("stop", "length")
    assert resp.eval_count <= 8 and resp.total_duration > 0
    pieces = list(ollama_client.generate(model="smollm2", prompt="Say hi", options=GREEDY, stream=True))
    assert pieces[-1].done and "".join(p.response for p in pieces) == resp.response


def test_ollama_chat_streamed_and_not(ollama_client):
    messages = [{"role": "user", "content": "Hi"}]
    resp = ollama_client.chat(model="SmolLM2-135M-Instruct", messages=messages, options=GREEDY)
    assert resp.message.role == "assistant" and resp.message.content and resp.done
    parts = list(ollama_client.chat(model="SmolLM2-135M-Instruct", messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done and parts[-1].eval_count == resp.eval_count
    assert "".join(p.message.content for p in parts) == resp.message.content


def test_ollama_embed(ollama_client):
    resp = ollama_client.embed(model="minilm", input=["hello", "world"])
    assert len(resp.embeddings) == 2 and len(resp.embeddings[0]) == 384
    short = ollama_client.embed(model="minilm", input=["hello", "world"], dimensions=64)
    for full, head in zip(resp.embeddings, short.embeddings):  # the first 64 values, back to length 1
        norm = sum(x * x for x in full[:64]) ** 0.5
        assert len(head) == 64 and head == pytest.approx([x / norm for x in full[:64]], abs=1e-6)


def test_ollama_list_show_ps(ollama_client):
    names = [m.model for m in ollama_client.list().models]
    assert "SmolLM2-135M-Instruct:latest" in names and "all-MiniLM-L6-v2:latest" in names
    smol = next(m for m in ollama_client.list().models if m.model == "SmolLM2-135M-Instruct:latest")
    assert smol.details.quantization_level == "Q4_1" and smol.details.parameter_size == "135M"
    show = ollama_client.show("smollm2")
    assert show.details.family == "llama" and show.modelinfo["llama.context_length"] > 0
    assert "<|im_start|>" in show.template
    assert [m.model for m in ollama_client.ps().models] == ["SmolLM2-135M-Instruct:latest"]
    # the names it lists are names it answers to, and Ollama's name for the embedding model works
    assert ollama_client.generate(model=smol.model, prompt="Hi", options={"num_predict": 2}).done
    assert len(ollama_client.embed(model="all-minilm", input="hello").embeddings[0]) == 384


def test_ollama_errors_raise_response_error(ollama_client):
    import ollama

    with pytest.raises(ollama.ResponseError) as info:
        ollama_client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and "no-such-model" in info.value.error


def test_ollama_pull_from_the_loopback_hub(server, monkeypatch):
    import ollama

    for var in ("INFLUENCE_MIRROR", "HF_TOKEN"):  # the loopback Hub is the only one this test sees
        monkeypatch.delenv(var, raising=False)

    try:
        from influence_tui import hub  # noqa: F401
        from hub_server import LoopbackHub
    except ImportError as exc:  # the Hub code is another issue's; without it there is nothing to pull from
        pytest.skip(f"hub not available: {exc}")
    url, runner, engine = server
    payload = b"GGUF" + b"\0" * (100 * 1024)
    with LoopbackHub(cdn_threshold=32 * 1024) as hub_server:
        hub_server.add_repo("tester/tiny-GGUF", {"tiny-Q4_K_M.gguf": payload, "README.md": b"# tiny\n"})
        # the server reads the mirror from its settings: point a second server at the loopback Hub
        _, settings = shared_engine()
        from influence_tui.server import ServerRunner

        pulled = ServerRunner(engine, dataclasses.replace(settings, mirror=hub_server.url), host="127.0.0.1", port=0)
        base = pulled.start()
        try:
            client = ollama.Client(host=base)
            lines = list(client.pull("hf.co/tester/tiny-GGUF:Q4_K_M", stream=True))
            statuses = [line.status for line in lines]
            assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
            assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
            downloading = [line for line in lines if line.status.startswith("downloading")]
            assert downloading and downloading[-1].completed == downloading[-1].total == len(payload)
            assert downloading[-1].digest.startswith("sha256:")
            target = Path(settings.output_dir) / "tester_tiny-GGUF" / "tiny-Q4_K_M.gguf"
            assert target.read_bytes() == payload
            assert client.pull("tester/tiny-GGUF").status == "success"  # again, not streamed: nothing to fetch
            with pytest.raises(ollama.ResponseError) as info:
                client.pull("tester/missing-repo")
            assert "not found" in info.value.error
        finally:
            pulled.stop()
            import shutil

            shutil.rmtree(Path(settings.output_dir) / "tester_tiny-GGUF", ignore_errors=True)


def test_pull_is_not_blocked_by_the_engine_offline_switch(server):
    """The engine goes offline only while it loads: a server with a model loaded can still pull."""
    import os

    import huggingface_hub.constants

    assert not huggingface_hub.constants.is_offline_mode() and os.environ.get("HF_HUB_OFFLINE") != "1"


# --- openai ---------------------------------------------------------------------------------------


def test_openai_chat_streamed_and_not(openai_client):
    messages = [{"role": "user", "content": "Name a colour."}]
    resp = openai_client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    text = resp.choices[0].message.content
    assert text and resp.usage.completion_tokens <= 8 and resp.choices[0].finish_reason in ("stop", "length")
    stream = openai_client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_openai_completions(openai_client):
    resp = openai_client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert resp.choices[0].text and resp.usage.completion_tokens <= 6


def test_openai_embeddings(openai_client):
    import openai

    resp = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello", "world"])
    assert len(resp.data) == 2 and len(resp.data[0].embedding) == 384 and resp.usage.prompt_tokens > 0
    floats = openai_client.embeddings.create(model="minilm", input="hello", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-5)
    short = openai_client.embeddings.create(model="minilm", input="hello", dimensions=128).data[0].embedding
    assert len(short) == 128 and sum(x * x for x in short) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="at most 384"):
        openai_client.embeddings.create(model="minilm", input="hello", dimensions=1000)


def test_openai_models_list(openai_client):
    ids = [m.id for m in openai_client.models.list()]
    assert "SmolLM2-135M-Instruct" in ids


def test_openai_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], temperature=9)
    # a streamed request the engine refuses (too long for the context) is a 400 too, not a 200 stream
    with pytest.raises(openai.BadRequestError, match="context holds"):
        list(openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi " * 9000}],
                                                   stream=True))
    bad_key = openai.OpenAI(base_url=openai_client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_json_mode_through_both_clients(ollama_client, openai_client):
    import ollama
    import openai

    ask = "Give me a JSON object describing a cat with name and age."
    resp = ollama_client.generate(model="smollm2", prompt=ask, format="json", options={"temperature": 0, "num_predict": 300})
    assert resp.done_reason == "stop" and isinstance(json.loads(resp.response), dict)
    chat = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": ask}],
                                                 response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    assert chat.choices[0].finish_reason == "stop" and isinstance(json.loads(chat.choices[0].message.content), dict)
    # structured outputs, the way each client's documentation shows them: a Pydantic model's schema
    from typing import Literal

    from pydantic import BaseModel

    class Cat(BaseModel):
        name: str
        age: int
        color: Literal["black", "white", "orange", "grey"]
        indoor: bool

    resp = ollama_client.chat(model="smollm2", messages=[{"role": "user", "content": "Describe a cat."}],
                              format=Cat.model_json_schema(), options={"temperature": 0, "num_predict": 200})
    cat = Cat.model_validate_json(resp.message.content)
    assert resp.done_reason == "stop" and cat == Cat.model_validate(json.loads(resp.message.content))
    parsed = openai_client.chat.completions.parse(model="smollm2", messages=[{"role": "user", "content": "Describe a cat."}],
                                                  response_format=Cat, temperature=0.8, seed=5, max_tokens=200)
    message = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop" and isinstance(message.parsed, Cat), message.content
    with pytest.raises(ollama.ResponseError, match="JSON schema: #/properties/age/type: unknown type 'int'"):
        ollama_client.generate(model="smollm2", prompt=ask, format={"type": "object", "properties": {"age": {"type": "int"}}})
    with pytest.raises(openai.BadRequestError, match="json_schema must be an object"):
        openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": ask}],
                                              response_format={"type": "json_schema", "json_schema": "cat"})