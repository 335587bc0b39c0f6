"""The local API server: native, OpenAI- and Ollama-compatible routes over the shared engine.

`create_app` builds the Starlette app; `ServerRunner` serves it from a background thread (the
app's toggle, `influence serve`); `server.cli.run_serve` is the `influence serve|deploy` command.
Nothing here imports torch: the engine does, when a model loads.
"""

from influence_tui.server.runner import RunnerStatus, ServerError, ServerRunner

__all__ = ["RunnerStatus", "ServerError", "ServerRunner", "create_app"]


def __getattr__(name: str):  # create_app pulls in Starlette: only when asked for
    if name == "create_app":
        from influence_tui.server.app import create_app

        return create_app
    raise AttributeError(name)
