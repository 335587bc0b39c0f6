"""What every API dialect shares: errors in each dialect's shape, body parsing, and the bridge to the engine.

The dialect modules (native, openai, ollama) stay thin: they map their field names onto
`GenerationParams` in one place each and format the engine's events; everything about limits,
errors, model lookup, queueing and client disconnects lives here.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from influence_tui.library import ALIASES, ModelInfo, ModelNotFound, list_models
from influence_tui.params import GenerationParams, ParamError

if TYPE_CHECKING:  # the engine imports torch lazily; these are only names for the type checker
    from influence_tui.config import Settings
    from influence_tui.engine import Engine, GenerationRequest, GenerationStream, Result

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # generous for long chats, small enough to refuse abuse
RETRY_AFTER_S = 2  # what a 503 tells clients to wait before trying again


# --- errors -------------------------------------------------------------------------------------


class ApiError(Exception):
    """A user-facing HTTP error; rendered in the shape of the dialect of the route that raised it."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class BodyTooLarge(Exception):
    pass


OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    502: "server_error", 503: "server_error", 500: "server_error",
}


ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 500: "api_error", 502: "api_error", 503: "overloaded_error",
}


def dialect_of(path: str) -> str:
    """Which API a path belongs to, so that errors come back in the shape its clients parse."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path.startswith("/api/") or path == "/":
        return "ollama"
    return "native"


def error_response(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    dialect = dialect_of(path)
    if dialect == "ollama":
        body: dict[str, Any] = {"error": message}
    elif dialect == "anthropic":
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "invalid_request_error"), "message": message}}
    else:  # OpenAI's shape; the native routes use it too (their chat route is OpenAI-shaped)
        body = {"error": {"message": message, "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}  # OpenAI's code: a string or null
    return JSONResponse(body, status_code=status, headers=headers)


def engine_error(exc: BaseException) -> ApiError | None:
    """Translate the engine's and library's user-facing exceptions; None for anything else (a bug)."""
    from influence_tui.engine import EngineError, QueueFull  # no torch: the facade imports lazily

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc) or "the server is busy: too many requests queued; retry shortly",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ParamError):
        return ApiError(400, str(exc))
    if isinstance(exc, EngineError):
        return ApiError(int(getattr(exc, "status", 400) or 400), str(exc))
    return None


# --- request bodies -----------------------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


_MISSING = object()


def get_field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None,
              *, required: bool = False, label: str | None = None) -> Any:
    """One field of a body, type-checked (bool is not an int here); null counts as absent."""
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise ApiError(400, f"{label or name} is required", param=label or name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"{label or name} must be {_kind_name(kinds)}", param=label or name)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, kinds):
        raise ApiError(400, f"{label or name} must be {_kind_name(kinds)}", param=label or name)
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "an array",
             dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def build_params(base: GenerationParams, values: dict[str, Any], labels: dict[str, str] | None = None) -> GenerationParams:
    """Our field names -> validated params; a bad value is a 400 naming the client's field name."""
    from influence_tui.params import coerce, normalize_stop

    labels = labels or {}
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        label = labels.get(name, name)
        try:
            if name == "stop":
                changes["stop"] = normalize_stop(value)
            elif name == "ignore_eos":
                if not isinstance(value, bool):
                    raise ParamError("ignore_eos must be true or false")
                changes["ignore_eos"] = value
            else:
                if isinstance(value, str):  # JSON has numbers: "0.5" is a client bug worth reporting
                    raise ParamError(f"{name} must be a number, not a string")
                changes[name] = coerce(name, value)
        except ParamError as exc:
            raise ApiError(400, str(exc).replace(name, label, 1) if label != name else str(exc), param=label) from None
    try:
        from dataclasses import replace

        return replace(base, **changes)
    except ParamError as exc:
        raise ApiError(400, str(exc)) from None


