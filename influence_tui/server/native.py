"""The project's own routes (the original tool's): GET /health, POST /generate, POST /chat/completions.

/generate takes our own field names (`max_tokens`, `temperature`, ... as in GenerationParams) and
streams Server-Sent Events `data: {"text": "..."}`, then one `data: {"done": true, ...}` with the
finish reason and usage, then `data: [DONE]`. A reasoning model's reasoning streams as
`data: {"text": "", "thinking": "..."}` (a client that reads only `text` sees the answer alone) and
the final object and the non-streamed answer carry it whole in `thinking`, present only when there
is some; `"think": false` asks the model not to think.

/chat/completions is the OpenAI chat route without the /v1 prefix (many tools call it that way), in
the same wire format; without a `stream` field it streams, as the original tool's did, unless the
client accepts only JSON.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from influence_tui.server.common import (
    ApiError,
    ServerContext,
    begin_stream,
    build_params,
    check_chat_model,
    check_result,
    ctx_of,
    dumps,
    get_field,
    read_json,
    stream_response,
    submit,
    think_for,
    token_deltas,
    wait_result,
)

# our field name -> JSON type accepted (the values are validated by GenerationParams)
PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "repeat_last_n", "seed")


async def health(request: Request) -> Response:
    ctx = ctx_of(request)
    st = ctx.engine.status()
    body: dict[str, Any] = {
        "status": {"ready": "ok", "empty": "ok"}.get(st.state, st.state),
        "state": st.state,
        "model": st.model.name if st.model else None,
        "device": st.model.device if st.model else st.device,
        "loading": st.loading,
        "error": st.error,
        "uptime_s": round(time.time() - ctx.started, 3),
        "in_flight": st.in_flight,
        "queued": st.queued,
        "served": st.served,
    }
    if st.state == "loading":  # load balancers and scripts wait for 200 before sending work
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    return JSONResponse(body)


def usage_dict(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "dropped_tokens": usage.dropped_tokens,
        "context_length": usage.context_length,
        "load_s": round(usage.load_s, 6),
        "queue_s": round(usage.queue_s, 6),
        "ttft_s": round(usage.ttft_s, 6),
        "prefill_s": round(usage.prefill_s, 6),
        "decode_s": round(usage.decode_s, 6),
        "prompt_tokens_per_s": round(usage.prefill_tokens_per_s, 3),
        "tokens_per_s": round(usage.decode_tokens_per_s, 3),
    }


def final_body(ctx: ServerContext, result: Any) -> dict[str, Any]:
    """The whole answer: the non-streamed response, and the streamed one's `done` event."""
    body: dict[str, Any] = {"text": result.text}
    if result.thinking:  # only when there is some, as the other dialects do
        body["thinking"] = result.thinking
    body.update({"model": ctx.loaded_name() or result.model, "finish_reason": result.finish_reason,
                 "usage": usage_dict(result.usage)})
    return body


async def generate(request: Request) -> Response:
    from influence_tui.engine.types import GenerationRequest

    ctx = ctx_of(request)
    data = await read_json(request)
    prompt = get_field(data, "prompt", str, required=True)
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    system = get_field(data, "system", str)
    stream = get_field(data, "stream", bool, False)
    raw = get_field(data, "raw", bool, False)
    model = await check_chat_model(ctx, get_field(data, "model", str))
    values = {name: get_field(data, name, (int, float)) for name in PARAM_FIELDS}
    values["stop"] = get_field(data, "stop", (str, list))
    params = build_params(ctx.base_params(), values)
    fmt = get_field(data, "format", (str, dict))
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise ApiError(400, "format must be \"json\" (the answer is one JSON object) or a JSON schema", param="format")
    schema = fmt if isinstance(fmt, dict) else None
    think = think_for(ctx, get_field(data, "think", bool))
    req = GenerationRequest(prompt=prompt, system=system, params=params, raw=raw, format="json" if fmt else None,
                            json_schema=schema, think=think)
    gen = await submit(ctx, req, model)
    if not stream:
        result = await wait_result(request, gen)
        check_result(result)
        return JSONResponse(final_body(ctx, result))

    async def events() -> AsyncIterator[str]:
        async for text, thinking in token_deltas(gen):
            # every event keeps `text` (maybe ""): old clients read event["text"] and nothing else
            yield f"data: {dumps({'text': text, 'thinking': thinking} if thinking else {'text': text})}\n\n"
        result = gen.result
        if result.finish_reason == "error":
            yield f"data: {dumps({'error': {'message': result.error or 'generation failed', 'type': 'server_error'}})}\n\n"
        else:
            yield f"data: {dumps({'done': True, **final_body(ctx, result)})}\n\n"
        yield "data: [DONE]\n\n"

    await begin_stream(request, gen)
    return stream_response(events(), "text/event-stream", gen)


async def chat_completions(request: Request) -> Response:
    """The original tool's chat route streams (its README's curl example sends no `stream`): so
    does this one when `stream` is absent, unless the client accepts only JSON (the openai client
    pointed at a base URL without /v1 sends `Accept: application/json` and no `stream` for a
    non-streamed call)."""
    from influence_tui.server.openai import chat_completions as openai_chat

    accept = request.headers.get("accept", "")
    return await openai_chat(request, default_stream="application/json" not in accept)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/generate", generate, methods=["POST"]),
    Route("/chat/completions", chat_completions, methods=["POST"]),
]
