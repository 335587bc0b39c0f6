"""Fill-in-the-middle (code completion between the code before and after the cursor): the prompt
a code model was trained on, and the middle it writes, through the engine and the official
clients' `suffix`; a model without fill-in-the-middle tokens is a 400 saying so."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("torch")  # the tiny code model is written with transformers

from influence_tui.engine import GenerationRequest  # noqa: E402
from influence_tui.params import GenerationParams  # noqa: E402
from server_support import built_model_server, running_server  # noqa: E402
from tests.tiny_models import FIM_MIDDLE, write_tiny_infiller  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "tiny-coder"
BEFORE, AFTER = "def add(a, b):\n", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def coder(tmp_path_factory):
    yield from built_model_server(tmp_path_factory.mktemp("models"), NAME, write_tiny_infiller, 20)


@pytest.fixture(scope="module")
def url(coder) -> str:
    return coder.url


def test_the_prompt_names_both_sides_with_the_models_tokens(coder):
    from influence_tui.engine.infill import SPELLINGS, fim_tokens

    scheduler = coder.engine._scheduler
    tok = scheduler.tok
    fim = fim_tokens(tok)
    assert [tok.tok.id_to_token(i) for i in (fim.prefix, fim.suffix, fim.middle)] == list(SPELLINGS[0])
    ids, _, _ = scheduler.build_prompt(GenerationRequest(prompt=BEFORE, suffix=AFTER))
    assert ids == [fim.prefix, *tok.encode(BEFORE), fim.suffix, *tok.encode(AFTER), fim.middle]
    result = coder.engine.generate(GenerationRequest(prompt=BEFORE, suffix=AFTER, params=GenerationParams(temperature=0)))
    assert (result.text, result.finish_reason) == (FIM_MIDDLE, "stop")


def test_both_clients_fill_in_the_middle(ollama_client, openai_client, client):
    resp = ollama_client.generate(model=NAME, prompt=BEFORE, suffix=AFTER, options={"temperature": 0})
    assert resp.response == FIM_MIDDLE and resp.done_reason == "stop"
    comp = openai_client.completions.create(model=NAME, prompt=BEFORE, suffix=AFTER, temperature=0, max_tokens=10)
    assert comp.choices[0].text == FIM_MIDDLE
    at_start = ollama_client.generate(model=NAME, prompt="", suffix=AFTER, options={"temperature": 0})  # cursor at the top
    assert at_start.response == FIM_MIDDLE
    assert "insert" in client.post("/api/show", json={"model": NAME}).json()["capabilities"]


def test_a_model_without_the_tokens_says_it_cannot():
    for url, _, _ in running_server():  # the bundled SmolLM2: no fill-in-the-middle tokens
        ollama = httpx.post(f"{url}/api/generate", json={"model": "smollm2", "prompt": BEFORE, "suffix": AFTER, "stream": False},
                            timeout=60)
        openai = httpx.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": BEFORE, "suffix": AFTER}, timeout=60)
        assert ollama.status_code == openai.status_code == 400
        assert "does not support insert (its vocabulary has no fill-in-the-middle tokens)" in ollama.json()["error"]
        assert "does not support insert" in openai.json()["error"]["message"]


def test_generate_and_batch_fill_in_the_middle_from_the_command_line(coder, tmp_path):
    import json
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "influence_tui", "-m", str(coder.folder), *args],
                              capture_output=True, text=True, timeout=180)

    out = cli("generate", BEFORE, "--suffix", AFTER, "--temperature", "0")
    assert out.returncode == 0 and out.stdout == FIM_MIDDLE + "\n", out.stderr
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "", "suffix": AFTER, "temperature": 0}) + "\n")
    rows = [json.loads(line) for line in cli("--batch", str(batch)).stdout.splitlines()]
    assert rows == [{"id": 1, "text": FIM_MIDDLE, "prompt_tokens": rows[0]["prompt_tokens"], "completion_tokens": 2,
                     "cached_tokens": 0, "finish_reason": "stop"}]
