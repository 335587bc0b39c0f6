"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Wire format as OpenAI sends it: `chat.completion` objects with `usage`, and for `stream: true`
Server-Sent Events of `chat.completion.chunk` objects ending with `data: [DONE]`; with
`stream_options.include_usage` a last chunk carries `"choices": []` and the usage. Like
llama-server, answers also carry `timings` (with `cache_n`, the prompt tokens reused from the cache).
A reasoning model's reasoning comes apart from the answer in `reasoning_content` (llama-server's and
DeepSeek's field: `message.reasoning_content`, streamed as `delta.reasoning_content`), present only
when there is some; `reasoning_effort: "none"` asks it not to think.

Tools (`tools`, OpenAI's function tools) go into the prompt through the model's chat template (a
model whose template has no place for them is a 400). Calls come back as `message.tool_calls`
(arguments as a JSON string) with `finish_reason: "tool_calls"`; streamed, the calls are known only
when the answer ends, so they come whole in one chunk (each with its `index`) after the text.
`tool_choice`: "none" sends no tools (the model answers in text), "auto" lets the model decide;
"required" and a named function make the answer a call where the model's calls open with a tag of
their own (Hermes, Mistral, Granite: the first token is the tag; a named function's calls alone
count), and are a wish otherwise (Llama 3's bare JSON). `parallel_tool_calls` is accepted and
ignored (a model may make several).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from influence_tui.params import GenerationParams
from influence_tui.server.common import (
    ApiError,
    ServerContext,
    begin_stream,
    build_params,
    check_chat_model,
    check_embedding_model,
    check_result,
    ctx_of,
    dumps,
    embed,
    get_field,
    parse_messages,
    parse_tools,
    read_json,
    stream_response,
    submit,
    think_for,
    dimensions_field,
    logprob_dicts,
    logprobs_field,
    shorten,
    token_events,
    wait_result,
)

OWNER = "influence"


# --- the one place OpenAI field names meet GenerationParams ---------------------------------------


def openai_params(data: dict[str, Any], base: GenerationParams) -> GenerationParams:
    n = get_field(data, "n", int, 1)
    if n != 1:
        raise ApiError(400, "n must be 1: this server returns one choice per request", param="n")
    max_tokens = get_field(data, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = get_field(data, "max_tokens", int)
    values = {
        "max_tokens": max_tokens,
        "temperature": get_field(data, "temperature", (int, float)),
        "top_p": get_field(data, "top_p", (int, float)),
        "presence_penalty": get_field(data, "presence_penalty", (int, float)),
        "frequency_penalty": get_field(data, "frequency_penalty", (int, float)),
        "seed": get_field(data, "seed", int),
        "stop": get_field(data, "stop", (str, list)),
        # not OpenAI's, but vLLM and llama-server clients send them (extra_body)
        "top_k": get_field(data, "top_k", int),
        "min_p": get_field(data, "min_p", (int, float)),
        "repeat_penalty": get_field(data, "repeat_penalty", (int, float)),
    }
    labels = {"max_tokens": "max_tokens" if data.get("max_completion_tokens") is None else "max_completion_tokens"}
    return build_params(base, values, labels)



def answer_format(data: dict[str, Any]) -> dict[str, Any]:
    """response_format: text, json_object (the answer is one JSON object) or json_schema (the
    answer follows `json_schema.schema`: structured outputs); as GenerationRequest's fields."""
    fmt = data.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        if not isinstance(fmt, dict):
            raise ApiError(400, "response_format must be an object like {\"type\": \"json_object\"}", param="response_format")
        return {}
    if kind == "json_object":
        return {"format": "json"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format.json_schema must be an object like {\"name\": ..., \"schema\": {...}}",
                           param="response_format.json_schema")
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, (dict, bool)):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                           param="response_format.json_schema.schema")
        return {"format": "json", "json_schema": schema}
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format.type")


def tools_field(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    """`tools` as the engine takes them, after `tool_choice` (None: no tools for this answer)."""
    for legacy in ("functions", "function_call"):  # ignored, the model would answer without them
        if data.get(legacy) is not None:
            raise ApiError(400, f"{legacy} is OpenAI's deprecated form of tools: send tools and tool_choice", param=legacy)
    tools = parse_tools(data.get("tools"))
    choice = data.get("tool_choice")
    get_field(data, "parallel_tool_calls", bool)  # accepted (type-checked) and ignored
    if choice is None or choice in ("auto", "required"):
        return tools
    if choice == "none":
        return None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if not any(t["function"]["name"] == name for t in tools or ()):
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return tools  # the named tool is not forced: see the module's docstring


def logit_bias_field(data: dict[str, Any]) -> dict[int, float] | None:
    """`logit_bias`: {"token id": -100..100} -> the engine's {id: value}."""
    raw = get_field(data, "logit_bias", dict)
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise ApiError(400, "logit_bias maps token ids (as strings) to numbers from -100 to 100", param="logit_bias")
        out[int(key)] = float(value)
    return out


def tool_choice_of(data: dict[str, Any]) -> str | None:
    """GenerationRequest.tool_choice from a (checked) chat `tool_choice`: "required", a name, or None."""
    choice = data.get("tool_choice")
    if choice == "required":
        return "required"
    if isinstance(choice, dict):
        return choice["function"]["name"]
    return None


def tool_calls_of(calls: list[Any], streamed: bool = False) -> list[dict[str, Any]]:
    """The calls as OpenAI sends them: arguments as a JSON string, each with a fresh id (a stream's
    deltas also carry their `index`, by which clients put the pieces together)."""
    out = []
    for i, call in enumerate(calls):
        item: dict[str, Any] = {"index": i} if streamed else {}
        item.update({"id": call.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": call.name, "arguments": dumps(call.arguments)}})
        out.append(item)
    return out


EFFORTS = ("minimal", "low", "medium", "high", "xhigh")  # OpenAI's levels: each just means "think" here


def _effort(value: Any, label: str) -> bool | None:
    """A reasoning effort -> think or not ("none": not); None when absent."""
    if value is None:
        return None
    if value == "none":
        return False
    if isinstance(value, str) and value in EFFORTS:
        return True
    raise ApiError(400, f"{label} must be one of none, {', '.join(EFFORTS)}", param=label)


def think_field(data: dict[str, Any]) -> bool | None:
    """Whether a chat asks a reasoning model to think, None when it does not say: our own `think`,
    OpenAI's `reasoning_effort`, Ollama's `reasoning.effort` or vLLM's and llama-server's
    `chat_template_kwargs.enable_thinking`, the first given wins."""
    reasoning = get_field(data, "reasoning", dict, {})
    template_kwargs = get_field(data, "chat_template_kwargs", dict, {})
    asked = (
        get_field(data, "think", bool),
        _effort(data.get("reasoning_effort"), "reasoning_effort"),
        _effort(reasoning.get("effort"), "reasoning.effort"),
        get_field(template_kwargs, "enable_thinking", bool, label="chat_template_kwargs.enable_thinking"),
    )
    return next((a for a in asked if a is not None), None)


def include_usage(data: dict[str, Any]) -> bool:
    options = get_field(data, "stream_options", dict, {})
    return bool(get_field(options, "include_usage", bool, False, label="stream_options.include_usage"))


def usage_of(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def timings_of(usage: Any) -> dict[str, Any]:
    """llama-server's `timings` object (milliseconds)."""
    prompt_n = max(usage.prompt_tokens - usage.cached_tokens, 0)
    prompt_ms = usage.prefill_s * 1000
    return {
        "cache_n": usage.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": round(prompt_ms / prompt_n, 3) if prompt_n else 0.0,
        "prompt_per_second": round(prompt_n / usage.prefill_s, 3) if usage.prefill_s > 0 else 0.0,
        "predicted_n": usage.completion_tokens,
        "predicted_ms": round(usage.decode_s * 1000, 3),
        "predicted_per_token_ms": round(usage.decode_s * 1000 / max(usage.completion_tokens - 1, 1), 3),
        "predicted_per_second": round(usage.decode_tokens_per_s, 3),
    }


def delta_of(text: str, thinking: str) -> dict[str, Any]:
    """A stream chunk's delta: answer text as `content`, reasoning as `reasoning_content` (a
    reasoning-only chunk has no `content`, as llama-server sends it)."""
    delta: dict[str, Any] = {"content": text} if text else {}
    if thinking:
        delta["reasoning_content"] = thinking
    return delta


def finish_reason(result: Any) -> str:
    if getattr(result, "tool_calls", None):
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


def _error_chunk(result: Any) -> str:
    body = {"error": {"message": result.error or "generation failed", "type": "server_error", "param": None,
                      "code": "generation_failed"}}
    return f"data: {dumps(body)}\n\n"


# --- routes ---------------------------------------------------------------------------------------


async def chat_completions(request: Request, default_stream: bool = False) -> Response:
    from influence_tui.engine.types import GenerationRequest

    ctx = ctx_of(request)
    data = await read_json(request)
    messages = parse_messages(data.get("messages"))
    logprobs = logprobs_field(data)
    tools = tools_field(data)
    stream = get_field(data, "stream", bool, default_stream)
    usage_chunk = include_usage(data) if stream else False
    params = openai_params(data, ctx.base_params())
    think = think_for(ctx, think_field(data))
    name = get_field(data, "model", str)
    model = await check_chat_model(ctx, name)
    req = GenerationRequest(messages=messages, params=params, think=think, tools=tools, logprobs=logprobs,
                            tool_choice=tool_choice_of(data) if tools else None, logit_bias=logit_bias_field(data),
                            **answer_format(data))
    gen = await submit(ctx, req, model)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def logprobs_of(entries: Any) -> dict[str, Any] | None:
        return {"content": logprob_dicts(entries), "refusal": None} if logprobs is not None else None

    if not stream:
        result = await wait_result(request, gen)
        check_result(result)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.thinking:  # only when there is some: clients test for the field
            message["reasoning_content"] = result.thinking
        if result.tool_calls:  # OpenAI's content is null beside calls when there is no text
            message["content"] = result.text or None
            message["tool_calls"] = tool_calls_of(result.tool_calls)
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": name or ctx.loaded_name() or result.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs_of(result.logprobs),
                         "finish_reason": finish_reason(result)}],
            "usage": usage_of(result.usage), "timings": timings_of(result.usage),
        })

    def chunk(delta: dict[str, Any], reason: str | None, model_name: str, entries: Any = None, **extra: Any) -> str:
        body: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                "model": model_name, "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs_of(entries) if entries else None,
                                             "finish_reason": reason}]}
        if usage_chunk:
            body["usage"] = None
        body.update(extra)
        return f"data: {dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        model_name = name or ctx.loaded_name() or ""
        yield chunk({"role": "assistant", "content": ""}, None, model_name)
        async for event in token_events(gen):
            yield chunk(delta_of(event.text, event.thinking), None, model_name, event.logprobs)
        result = gen.result
        if result.finish_reason == "error":
            yield _error_chunk(result)
        else:
            if result.tool_calls:  # known only now: all of them in one delta
                yield chunk({"tool_calls": tool_calls_of(result.tool_calls, streamed=True)}, None, model_name)
            yield chunk({}, finish_reason(result), model_name, timings=timings_of(result.usage))
            if usage_chunk:
                body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "system_fingerprint": None, "choices": [], "usage": usage_of(result.usage)}
                yield f"data: {dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    await begin_stream(request, gen)
    return stream_response(events(), "text/event-stream", gen)


