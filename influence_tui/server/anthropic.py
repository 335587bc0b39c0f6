"""Anthropic's Messages API: POST /v1/messages, as the official `anthropic` client (and tools built
on it, such as Claude Code pointed at a local server with ANTHROPIC_BASE_URL) call it; Ollama and
llama-server serve it too.

`system` (a string or text blocks) and `messages` (text, `tool_use` and `tool_result` blocks;
earlier `thinking` blocks are skipped, never resent) are read into the chat-completions shapes and
run as the same engine request. `tools` (`name`, `description`, `input_schema`) go through the
model's chat template; `tool_choice` none sends none, auto lets the model decide, any / tool make
the answer a call where the model's calls open with a tag (see the OpenAI route).
`thinking: {"type": "disabled"}` asks a reasoning model not to think. `output_config.format` (a
JSON schema) makes the answer follow it (structured outputs). `stop_sequences`, `temperature`,
`top_p` and `top_k` map onto the engine's (newer clients send the sampling fields as extra_body).

The answer is a `message` whose `content` holds, in order, a `thinking` block (a reasoning model's
reasoning), a `text` block and one `tool_use` block per call; `stop_reason` is end_turn,
max_tokens, stop_sequence or tool_use. Streamed, it is Anthropic's Server-Sent Events:
message_start, then per block content_block_start, its deltas (thinking_delta, text_delta,
input_json_delta) and content_block_stop, then message_delta (stop_reason, output tokens) and
message_stop. `/v1/messages/count_tokens` answers the prompt's token count. Errors are Anthropic's `{"type": "error", "error": {"type", "message"}}`; the API key
may come as `x-api-key`, as its clients send it.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from influence_tui.server.common import (
    ApiError,
    begin_stream,
    build_params,
    check_chat_model,
    check_result,
    ctx_of,
    dumps,
    engine_error,
    get_field,
    parse_messages,
    parse_tools,
    read_and_submit,
    read_json,
    stream_response,
    think_for,
    token_events,
    wait_result,
)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# --- the request, read into the chat-completions shapes -------------------------------------------


def _text(blocks: Any, where: str) -> str:
    """A string, or text blocks, a blank line between them (what a system prompt or a tool result
    holds: Claude Code sends a reminder block before the user's words)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise ApiError(400, f"{where} must be a string or an array of text blocks")
    out = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else None
            raise ApiError(400, f"{where}[{j}] must be a text block" + (f" ({kind} is not supported by this server)" if kind else ""))
        out.append(block["text"])
    return "\n\n".join(out)


def chat_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """`system` and `messages` as chat-completions messages: an assistant's tool_use blocks become
    its tool_calls, a user's tool_result blocks tool messages (before the rest of its text)."""
    out: list[dict[str, Any]] = []
    system = data.get("system")
    if system is not None:
        text = _text(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages: must be a non-empty array")
    for i, msg in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role must be user or assistant")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or an array of content blocks")
        texts, calls, results = [], [], []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and msg["role"] == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict) \
                        or not isinstance(block.get("id"), str):
                    raise ApiError(400, f"{at}: a tool_use block needs an id and a name (strings) and an input object")
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input", {})}})
            elif kind == "tool_result" and msg["role"] == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise ApiError(400, f"{at}.tool_use_id must be a string (the id of the tool_use it answers)")
                body = block.get("content", "")
                text = _text(body, f"{at}.content") if body else ""
                if block.get("is_error"):  # the model must know the call failed, whatever the text says
                    text = f"Error: {text}"
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            elif kind in ("thinking", "redacted_thinking") and msg["role"] == "assistant":
                continue  # earlier reasoning is not sent back to the model (as in chat)
            elif kind in ("image", "document"):
                raise ApiError(400, f"{at}: {kind} blocks are not supported by this server (text only)")
            else:
                raise ApiError(400, f"{at}: a {msg['role']} message cannot hold a {kind!r} block here")
        out.extend(results)
        if texts or calls or not results:
            # an assistant's blocks are one text (its prefill goes on from the last); a user's are apart
            message: dict[str, Any] = {"role": msg["role"], "content": ("" if msg["role"] == "assistant" else "\n\n").join(texts)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


def chat_tools(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Anthropic's tools in the engine's shape; None when absent or tool_choice is none."""
    raw = data.get("tools")
    choice = get_field(data, "tool_choice", dict, {})
    if choice and choice.get("type") not in ("auto", "any", "tool", "none"):
        raise ApiError(400, "tool_choice.type must be auto, any, tool or none")
    if raw is None or choice.get("type") == "none":
        return None
    if not isinstance(raw, list):
        raise ApiError(400, "tools: must be an array")
    converted = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or "input_schema" not in tool and tool.get("type") not in (None, "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise ApiError(400, f"tools.{i}: only client tools (name, input_schema) are supported by this server (got {kind!r})")
        if not isinstance(tool.get("name"), str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool["name"]):
            raise ApiError(400, f"tools.{i}.name must be 1-64 letters, digits, _ or -")
        if not isinstance(tool.get("input_schema"), dict):
            raise ApiError(400, f"tools.{i}.input_schema must be a JSON schema (an object)")
        fn = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        converted.append({"type": "function", "function": fn})
    tools = parse_tools(converted)
    if choice.get("type") == "tool" and not any(t["function"]["name"] == choice.get("name") for t in tools or ()):
        raise ApiError(400, f"tool_choice names the tool {choice.get('name')!r}, which is not in tools")
    return tools


def think_field(data: dict[str, Any]) -> bool | None:
    thinking = get_field(data, "thinking", dict)
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled", "adaptive"):
        raise ApiError(400, "thinking.type must be enabled, disabled or adaptive")
    return kind != "disabled"


def engine_request(data: dict[str, Any], ctx: Any) -> Any:
    from influence_tui.engine.types import GenerationRequest

    max_tokens = get_field(data, "max_tokens", int, required=True)
    stops = get_field(data, "stop_sequences", list)
    if stops is not None and not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop_sequences must be an array of non-empty strings")
    values = {"max_tokens": max_tokens, "temperature": get_field(data, "temperature", (int, float)),
              "top_p": get_field(data, "top_p", (int, float)), "top_k": get_field(data, "top_k", int), "stop": stops}
    params = build_params(ctx.base_params(), values)
    tools = chat_tools(data)
    choice = get_field(data, "tool_choice", dict, {})
    forced = {"any": "required", "tool": choice.get("name")}.get(choice.get("type")) if tools else None
    return GenerationRequest(messages=parse_messages(chat_messages(data)), params=params, tools=tools, tool_choice=forced,
                             think=think_for(ctx, think_field(data)), **output_format(data))


def output_format(data: dict[str, Any]) -> dict[str, Any]:
    """Structured outputs: `output_config.format` (or the older `output_format`), a JSON schema."""
    config = get_field(data, "output_config", dict, {})
    fmt = config.get("format") if config.get("format") is not None else data.get("output_format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, 'output_config.format must be {"type": "json_schema", "schema": {...}}')
    return {"format": "json", "json_schema": fmt["schema"]}


# --- the answer -----------------------------------------------------------------------------------


def stop_reason(result: Any) -> str:
    if result.tool_calls:
        return "tool_use"
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_sequence else "end_turn"


def tool_blocks(result: Any) -> list[dict[str, Any]]:
    return [{"type": "tool_use", "id": _id("toolu"), "name": c.name, "input": c.arguments} for c in result.tool_calls or ()]


def usage_of(result: Any) -> dict[str, Any]:
    u = result.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0, "output_tokens": u.completion_tokens}


TOO_LONG = re.compile(r"the prompt is (\d+) tokens but the context holds (\d+)")


def anthropic_wording(exc: ApiError) -> ApiError:
    """A prompt over the context in Anthropic's words, which Claude Code reads to compact the chat."""
    found = TOO_LONG.search(exc.message)
    if found:
        return ApiError(400, f"prompt is too long: {found.group(1)} tokens > {found.group(2)} maximum")
    return exc


async def messages(request: Request) -> Response:
    try:
        return await _messages(request)
    except ApiError as exc:
        raise anthropic_wording(exc) from None


async def _messages(request: Request) -> Response:
    ctx, data, name, gen = await read_and_submit(request, engine_request)
    stream = get_field(data, "stream", bool, False)
    ident = _id("msg")
    if not stream:
        result = await wait_result(request, gen)
        check_result(result)
        content: list[dict[str, Any]] = []
        if result.thinking:
            content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
        if result.text or not result.tool_calls:
            content.append({"type": "text", "text": result.text})
        content += tool_blocks(result)
        return JSONResponse({"id": ident, "type": "message", "role": "assistant", "model": name or ctx.loaded_name() or result.model,
                             "content": content, "stop_reason": stop_reason(result), "stop_sequence": result.stop_sequence,
                             "usage": usage_of(result)})
    await begin_stream(request, gen)
    return stream_response(_events(ident, name or ctx.loaded_name() or "", gen), "text/event-stream", gen)


async def count_tokens(request: Request) -> Response:
    """The prompt's tokens as this model reads it (Claude Code asks before it sends)."""
    import asyncio

    ctx = ctx_of(request)
    data = await read_json(request)
    req = engine_request({**data, "max_tokens": 1}, ctx)
    model = await check_chat_model(ctx, get_field(data, "model", str))
    try:
        n = await asyncio.to_thread(ctx.engine.count_tokens, req, model)
    except Exception as exc:
        mapped = engine_error(exc)
        if mapped is None:
            raise
        raise mapped from None
    return JSONResponse({"input_tokens": n})


def _event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {dumps({'type': kind, **fields})}\n\n"


async def _events(ident: str, model: str, gen: Any) -> AsyncIterator[str]:
    """Blocks open when their first delta comes and close when the next kind starts or the answer
    ends; tool_use blocks come whole at the end (the calls are known only then)."""
    prompt, cached = gen.prompt_tokens or 0, gen.cached_tokens  # (admitted: the first token has come)
    start = {"id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
             "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": prompt - cached, "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0,
                       "output_tokens": 0}}
    yield _event("message_start", message=start)
    index, opened = -1, None

    def switch(kind: str) -> list[str]:
        nonlocal index, opened
        out = [_event("content_block_stop", index=index)] if opened else []
        index, opened = index + 1, kind
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
        return out + [_event("content_block_start", index=index, content_block=block)]

    async for event in token_events(gen):
        if event.thinking:
            if opened != "thinking":
                for e in switch("thinking"):
                    yield e
            yield _event("content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": event.thinking})
        if event.text:
            if opened != "text":
                for e in switch("text"):
                    yield e
            yield _event("content_block_delta", index=index, delta={"type": "text_delta", "text": event.text})
    result = gen.result
    if result.finish_reason == "error":
        yield _event("error", error={"type": "api_error", "message": result.error or "generation failed"})
        return
    if opened is None and not result.tool_calls:  # an empty answer still has its (empty) text block
        for e in switch("text"):
            yield e
    if opened is not None:
        yield _event("content_block_stop", index=index)
    for block in tool_blocks(result):
        index += 1
        yield _event("content_block_start", index=index, content_block={**block, "input": {}})
        yield _event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
        yield _event("content_block_stop", index=index)
    yield _event("message_delta", delta={"stop_reason": stop_reason(result), "stop_sequence": result.stop_sequence},
                 usage=usage_of(result))
    yield _event("message_stop")


ROUTES = [Route("/v1/messages", messages, methods=["POST"]),
          Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]
