"""The Starlette app: routes of the three dialects, limits, auth, CORS and errors.

    app = create_app(engine, settings, api_key="secret", cors_origins=["http://localhost:3000"])

Errors come back in the shape of the dialect of the route (Ollama `{"error": "..."}`, OpenAI
`{"error": {"message", "type", "param", "code"}}`); nothing ever answers with a traceback.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from influence_tui.library import ModelNotFound
from influence_tui.params import ParamError
from influence_tui.server import anthropic, native, ollama, openai, responses
from influence_tui.server.common import (
    DEFAULT_MAX_BODY,
    ApiError,
    BodyTooLarge,
    ServerContext,
    engine_error,
    error_response,
)
from influence_tui.server.schema import openapi_schema

if TYPE_CHECKING:
    from influence_tui.config import Settings
    from influence_tui.engine import Engine

log = logging.getLogger("influence_tui.server")

OPEN_PATHS = ("/", "/health")  # answer without the API key: liveness checks and Ollama's probe


class Guard:
    """Pure ASGI middleware (so streaming and disconnects pass through untouched): API key,
    body size limit, and the served / in-flight counters the runner reports."""

    def __init__(self, app: ASGIApp, ctx: ServerContext, api_key: str | None, max_body: int) -> None:
        self.app, self.ctx, self.api_key, self.max_body = app, ctx, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS and scope["method"] != "OPTIONS" and not self._authorized(scope):
            await error_response(path, 401, "missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(path, 400, "invalid Content-Length header")(scope, receive, send)
                return
            if int(length) > self.max_body:
                await self._too_large(path, scope, receive, send)
                return
        if path in OPEN_PATHS or path == "/openapi.json":
            await self.app(scope, self._limited(receive), send)
            return
        self.ctx.active += 1
        answered = False

        def finish() -> None:
            nonlocal answered
            if not answered:
                answered = True
                self.ctx.active -= 1
                self.ctx.served += 1

        async def counting_send(message: Message) -> None:
            # Counted before the last bytes leave: a client that has read its whole answer
            # must already see it in the runner's status (the app's return comes later).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()
            await send(message)

        try:
            await self.app(scope, self._limited(receive), counting_send)
        finally:
            finish()  # a disconnect or an error before the last body message

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, bearer = value.partition(" ")
        tokens = [bearer if scheme.lower() == "bearer" else "", _header(scope, b"x-api-key") or ""]  # (Anthropic's clients)
        return any(t and hmac.compare_digest(t.strip().encode(), self.api_key.encode()) for t in tokens)

    async def _too_large(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(path, 413, f"request body is larger than {self.max_body} bytes")(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive: a chunked upload without Content-Length is limited too."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge()
            return message

        return wrapped


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


# --- error handlers -------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc.status, exc.message, param=exc.param, code=exc.code,
                          headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        message = f"no route for {request.method} {path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {path}"
    else:
        message = str(exc.detail)
    return error_response(path, exc.status_code, message, headers=dict(exc.headers or {}))


async def _too_large(request: Request, exc: Exception) -> Response:
    max_body = request.app.state.max_body
    return error_response(request.url.path, 413, f"request body is larger than {max_body} bytes")


async def _known_or_bug(request: Request, exc: Exception) -> Response:
    """User-facing exceptions from the engine/library get their status; anything else is a bug:
    logged with its traceback here, answered with a one-line JSON 500."""
    mapped = engine_error(exc)
    if mapped is not None:
        return await _api_error(request, mapped)
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, 500, f"internal server error ({exc.__class__.__name__})",
                          code="internal_error")


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


# --- the factory ----------------------------------------------------------------------------------


def create_app(engine: "Engine", settings: "Settings", *, api_key: str | None = None,
               cors_origins: Sequence[str] | None = None, max_body: int = DEFAULT_MAX_BODY) -> Starlette:
    """The API as an ASGI app over one engine. `api_key=None` means no key is asked for
    (pass `settings.api_key` to honour INFLUENCE_API_KEY); CORS is off unless origins are given."""
    from influence_tui.engine import EngineError, QueueFull

    ctx = ServerContext(engine=engine, settings=settings)
    routes = [*native.ROUTES, *openai.ROUTES, *responses.ROUTES, *anthropic.ROUTES, *ollama.ROUTES, Route("/openapi.json", openapi, methods=["GET"])]
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"], max_age=600))
    middleware.append(Middleware(Guard, ctx=ctx, api_key=api_key or None, max_body=max_body))
    handlers: dict[Any, Any] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        BodyTooLarge: _too_large,
        ModelNotFound: _known_or_bug,
        ParamError: _known_or_bug,
        EngineError: _known_or_bug,
        QueueFull: _known_or_bug,
        Exception: _known_or_bug,
    }
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.ctx = ctx
    app.state.max_body = max_body
    app.state.openapi = openapi_schema(routes)
    return app