def _legacy_token(entry: Any) -> str:
    return entry.token if "\ufffd" not in entry.token else "bytes:" + "".join(f"\\x{b:02x}" for b in entry.bytes)


def completion_prompt(data: dict[str, Any]) -> str:
    prompt = data.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    raise ApiError(400, "prompt must be a string (or a list of one string); token arrays and batches are not supported",
                   param="prompt")


async def completions(request: Request) -> Response:
    from influence_tui.engine.types import GenerationRequest

    ctx = ctx_of(request)
    data = await read_json(request)
    prompt = completion_prompt(data)
    suffix = get_field(data, "suffix", str) or None  # fill-in-the-middle: the code after the gap
    if not prompt and suffix is None:  # nothing to continue from (a model without BOS would see zero tokens)
        raise ApiError(400, "prompt must not be empty", param="prompt")
    logprobs = get_field(data, "logprobs", int)  # the legacy form: a count of alternatives, 0-5
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise ApiError(400, "logprobs must be from 0 to 5", param="logprobs")
    if get_field(data, "best_of", int, 1) != 1:
        raise ApiError(400, "best_of must be 1", param="best_of")
    echo = get_field(data, "echo", bool, False)
    if echo and logprobs is not None:
        raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is not supported by this server", param="echo")
    stream = get_field(data, "stream", bool, False)
    usage_chunk = include_usage(data) if stream else False
    params = openai_params(data, ctx.base_params())
    name = get_field(data, "model", str)
    model = await check_chat_model(ctx, name)
    # a completion continues the text as written: no chat template
    gen = await submit(ctx, GenerationRequest(prompt=prompt, params=params, raw=True, logprobs=logprobs, suffix=suffix,
                                              logit_bias=logit_bias_field(data)), model)
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = prompt if echo else ""

    written = bytearray()  # the answer's bytes so far: a character split across tokens has one offset

    def legacy(entries: Any) -> dict[str, Any] | None:
        """The legacy completions' logprobs: parallel lists, alternatives as {token: logprob}; a
        token that holds part of a character is written "bytes:\\xNN" (as OpenAI writes it)."""
        if logprobs is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if logprobs else None, "text_offset": []}
        for e in entries or ():
            out["tokens"].append(_legacy_token(e))
            out["token_logprobs"].append(e.logprob)
            out["text_offset"].append(len(head) + len(written.decode("utf-8", "ignore")))
            written.extend(e.bytes)
            if logprobs:
                top: dict[str, float] = {}
                for t in e.top:
                    top.setdefault(_legacy_token(t), t.logprob)  # best first: a look-alike keeps the higher
                out["top_logprobs"].append(top)
        return out

    if not stream:
        result = await wait_result(request, gen)
        check_result(result)
        return JSONResponse({
            "id": ident, "object": "text_completion", "created": created, "model": name or ctx.loaded_name() or result.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": head + result.text, "logprobs": legacy(result.logprobs),
                         "finish_reason": finish_reason(result)}],
            "usage": usage_of(result.usage), "timings": timings_of(result.usage),
        })

    def chunk(text: str, reason: str | None, model_name: str, entries: Any = None, **extra: Any) -> str:
        body: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                                "system_fingerprint": None,
                                "choices": [{"index": 0, "text": text, "logprobs": legacy(entries) if entries else None,
                                             "finish_reason": reason}]}
        if usage_chunk:
            body["usage"] = None
        body.update(extra)
        return f"data: {dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        model_name = name or ctx.loaded_name() or ""
        if head:
            yield chunk(head, None, model_name)
        async for event in token_events(gen):
            if event.text:
                yield chunk(event.text, None, model_name, event.logprobs)
        result = gen.result
        if result.finish_reason == "error":
            yield _error_chunk(result)
        else:
            yield chunk("", finish_reason(result), model_name, timings=timings_of(result.usage))
            if usage_chunk:
                body = {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                        "system_fingerprint": None, "choices": [], "usage": usage_of(result.usage)}
                yield f"data: {dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    await begin_stream(request, gen)
    return stream_response(events(), "text/event-stream", gen)


