"""Data that travels between the engine's worker thread and its clients (TUI, server, CLI).

No torch import here: clients import these types at start-up.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal

from influence_tui.engine.tools import ToolCall
from influence_tui.params import GenerationParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (their results follow as "tool" messages)
    tool_call_id: str | None = None  # a tool message: which call it answers
    name: str | None = None  # a tool message: the tool's name

    def to_dict(self) -> dict[str, Any]:
        """As chat templates read messages (transformers' convention)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [{"id": c.id or f"call_{i}", "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for i, c in enumerate(self.tool_calls)]
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        if self.name:
            d["name"] = self.name
        return d


@dataclass
class GenerationRequest:
    """Either `prompt` (raw text, or wrapped in the chat template unless `raw`) or `messages`."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    raw: bool = False  # prompt goes to the model as-is, no chat template
    num_ctx: int | None = None  # cap the context below the model's own maximum
    context: list[int] | None = None  # token ids to continue from (an earlier Result.context, Ollama's `context`)
    format: str | None = None  # "json": the answer is one JSON object (constrained as it is sampled)
    # with format "json": a JSON schema the answer follows instead (structured outputs, see
    # engine.json_schema); RequestError where the schema cannot be followed
    json_schema: dict[str, Any] | bool | None = None
    # reasoning models: None lets the model think (its reasoning comes apart from the answer, see
    # engine.reasoning), False asks it not to (an empty think block ends the prompt)
    think: bool | None = None
    # tools the model may call, as OpenAI and Ollama describe them ({"type": "function", "function":
    # {"name", "description", "parameters"}}): into the prompt through the chat template; the calls
    # come back in Result.tool_calls (see engine.tools)
    tools: list[dict[str, Any]] | None = None
    # with tools: "required" (the answer must be a call) or a tool's name (a call of that one);
    # None lets the model choose. Forced where the model's calls open with a tag of their own.
    tool_choice: str | None = None
    # OpenAI's logit_bias: token id -> a value added to its logit at every step (-100 bans it,
    # +100 all but forces it)
    logit_bias: dict[int, float] | None = None
    # fill-in-the-middle: `prompt` is the code before the gap and this the code after it; the answer
    # is what goes between (engine.infill; no chat template, no system prompt)
    suffix: str | None = None
    # log-probabilities of the answer's tokens (engine.logprobs): None for none, N for each token's
    # own and its N most likely alternatives (0-20)
    logprobs: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache (llama-server's cache_n)
    dropped_tokens: int = 0  # history tokens dropped to fit the context window
    reasoning_tokens: int = 0  # of completion_tokens, those of a reasoning model's think block (tags included)
    context_length: int = 0  # the model's (or num_ctx's) maximum
    load_s: float = 0.0
    ttft_s: float = 0.0  # submit -> first token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    queue_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of prefill; the rest out of decode steps
        n = max(self.completion_tokens - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class TokenLogprob:
    """One token of an answer and its log-probability (see engine.logprobs)."""

    token: str  # its text as it reads inside a text
    logprob: float
    bytes: list[int]  # its own bytes (a token may hold part of a UTF-8 character)
    top: list["TokenLogprob"] = field(default_factory=list)  # the most likely tokens at its step, best first


@dataclass
class TokenEvent:
    text: str  # the new text (may be "" while a multi-byte character or a stop string is pending)
    token_id: int
    thinking: str = ""  # new reasoning text of a reasoning model (never part of `text`)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with request.logprobs: the tokens of this text


@dataclass
class Result:
    text: str
    finish_reason: FinishReason
    usage: Usage
    error: str | None = None
    model: str = ""
    error_kind: str | None = None  # "request" (the request cannot run as asked) | "engine"
    context: list[int] = field(default_factory=list)  # prompt and answer token ids (Ollama's `context`)
    thinking: str = ""  # a reasoning model's reasoning (`text` is the answer after it)
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls the answer made (their text is not in `text`)
    logprobs: list[TokenLogprob] | None = None  # with request.logprobs: each token of the answer
    stop_sequence: str | None = None  # the stop string that ended it, if one did


class StreamClosed(Exception):
    pass


class _Wakes(threading.local):
    pending: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] | None = None


_wakes = _Wakes()


@contextmanager
def batched_wakes() -> Iterator[None]:
    """Within this block (on the engine's worker, around a step), streams' asyncio consumers are
    woken once at its end, one call per event loop, instead of once per token: a step of 8 streams
    woke the API server's loop 8 times, and each wake-up fought the worker for the GIL between
    its tokens."""
    if _wakes.pending is not None:  # nested: the outer block wakes
        yield
        return
    _wakes.pending = {}
    try:
        yield
    finally:
        pending, _wakes.pending = _wakes.pending, None
        for loop, events in pending.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed: its consumers are gone
                pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class GenerationStream:
    """What `Engine.submit` returns: iterate it from a thread, or `async for` it from asyncio.

    Yields `TokenEvent`s; after the iteration ends, `.result` holds the `Result`.
    `cancel()` asks the worker to stop this request at its next step (finish_reason "cancelled").
    Any number of asyncio consumers can wait without holding a thread each: the worker wakes
    their loop with `call_soon_threadsafe`.
    """

    def __init__(self) -> None:
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.result: Result | None = None
        self.request_id: str = ""
        self.prompt_tokens: int | None = None  # known once the request is admitted (its first token comes after)
        self.cached_tokens = 0

    # --- worker side -------------------------------------------------------------------------
    def _put(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
        self._wake()

    def _finish(self, result: Result) -> None:
        with self._cond:
            self.result = result
            self._done.set()
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        pending = _wakes.pending
        for loop, event in list(self._waiters):
            if pending is not None:
                pending.setdefault(loop, []).append(event)
                continue
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its consumer is gone
                pass

    # --- client side ---------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._done.is_set():
                    self._cond.wait()
                batch = self._events[i:]
                finished = self._done.is_set()
            i += len(batch)
            yield from batch
            if finished and i >= len(self._events):
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self._waiters.append(waiter)
        i = 0
        try:
            while True:
                waiter[1].clear()
                with self._cond:
                    batch = self._events[i:]
                    finished = self._done.is_set()
                i += len(batch)
                for event in batch:
                    yield event
                if finished and i >= len(self._events):
                    return
                if not batch:
                    await waiter[1].wait()
        finally:
            self._waiters.remove(waiter)

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the request ends; return the Result."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        assert self.result is not None
        return self.result

    async def wait_async(self) -> Result:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    def text(self) -> str:
        return self.wait().text
