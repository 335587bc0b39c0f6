"""The engine: one worker thread owns the model; the TUI, the server and the CLI submit to it.

    engine = Engine(settings)                 # cheap: no torch import (until a model needs it)
    engine.load("smollm2")                    # name from `influence list`, alias, or path; blocks
    stream = engine.submit(GenerationRequest(messages=[ChatMessage("user", "Hi")]))
    for event in stream: print(event.text, end="")      # or: async for event in stream
    stream.result.usage                        # tokens, timings, cached/dropped tokens

Requests that arrive together are decoded together (continuous batching); a conversation's KV
cache is kept between turns so only new tokens are prefilled.
"""

from __future__ import annotations

from influence_tui.engine.types import (
    ChatMessage,
    GenerationRequest,
    GenerationStream,
    Result,
    TokenEvent,
    Usage,
)
from influence_tui.engine.tools import ToolCall
from influence_tui.engine.service import (
    EmbeddingResult,
    Engine,
    EngineError,
    EngineStatus,
    ModelSummary,
    QueueFull,
)

__all__ = [
    "ChatMessage",
    "EmbeddingResult",
    "Engine",
    "EngineError",
    "EngineStatus",
    "GenerationRequest",
    "GenerationStream",
    "ModelSummary",
    "QueueFull",
    "Result",
    "TokenEvent",
    "ToolCall",
    "Usage",
]