def embedding_inputs(data: dict[str, Any]) -> list[str]:
    raw = data.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        return raw
    if raw is None:
        raise ApiError(400, "input is required", param="input")
    raise ApiError(400, "input must be a string or a non-empty array of strings (token arrays are not supported)",
                   param="input")


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32 (the openai client asks for it by default)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embeddings(request: Request) -> Response:
    ctx = ctx_of(request)
    data = await read_json(request)
    texts = embedding_inputs(data)
    fmt = get_field(data, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    dims = dimensions_field(data)
    requested = get_field(data, "model", str)
    result = await embed(ctx, texts, await check_embedding_model(ctx, requested))
    vectors = shorten(result.embeddings, dims)
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_base64(v) if fmt == "base64" else v}
                 for i, v in enumerate(vectors)],
        "model": requested or result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })


def model_object(info: Any) -> dict[str, Any]:
    import os

    try:
        created = int(os.path.getmtime(info.path))
    except OSError:
        created = 0
    return {"id": info.name, "object": "model", "created": created, "owned_by": OWNER}


async def list_models(request: Request) -> Response:
    import asyncio

    ctx: ServerContext = ctx_of(request)
    models = await asyncio.to_thread(ctx.list_models, True)
    return JSONResponse({"object": "list", "data": [model_object(m) for m in models if m.usable]})


async def get_model(request: Request) -> Response:
    import asyncio

    from influence_tui.library import ModelNotFound

    ctx: ServerContext = ctx_of(request)
    name = request.path_params["model"]
    try:
        info = await asyncio.to_thread(ctx.find, name)
    except ModelNotFound:
        raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found") from None
    return JSONResponse(model_object(info))


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
