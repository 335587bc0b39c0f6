"""OpenAI's Responses API: POST /v1/responses, as `client.responses.create(...)` and
`client.responses.stream(...)` of the official client call it (Codex-style agents and newer SDKs
speak only this API).

Stateless, as Ollama's and llama-server's: `input` holds the whole conversation (a string, or
message items with `input_text` / `output_text` parts, `function_call` and
`function_call_output` items; earlier `reasoning` items are skipped, never resent), `instructions`
is its system prompt, and `previous_response_id` / `conversation` are a 400. The request is read
into the chat-completions shapes and runs through the same engine request; `tools` are function
tools (flat: `{"type": "function", "name", "parameters"}`), `text.format` takes `json_object` and
`json_schema` (structured outputs), `reasoning.effort: "none"` asks a reasoning model not to think.

The answer is a `response` object whose `output` holds, in order, a `reasoning` item (a reasoning
model's thinking, as `reasoning_text` content), a `message` item with one `output_text` part, and
one `function_call` item per call. Streamed, it is the API's Server-Sent Events, each with its
`event:` name and a `sequence_number`: response.created, response.in_progress, then per item
output_item.added, its deltas (reasoning_text.delta, output_text.delta,
function_call_arguments.delta), their .done events and output_item.done, and last
response.completed (response.incomplete when max_output_tokens cut it short, response.failed on
an engine error).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from influence_tui.server.common import (
    ApiError,
    begin_stream,
    build_params,
    check_result,
    dumps,
    get_field,
    parse_messages,
    logprob_dicts,
    read_and_submit,
    stream_response,
    think_for,
    token_events,
    wait_result,
)
from influence_tui.server.openai import answer_format, think_field, tool_choice_of, tools_field

STATEFUL = ("previous_response_id", "conversation", "prompt")  # what only a server that keeps things could answer


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- the request, read into the chat-completions shapes -------------------------------------------


def _text_of_parts(content: Any, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or an array of text parts", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):  # an earlier answer's, replayed
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise ApiError(400, f"{where}.content[{j}]: {kind} is not supported by this server (text only)", param="input")
        else:
            raise ApiError(400, f"{where}.content[{j}] must be an input_text, output_text or refusal part", param="input")
    return "".join(texts)


def chat_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat-completions messages: consecutive function_call items
    join the assistant turn before them, function_call_output items become tool messages."""
    out: list[dict[str, Any]] = []
    instructions = get_field(data, "instructions", str)
    if instructions:
        out.append({"role": "system", "content": instructions})
    raw = data.get("input")
    if isinstance(raw, str):
        return out + [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "input must be a string or a non-empty array of items", param="input")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", param="input")
        kind = item.get("type") or "message"  # (clients send an EasyInputMessage's type as null)
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", param="input")
            out.append({"role": role, "content": _text_of_parts(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name, arguments = _string(item, "name", where), item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise ApiError(400, f"{where}.arguments must be a string (a JSON object as text)", param="input")
            call = {"id": _string(item, "call_id", where), "type": "function", "function": {"name": name, "arguments": arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, (str, list)):
                raise ApiError(400, f"{where}.output must be a string or an array of text parts", param="input")
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": output if isinstance(output, str) else _text_of_parts(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier reasoning is not sent back to the model (as in chat)
        else:
            raise ApiError(400, f"{where}.type {kind!r} is not supported by this server "
                           "(message, function_call, function_call_output, reasoning)", param="input")
    return out


ROLES = ("system", "developer", "user", "assistant")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{where}.{key} must be a non-empty string", param="input")
    return value


def chat_tools(data: dict[str, Any]) -> dict[str, Any]:
    """`tools` and `tool_choice` in the chat-completions shape (function tools only)."""
    tools = data.get("tools")
    out: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise ApiError(400, "tools must be an array", param="tools")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise ApiError(400, f"tools[{i}]: only function tools are supported by this server (got {kind!r})",
                               param=f"tools[{i}].type")
            name = tool.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
                raise ApiError(400, f"tools[{i}].name must be 1-64 letters, digits, _ or -", param=f"tools[{i}].name")
            if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                raise ApiError(400, f"tools[{i}].parameters must be a JSON schema (an object)", param=f"tools[{i}].parameters")
            if tool.get("description") is not None and not isinstance(tool["description"], str):
                raise ApiError(400, f"tools[{i}].description must be a string", param=f"tools[{i}].description")
            fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
            converted.append({"type": "function", "function": fn})
        out["tools"] = converted
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None and choice not in ("none", "auto", "required"):
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                       param="tool_choice")
    if choice is not None:
        out["tool_choice"] = choice
    if data.get("parallel_tool_calls") is not None:
        out["parallel_tool_calls"] = data["parallel_tool_calls"]
    return out


def chat_format(data: dict[str, Any]) -> dict[str, Any]:
    """`text.format` as chat's `response_format` (json_schema's fields sit beside its type here)."""
    text = get_field(data, "text", dict, {})
    fmt = get_field(text, "format", dict, None, label="text.format")
    if fmt is None:
        return {}
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if schema is not None and not isinstance(schema, (dict, bool)):
            raise ApiError(400, "text.format.schema must be a JSON schema (an object)", param="text.format.schema")
        return {"response_format": {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": schema}}}
    if fmt.get("type") not in ("text", "json_object"):
        raise ApiError(400, "text.format.type must be text, json_object or json_schema", param="text.format.type")
    return {"response_format": {"type": fmt["type"]}}


def engine_request(data: dict[str, Any], ctx: Any) -> Any:
    from influence_tui.engine.types import GenerationRequest

    for key in STATEFUL:
        if data.get(key) is not None:
            raise ApiError(400, f"{key} is not supported: this server keeps no stored responses, conversations "
                           "or prompts; send the whole conversation as input", param=key)
    if data.get("background"):
        raise ApiError(400, "background responses are not supported by this server", param="background")
    chat = {"messages": chat_messages(data), **chat_tools(data), **chat_format(data),
            "reasoning": data.get("reasoning"), "think": data.get("think")}
    values = {
        "max_tokens": get_field(data, "max_output_tokens", int),
        "temperature": get_field(data, "temperature", (int, float)),
        "top_p": get_field(data, "top_p", (int, float)),
        "seed": get_field(data, "seed", int),  # not OpenAI's: as on the chat route
    }
    params = build_params(ctx.base_params(), values, {"max_tokens": "max_output_tokens"})
    include = get_field(data, "include", list, [])
    top = get_field(data, "top_logprobs", int)
    if top is not None and not 0 <= top <= 20:
        raise ApiError(400, "top_logprobs must be from 0 to 20", param="top_logprobs")
    logprobs = (top or 0) if "message.output_text.logprobs" in include or top is not None else None
    tools = tools_field(chat)
    return GenerationRequest(messages=parse_messages(chat["messages"]), params=params, logprobs=logprobs,
                             think=think_for(ctx, think_field(chat)), tools=tools,
                             tool_choice=tool_choice_of(chat) if tools else None, **answer_format(chat))


# --- the response ---------------------------------------------------------------------------------


class ResponseBuilder:
    """One response's ids and the object around its output items, as OpenAI writes them."""

    def __init__(self, data: dict[str, Any], model: str) -> None:
        self.id, self.created = _id("resp"), int(time.time())
        self.data, self.model = data, model
        self.reasoning_id, self.message_id = _id("rs"), _id("msg")

    def reasoning_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"id": self.reasoning_id, "type": "reasoning", "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}] if text else []}

    def message_item(self, text: str | None, status: str = "completed", logprobs: Any = None) -> dict[str, Any]:
        content = [] if text is None else [self.text_part(text, logprobs)]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def text_part(text: str, logprobs: Any = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprob_dicts(logprobs)}

    @staticmethod
    def call_items(result: Any) -> list[dict[str, Any]]:
        return [{"id": _id("fc"), "type": "function_call", "status": "completed", "call_id": c.id or _id("call"),
                 "name": c.name, "arguments": dumps(c.arguments)} for c in result.tool_calls or ()]

    def output(self, result: Any, calls: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """reasoning, message, calls: the message where there is text, or where nothing else came
        (an answer cut off while thinking is its reasoning alone, as OpenAI's)."""
        status = status_of(result)
        items = [self.reasoning_item(result.thinking, status if not result.text else "completed")] if result.thinking else []
        calls = self.call_items(result) if calls is None else calls
        if result.text or not (calls or items):
            items.append(self.message_item(result.text, status, result.logprobs))
        return items + calls

    def body(self, status: str, output: list[dict[str, Any]], result: Any = None, error: str | None = None) -> dict[str, Any]:
        data = self.data
        usage = None
        if result is not None:
            u = result.usage
            usage = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                     "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                     "total_tokens": u.prompt_tokens + u.completion_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": {"code": "server_error", "message": error} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": data.get("instructions"), "max_output_tokens": data.get("max_output_tokens"),
            "model": self.model, "output": output, "parallel_tool_calls": data.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": (data.get("reasoning") or {}).get("effort"), "summary": None},
            "store": False, "temperature": data.get("temperature"), "top_p": data.get("top_p"),
            "text": data.get("text") or {"format": {"type": "text"}}, "tool_choice": data.get("tool_choice", "auto"),
            "tools": data.get("tools") or [], "truncation": "disabled", "usage": usage, "user": None,
            "metadata": data.get("metadata") or {},
        }


def status_of(result: Any) -> str:
    return "incomplete" if result.finish_reason == "length" else "completed"


async def responses(request: Request) -> Response:
    ctx, data, name, gen = await read_and_submit(request, engine_request)
    stream = get_field(data, "stream", bool, False)
    built = ResponseBuilder(data, name or ctx.loaded_name() or "")
    if not stream:
        result = await wait_result(request, gen)
        check_result(result)
        built.model = built.model or result.model
        return JSONResponse(built.body(status_of(result), built.output(result), result))
    await begin_stream(request, gen)
    return stream_response(_events(built, gen), "text/event-stream", gen)


async def _events(built: ResponseBuilder, gen: Any) -> AsyncIterator[str]:
    """The stream's events: each item is opened when its first delta comes and closed when the next
    kind of output starts (reasoning, then text) or the answer ends; calls come whole at the end."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        body = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {dumps(body)}\n\n"

    index = 0  # the output index of the item being written
    thinking: list[str] = []
    text: list[str] = []
    entries: list[Any] = []  # the answer's tokens with their log-probabilities, where asked
    opened: str | None = None  # "reasoning" or "message"

    def close(status: str = "completed") -> list[str]:
        if opened == "reasoning":
            whole = "".join(thinking)
            return [event("response.reasoning_text.done", item_id=built.reasoning_id, output_index=index,
                          content_index=0, text=whole),
                    event("response.content_part.done", item_id=built.reasoning_id, output_index=index, content_index=0,
                          part={"type": "reasoning_text", "text": whole}),
                    event("response.output_item.done", output_index=index, item=built.reasoning_item(whole, status))]
        whole = "".join(text)
        return [event("response.output_text.done", item_id=built.message_id, output_index=index, content_index=0,
                      text=whole, logprobs=logprob_dicts(entries)),
                event("response.content_part.done", item_id=built.message_id, output_index=index, content_index=0,
                      part=built.text_part(whole, entries)),
                event("response.output_item.done", output_index=index, item=built.message_item(whole, status, entries))]

    def open_item(kind: str) -> list[str]:
        if kind == "reasoning":
            return [event("response.output_item.added", output_index=index, item=built.reasoning_item("", "in_progress")),
                    event("response.content_part.added", item_id=built.reasoning_id, output_index=index, content_index=0,
                          part={"type": "reasoning_text", "text": ""})]
        return [event("response.output_item.added", output_index=index, item=built.message_item(None, "in_progress")),
                event("response.content_part.added", item_id=built.message_id, output_index=index, content_index=0,
                      part=built.text_part(""))]

    def switch(kind: str) -> list[str]:
        nonlocal opened, index
        out: list[str] = []
        if opened is not None:
            out += close()
            index += 1
        opened = kind
        return out + open_item(kind)

    pending = built.body("in_progress", [])
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    async for token_event in token_events(gen):
        piece, thought = token_event.text, token_event.thinking
        if thought:
            if opened != "reasoning":
                for e in switch("reasoning"):
                    yield e
            thinking.append(thought)
            yield event("response.reasoning_text.delta", item_id=built.reasoning_id, output_index=index,
                        content_index=0, delta=thought)
        if piece:
            if opened != "message":
                for e in switch("message"):
                    yield e
            text.append(piece)
            entries.extend(token_event.logprobs)
            yield event("response.output_text.delta", item_id=built.message_id, output_index=index,
                        content_index=0, delta=piece, logprobs=logprob_dicts(token_event.logprobs))
    result = gen.result
    if result.finish_reason == "error":
        yield event("response.failed", response=built.body("failed", [], result, result.error or "generation failed"))
        return
    calls = built.call_items(result)
    status = status_of(result)
    if opened is None and not calls:  # an answer with nothing in it still has its (empty) message
        for e in switch("message"):
            yield e
    if opened is not None:
        for e in close(status):
            yield e
        index += 1
    for call in calls:
        yield event("response.output_item.added", output_index=index, item={**call, "arguments": "", "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=call["id"], output_index=index, delta=call["arguments"])
        yield event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                    name=call["name"], arguments=call["arguments"])
        yield event("response.output_item.done", output_index=index, item=call)
        index += 1
    built.model = built.model or result.model
    yield event(f"response.{status}", response=built.body(status, built.output(result, calls), result))


ROUTES = [Route("/v1/responses", responses, methods=["POST"])]