def text_of_content(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI content parts of type text (images are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                raise ApiError(400, f"{where}: images are not supported by this server")
            else:
                raise ApiError(400, f"{where}: content parts must be objects like {{\"type\": \"text\", \"text\": \"...\"}}")
        return "".join(parts)
    raise ApiError(400, f"{where} must be a string")


ROLES = ("system", "user", "assistant", "tool", "developer")


def parse_messages(raw: Any, *, allow_empty: bool = False) -> list[Any]:
    """A messages array -> ChatMessage list (developer -> system, as OpenAI defines it).

    Both dialects' tool turns are read: an assistant's `tool_calls` (OpenAI's arguments are a JSON
    string, Ollama's an object) and "tool" messages (OpenAI's `tool_call_id`, Ollama's
    `tool_name`). A tool message without a name gets the one of the earlier call it answers: some
    chat templates show the tool's name with its result."""
    from influence_tui.engine.types import ChatMessage

    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ApiError(400, "messages must be an array", param="messages")
    if not raw and not allow_empty:
        raise ApiError(400, "messages must not be empty", param="messages")
    out = []
    names_by_id: dict[str, str] = {}  # call id -> tool name, from the assistant turns read so far
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object", param="messages")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", param="messages")
        if msg.get("images"):
            raise ApiError(400, f"{where}: images are not supported by this server", param="messages")
        message = ChatMessage("system" if role == "developer" else role, text_of_content(msg.get("content"), f"{where}.content"))
        calls = _tool_calls_of(msg.get("tool_calls"), where)
        if calls:
            if role != "assistant":
                raise ApiError(400, f"{where}.tool_calls: only assistant messages carry tool calls", param="messages")
            message.tool_calls = calls
            names_by_id.update((c.id, c.name) for c in calls if c.id)
        if role == "tool":
            message.tool_call_id = _optional_str(msg, "tool_call_id", where)
            message.name = (_optional_str(msg, "tool_name", where) or _optional_str(msg, "name", where)
                            or names_by_id.get(message.tool_call_id or ""))
        out.append(message)
    return out


def _optional_str(msg: dict[str, Any], key: str, where: str) -> str | None:
    value = msg.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{where}.{key} must be a string", param="messages")
    return value or None


def _tool_calls_of(raw: Any, where: str) -> list[Any]:
    """An assistant message's `tool_calls` (either dialect's shape) -> ToolCall list."""
    from influence_tui.engine.tools import ToolCall

    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, f"{where}.tool_calls must be an array", param="messages")
    calls = []
    for j, item in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict):
            raise ApiError(400, f"{at}.function must be an object", param="messages")
        if item.get("type", "function") != "function":
            raise ApiError(400, f"{at}.type must be \"function\"", param="messages")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{at}.function.name must be a non-empty string", param="messages")
        call_id = item.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ApiError(400, f"{at}.id must be a string", param="messages")
        calls.append(ToolCall(name, _arguments_of(fn.get("arguments"), f"{at}.function.arguments"), call_id or ""))
    return calls


