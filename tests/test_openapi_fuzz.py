"""Schemathesis over /openapi.json against the live server: whatever it sends, no 5xx.

Bounded to a few examples per operation. Generation stays short: the server's default max_tokens
is 4 here, and the test caps `max_tokens`/`num_predict` in each generated body (values outside the
schema, from negative testing, included). `keep_alive` is dropped from generation bodies so that
the model is not unloaded mid-run, and /api/pull is left out: its failures depend on the network
(it is covered by the client test with the loopback Hub).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from server_support import ensure_loaded, shared_engine

pytestmark = pytest.mark.slow
MAX_TOKENS = 4
SKIP = {("POST", "/api/pull")}


@pytest.fixture(scope="module")
def fuzz_server():
    from influence_tui.server import ServerRunner

    engine, base = shared_engine()
    ensure_loaded(engine)
    quick = dataclasses.replace(base, max_tokens=MAX_TOKENS, mirror="http://127.0.0.1:9")
    runner = ServerRunner(engine, quick, host="127.0.0.1", port=0)
    url = runner.start()
    yield url
    runner.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    raw = httpx.get(f"{fuzz_server}/openapi.json", timeout=30).json()
    for method, path in SKIP:
        raw["paths"].get(path, {}).pop(method.lower(), None)
    loaded = schemathesis.openapi.from_dict(raw)
    # the coverage phase sends hundreds of boundary cases per operation (every method, every
    # field's edge): too many generations for a two-core run; the fuzzing phase stays bounded
    loaded.config.phases.coverage.enabled = False
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


def _cap(body: Any) -> None:
    """Keep any generated request short, whatever the fuzzer put in it."""
    if not isinstance(body, dict):
        return
    body.pop("keep_alive", None)
    # long generated texts (exotic unicode: several tokens a character) only make prefill slow on
    # two cores; the server handles them the same way as short ones
    for key in ("prompt", "system"):
        if isinstance(body.get(key), str):
            body[key] = body[key][:40]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:3]
        for message in body["messages"]:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = message["content"][:40]
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool) and body[key] > MAX_TOKENS:
            body[key] = MAX_TOKENS
    options = body.get("options")
    if isinstance(options, dict):
        value = options.get("num_predict")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value > MAX_TOKENS or value < 0):
            options["num_predict"] = MAX_TOKENS


@schema.parametrize()
@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    _cap(case.body)
    case.call_and_validate(base_url=fuzz_server, checks=[not_a_server_error], timeout=60)
    # the model stays loaded (a generated `model` may name an unloadable one: that is a 4xx, not a switch)
    ensure_loaded(shared_engine()[0])
