"""One real engine with the bundled model for all the server tests of a pytest process.

Loading takes seconds on two cores, so the engine is loaded once per process and shared by the
module-scoped server fixtures of test_server, test_clients and test_openapi_fuzz; each module
starts its own `ServerRunner` (cheap) on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import atexit
import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from influence_tui.config import Settings

_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def shared_engine() -> tuple[Any, Settings]:
    from influence_tui.engine import Engine

    settings = Settings.load(use_file=False)
    engine = Engine(settings, max_batch=8, max_queue=64)
    engine.load()
    atexit.register(engine.shutdown)
    return engine, settings


def ensure_loaded(engine: Any) -> None:
    """A test may unload the model (keep_alive 0); the next one gets it back."""
    with _lock:
        if engine.status().model is None:
            engine.load()


def running_server(**kwargs: Any) -> Iterator[tuple[str, Any, Any]]:
    """(url, runner, engine) for a server on a free port over the shared engine; stops it after."""
    from influence_tui.server import ServerRunner

    engine, settings = shared_engine()
    ensure_loaded(engine)
    runner = ServerRunner(engine, settings, host="127.0.0.1", port=0, **kwargs)
    url = runner.start()
    try:
        yield url, runner, engine
    finally:
        runner.stop()


@dataclass
class BuiltServer:
    url: str
    engine: Any
    settings: Settings
    folder: Path


def built_model_server(models: Path, name: str, write: Callable[[Path], Path], max_tokens: int) -> Iterator[BuiltServer]:
    """A server on a free port over an engine of its own with a model that `write` builds (tests'
    tiny_models) in `models/name`, a models folder of its own so /api/show finds it by name;
    greedy, `max_tokens` at most. Stopped after."""
    from influence_tui.engine import Engine
    from influence_tui.server import ServerRunner

    folder = write(models / name)
    settings = Settings(warmup_tokens=0, output_dir=str(models), temperature=0.0, max_tokens=max_tokens)
    engine = Engine(settings, max_batch=2, models_dir=str(models))
    engine.load(str(folder))
    runner = ServerRunner(engine, settings, host="127.0.0.1", port=0)
    try:
        yield BuiltServer(runner.start(), engine, settings, folder)
    finally:
        runner.stop()
        engine.shutdown()


def sse_data(resp: Any) -> list[Any]:
    """The JSON of each `data:` event of a streamed response, up to `[DONE]`."""
    return [json.loads(line[len("data: "):]) for line in resp.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]