def _arguments_of(raw: Any, where: str) -> dict[str, Any]:
    """A call's arguments: an object (Ollama), or that object as a JSON string (OpenAI)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ApiError(400, f"{where} must be a JSON object (as a string): it is not valid JSON",
                           param="messages") from None
    if not isinstance(raw, dict):
        raise ApiError(400, f"{where} must be a JSON object", param="messages")
    return raw


# --- tools ----------------------------------------------------------------------------------------


def parse_tools(raw: Any, *, type_required: bool = True) -> list[dict[str, Any]] | None:
    """`tools` -> the engine's list ({"type": "function", "function": {name, description?,
    parameters?}}), None when absent or empty. Unknown keys (OpenAI's `strict`, …) are dropped:
    only these reach the chat template. `type_required`: OpenAI requires `type`; Ollama's Go
    struct does not, so its clients may leave it out."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ApiError(400, "tools must be an array", param="tools")
    tools = [_tool_of(tool, f"tools[{i}]", type_required) for i, tool in enumerate(raw)]
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:  # a call names its tool: two of one name could not be told apart
            raise ApiError(400, f"tools[{i}].function.name {name!r} is given twice", param=f"tools[{i}].function.name")
    return tools or None


_OPENAI_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _tool_of(tool: Any, where: str, type_required: bool) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise ApiError(400, f"{where} must be an object like {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                       param=where)
    kind = tool.get("type", None if type_required else "function")
    if kind != "function":
        raise ApiError(400, f"{where}.type must be \"function\"", param=f"{where}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ApiError(400, f"{where}.function must be an object", param=f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
    if type_required and not _OPENAI_TOOL_NAME.fullmatch(name):  # OpenAI's rule (Ollama has none)
        raise ApiError(400, f"{where}.function.name must be 1-64 letters, digits, _ or -", param=f"{where}.function.name")
    out: dict[str, Any] = {"name": name}
    for key, kind_, label in (("description", str, "a string"), ("parameters", dict, "an object")):
        value = fn.get(key)
        if value is None:
            continue
        if not isinstance(value, kind_):
            raise ApiError(400, f"{where}.function.{key} must be {label}", param=f"{where}.function.{key}")
        out[key] = value
    return {"type": "function", "function": out}


# --- the shared state and the engine bridge -------------------------------------------------------


class KeepAlive:
    """Ollama's `keep_alive`: how long the model stays loaded after a request. Each Ollama
    generation request sets it anew when it ends (as Ollama's do); without one the model stays
    loaded (the app and the other routes share it). 0 unloads once the answer is sent, a negative
    value keeps it forever. An expiry unloads only a model that is still loaded and idle, and not
    while another Ollama request is being answered (it will set its own when it ends)."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.expires_at: float | None = None  # epoch seconds; None: never
        self._path: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._generation = 0  # bumped by each touch: an expiry in flight yields to a newer request's
        self._in_flight = 0  # Ollama generation requests begun and not ended
        self._begun = 0  # tickets handed out by begin()
        self._stop_through = 0  # requests with tickets up to this end with keep_alive 0 (an explicit unload came)
        self._task: asyncio.Task | None = None  # the unload in flight (asyncio keeps only weak references)

    def begin(self) -> int:
        """An Ollama generation request starts (before it is submitted); its ticket for end()."""
        self._in_flight += 1
        self._begun += 1
        return self._begun

    def end(self, ticket: int, seconds: float | None) -> None:
        """That request ended (answered, failed or left), asking for `seconds` (None: it did not ask)."""
        self._in_flight = max(self._in_flight - 1, 0)
        if ticket <= self._stop_through and self._begun > self._stop_through:
            return  # a request that came after the unload set (or will set) its own keep_alive
        self.touch(0 if ticket <= self._stop_through else seconds)

    def stop(self) -> None:
        """An explicit unload (keep_alive 0, no prompt): now if idle, else once the requests being
        answered end (theirs does not keep it loaded; a request that comes later does)."""
        self._stop_through = self._begun
        self.touch(0)

    def touch(self, seconds: float | None) -> None:
        """Set the expiry (on the event loop): `seconds` from now, or never (None, negative)."""
        self._generation += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        model = self.engine.status().model
        if seconds is None or seconds < 0 or model is None:
            self.expires_at = None
            return
        self.expires_at, self._path = time.time() + seconds, model.path
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    async def settle(self) -> None:
        """Run an expiry that is due now (an explicit unload answers once the model is gone, if idle)."""
        if self._timer is not None and self.expires_at is not None and self.expires_at <= time.time():
            self._timer.cancel()
            self._timer = None
            await self._unload(self._generation)

    def _expire(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._unload(self._generation))

    async def _unload(self, generation: int) -> None:
        path = self._path

        def allowed() -> bool:  # asked on the engine's worker, at the moment it would unload
            return self._in_flight == 0 and self._generation == generation

        unloaded = path is not None and await asyncio.to_thread(self.engine.unload_if_idle, path, allowed)
        if generation != self._generation:  # a newer request set its own keep_alive meanwhile
            return
        model = self.engine.status().model
        if not unloaded and model is not None and model.path == path:
            # in use (the app, or a request still answering): try again shortly
            self._timer = asyncio.get_running_loop().call_later(1.0, self._expire)
            return
        self.expires_at = None


@dataclass
class ServerContext:
    engine: "Engine"
    settings: "Settings"
    started: float = field(default_factory=time.time)
    served: int = 0  # API requests answered (not counting / and /health)
    active: int = 0  # API requests being answered now
    _models: tuple[float, list[ModelInfo]] | None = None
    _keep_alive: KeepAlive | None = None

    @property
    def keep_alive(self) -> KeepAlive:
        if self._keep_alive is None:
            self._keep_alive = KeepAlive(self.engine)
        return self._keep_alive

    @property
    def models_dir(self) -> Path:
        return Path(self.settings.output_dir).expanduser()

    def list_models(self, fresh: bool = False) -> list[ModelInfo]:
        """The library, cached for a second: model lookups happen on every request."""
        now = time.monotonic()
        if fresh or self._models is None or now - self._models[0] > 1.0:
            self._models = (now, list_models(self.models_dir, configured=self.settings.model_path))
        return self._models[1]

    def find(self, name: str) -> ModelInfo:
        """A model of the library by name or alias (never a filesystem path: remote clients must
        not probe the disk or load files from outside the library)."""
        try:
            return lookup(name, self.list_models())
        except ModelNotFound:
            return lookup(name, self.list_models(fresh=True))

    def base_params(self) -> GenerationParams:
        return self.settings.generation_params()

    def loaded_name(self) -> str | None:
        model = self.engine.status().model
        return model.name if model else None

    def loaded_context(self) -> int | None:
        model = self.engine.status().model
        return model.context_length if model else None


def lookup(name: str, models: list[ModelInfo]) -> ModelInfo:
    wanted = name.strip()
    for key in (wanted, wanted.removesuffix(":latest")):
        key = ALIASES.get(key.lower(), key).lower()
        for m in models:
            if key == m.name.lower() or key in (a.lower() for a in m.aliases):
                return m
    raise ModelNotFound(f"model {name!r} not found")


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


async def check_chat_model(ctx: ServerContext, name: str | None) -> str | None:
    """Resolve a chat route's `model` field: 404 if unknown, 400 if it is not a usable chat model.

    Returns what to hand to the engine: the model's path (None = whatever is loaded, or the default)."""
    if not name:
        return None
    loaded = ctx.engine.status().model
    if loaded is not None and name in (loaded.name, f"{loaded.name}:latest"):
        return loaded.path
    try:
        info = await asyncio.to_thread(ctx.find, name)
    except ModelNotFound:
        raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found") from None
    if info.kind == "embedding":
        raise ApiError(400, f"model {name!r} is an embedding model: use an embeddings route", param="model")
    if not info.usable:
        raise ApiError(400, f"model {name!r} cannot be used: {info.reason}", param="model")
    return info.path


async def check_embedding_model(ctx: ServerContext, name: str | None) -> str | None:
    if not name:
        return None
    try:
        info = await asyncio.to_thread(ctx.find, name)
    except ModelNotFound:
        raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found") from None
    if info.kind != "embedding":
        raise ApiError(400, f"model {name!r} is not an embedding model (try all-MiniLM-L6-v2)", param="model")
    if not info.usable:
        raise ApiError(400, f"model {name!r} cannot be used: {info.reason}", param="model")
    return info.name


async def read_and_submit(request: Request, to_engine: Callable[[dict[str, Any], ServerContext], Any]
                          ) -> tuple[ServerContext, dict[str, Any], str | None, "GenerationStream"]:
    """A generation route's start: the body, its engine request (`to_engine` reads the dialect's
    fields), its model checked, the request submitted: (ctx, body, the model named, the stream)."""
    ctx = ctx_of(request)
    data = await read_json(request)
    req = to_engine(data, ctx)
    name = get_field(data, "model", str)
    model = await check_chat_model(ctx, name)
    return ctx, data, name, await submit(ctx, req, model)


async def submit(ctx: ServerContext, req: "GenerationRequest", model: str | None) -> "GenerationStream":
    """Hand a request to the engine (off the event loop: a model switch may resolve names on disk)."""
    try:
        return await asyncio.to_thread(ctx.engine.submit, req, model)
    except Exception as exc:
        mapped = engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None


async def embed(ctx: ServerContext, texts: list[str], model: str | None, truncate: bool = True) -> Any:
    try:
        return await asyncio.to_thread(ctx.engine.embed, texts, model, truncate)
    except ValueError as exc:  # the encoder refuses this model or input: the client's to fix
        raise ApiError(400, str(exc)) from None
    except Exception as exc:
        mapped = engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None


async def _while_connected(request: Request, stream: "GenerationStream", work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work()`, cancelling the generation if the client goes away meanwhile; False if it left."""
    finished: list[bool] = []

    async def run(scope: anyio.CancelScope) -> None:
        await work()
        finished.append(True)
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                scope.cancel()
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, tg.cancel_scope)
            tg.start_soon(watch, tg.cancel_scope)
    finally:
        if not finished and not stream.done:
            stream.cancel()
    return bool(finished)


async def wait_result(request: Request, stream: "GenerationStream") -> "Result":
    """Wait for a non-streamed answer, cancelling the generation if the client goes away meanwhile."""
    result: list[Any] = []

    async def work() -> None:
        result.append(await stream.wait_async())

    if not await _while_connected(request, stream, work):  # the client left; nobody reads this answer
        raise ApiError(499, "client disconnected")
    return result[0]


async def begin_stream(request: Request, stream: "GenerationStream") -> None:
    """Wait for a streamed answer's first token (or its end) before the response starts: a request
    the engine refuses before any token (a prompt too long for the context, a model that does not
    load) then gets its 4xx/5xx status and error body, instead of a 200 whose stream carries the
    error (clients raise on the status; an error chunk left the openai client with status None)."""

    async def work() -> None:
        events = stream.__aiter__()
        try:
            await events.__anext__()
        except StopAsyncIteration:
            pass
        finally:
            await events.aclose()

    if not await _while_connected(request, stream, work):
        raise ApiError(499, "client disconnected")
    result = stream.result
    if stream.done and result is not None and result.finish_reason == "error" and not result.text:
        check_result(result)


def is_request_error(result: "Result") -> bool:
    return result.error_kind == "request"


def check_result(result: "Result") -> None:
    """A generation that failed: a 400 when the request was at fault (too long for the context, …),
    else a JSON 500 with the engine's one-line message."""
    if result.finish_reason == "error":
        if is_request_error(result):
            raise ApiError(400, result.error or "the request cannot run on this model", code="invalid_request")
        raise ApiError(500, result.error or "generation failed", code="generation_failed")


class EventStream(StreamingResponse):
    """A streamed answer that stops (and so cancels its generation) as soon as the client disconnects.

    Starlette only listens for the disconnect on ASGI < 2.4; this always does, so a client that
    leaves while its request waits in the queue frees its place without waiting for a token."""

    on_close: Callable[[], None] | None = None  # runs however the response ends, iterated or not

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run_stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(run_stream)
                tg.start_soon(listen)
        finally:
            # a generator cancelled before its first step never runs its own `finally`
            if self.on_close is not None:
                self.on_close()


def stream_response(events: AsyncIterator[str], media_type: str, gen: "GenerationStream | None" = None,
                    on_close: Callable[[], None] | None = None) -> EventStream:
    """A streamed answer; when it ends (sent, failed, or the client left), the generation `gen`
    is cancelled if still running and `on_close` runs."""

    def close() -> None:
        if gen is not None and not gen.done:
            gen.cancel()
        if on_close is not None:
            on_close()

    response = EventStream(events, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.on_close = close
    return response


async def token_texts(stream: "GenerationStream") -> AsyncIterator[str]:
    """The non-empty text pieces of a stream; cancels the generation if the consumer stops early."""
    try:
        async for event in stream:
            if event.text:
                yield event.text
    finally:
        if not stream.done:
            stream.cancel()


async def token_events(stream: "GenerationStream") -> AsyncIterator[Any]:
    """A stream's TokenEvents with answer or reasoning text (a reasoning model's events may carry
    reasoning only). Cancels the generation if the consumer stops early."""
    try:
        async for event in stream:
            if event.text or event.thinking:
                yield event
    finally:
        if not stream.done:
            stream.cancel()


async def token_deltas(stream: "GenerationStream") -> AsyncIterator[tuple[str, str]]:
    """(answer, reasoning) deltas of a stream, at least one non-empty."""
    async for event in token_events(stream):
        yield event.text, event.thinking


# --- embeddings -----------------------------------------------------------------------------------


def dimensions_field(data: dict[str, Any]) -> int | None:
    dims = get_field(data, "dimensions", int)
    if dims is not None and dims < 1:
        raise ApiError(400, "dimensions must be a positive integer", param="dimensions")
    return dims


def shorten(vectors: list[list[float]], dims: int | None) -> list[list[float]]:
    """The first `dims` values of each vector, scaled back to length 1 (as OpenAI and Ollama return
    shortened embeddings: cosine similarity stays a dot product)."""
    if dims is None:
        return vectors
    if vectors and dims > len(vectors[0]):
        raise ApiError(400, f"dimensions must be at most {len(vectors[0])} for this model", param="dimensions")
    out = []
    for v in vectors:
        head = v[:dims]
        norm = sum(x * x for x in head) ** 0.5
        out.append([x / norm for x in head] if norm > 0 else head)
    return out


# --- log-probabilities ----------------------------------------------------------------------------


def logprobs_field(data: dict[str, Any], label: str = "logprobs") -> int | None:
    """`logprobs` (a boolean) and `top_logprobs` (0-20) -> GenerationRequest.logprobs; OpenAI's and
    Ollama's chat routes name them alike."""
    wanted = get_field(data, label, bool, False)
    top = get_field(data, "top_logprobs", int)
    if top is not None and not 0 <= top <= 20:
        raise ApiError(400, "top_logprobs must be from 0 to 20", param="top_logprobs")
    if top and not wanted:
        raise ApiError(400, f"top_logprobs needs {label}: true", param="top_logprobs")
    return (top or 0) if wanted else None


def logprob_dicts(entries: list[Any] | None) -> list[dict[str, Any]]:
    """Each token as OpenAI's chat `logprobs.content` and Ollama's `logprobs` write it."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top]}
            for e in entries or ()]


# --- reasoning models ---------------------------------------------------------------------------


def think_for(ctx: ServerContext, asked: bool | None) -> bool | None:
    """A request's wish to think -> GenerationRequest.think. Unasked, the user's default
    (Settings.think) decides; True becomes None, the engine's "as the model does" (it thinks)."""
    if asked is None:
        asked = bool(getattr(ctx.settings, "think", True))
    return None if asked else False


def loaded_model(ctx: ServerContext, path: str | None) -> Any:
    """The loaded model's summary if it is `path` (None: whichever is loaded), else None."""
    loaded = ctx.engine.status().model
    if loaded is None or (path is not None and Path(loaded.path).resolve() != Path(path).resolve()):
        return None
    return loaded


def now_ns() -> int:
    return time.perf_counter_ns()


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


Handler = Callable[[Request], Awaitable[Response]]
