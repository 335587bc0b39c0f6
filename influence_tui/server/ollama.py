"""Ollama-compatible routes, so that the `ollama` client, oterm, Open WebUI and Continue work unchanged.

Streaming routes send NDJSON (`application/x-ndjson`, one JSON object a line) unless
`"stream": false`; all durations are nanoseconds; errors are `{"error": "..."}`. Model names are
the library's (`influence list`), its aliases, and `name:latest`. A reasoning model's reasoning
comes apart from its answer, as Ollama gives it: `message.thinking` (chat) or `thinking`
(generate), present only when there is some; `think: false` asks it not to think.
Tools (`/api/chat`'s `tools`) go into the prompt through the model's chat template (a model whose
template has no place for them is a 400 from the engine, "<model> does not support tools …"); the
calls come back in `message.tool_calls` (arguments as an object), streamed in a chunk of their own
before the final one (they are known only when the answer ends); `done_reason` stays "stop".
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import influence_tui
from influence_tui.library import ModelInfo, ModelNotFound, folder_chat_template, human_params
from influence_tui.params import GenerationParams
from influence_tui.server.common import (
    ApiError,
    begin_stream,
    ServerContext,
    build_params,
    check_chat_model,
    check_embedding_model,
    check_result,
    ctx_of,
    dumps,
    embed,
    engine_error,
    get_field,
    loaded_model,
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

NDJSON = "application/x-ndjson"
FAR_FUTURE = datetime(2318, 1, 1, tzinfo=timezone.utc)  # "never expires": no keep_alive was asked for


# --- the one place Ollama field names meet GenerationParams --------------------------------------

# options key -> our field name
OPTION_NAMES = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "repeat_penalty": "repeat_penalty", "num_predict": "max_tokens", "seed": "seed", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repeat_last_n": "repeat_last_n",
}


def ollama_params(data: dict[str, Any], ctx: ServerContext) -> tuple[GenerationParams, int | None]:
    """`options` -> (params, num_ctx). Options we do not implement (num_thread, mirostat, ...) are
    ignored, as Ollama ignores the ones a runner lacks; the ones we do are type- and range-checked."""
    options = get_field(data, "options", dict, {})
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for key, ours in OPTION_NAMES.items():
        kind: Any = (str, list) if key == "stop" else (int if key in ("top_k", "num_predict", "seed", "repeat_last_n") else (int, float))
        value = get_field(options, key, kind, label=f"options.{key}")
        if key == "num_predict" and value is not None and value < 0:
            # -1 = until the model stops, -2 = fill the context: bounded by the context window
            value = ctx.loaded_context() or ctx.base_params().max_tokens
        if key == "num_predict" and value == 0:
            raise ApiError(400, "options.num_predict must not be 0")
        values[ours] = value
        labels[ours] = f"options.{key}"
    num_ctx = get_field(options, "num_ctx", int, label="options.num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise ApiError(400, "options.num_ctx must be a positive integer")
    return build_params(ctx.base_params(), values, labels), num_ctx


KEEP_ALIVE_MAX_S = 10 * 365 * 86400.0
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_s(data: dict[str, Any]) -> float | None:
    """`keep_alive`: seconds as a number, or a Go duration ("5m", "0", "-1"); None when absent."""
    raw = data.get("keep_alive")
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ApiError(400, "keep_alive must be a number of seconds or a duration like \"5m\"")
    seconds = None
    if isinstance(raw, (int, float)):
        seconds = float(raw)
    elif isinstance(raw, str):
        parts = re.findall(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?", raw.strip())
        if parts and "".join(n + (u or "") for n, u in parts) == raw.strip().replace(" ", ""):
            seconds = sum(float(n) * _UNIT_S[u or None] for n, u in parts)
    if seconds is None or math.isnan(seconds):
        raise ApiError(400, "keep_alive must be a number of seconds or a duration like \"5m\"")
    # beyond ten years (or infinite): forever, as a negative value says (a date that far breaks clocks)
    return -1.0 if seconds > KEEP_ALIVE_MAX_S else seconds


def refuse_unsupported(data: dict[str, Any]) -> None:
    if data.get("images"):
        raise ApiError(400, "images are not supported by this server")
    if data.get("template"):
        raise ApiError(400, "template overrides are not supported: the model's own chat template is used")


THINK_LEVELS = ("low", "medium", "high")  # gpt-oss's levels; a model here either thinks or not


def think_field(data: dict[str, Any]) -> bool | None:
    """`think`: true, false, or a level (which just means think); None when absent or null."""
    raw = data.get("think")
    if raw is None or isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw in THINK_LEVELS:
        return True
    raise ApiError(400, "think must be true, false, \"low\", \"medium\" or \"high\"")


def answer_format(data: dict[str, Any]) -> dict[str, Any]:
    """`format`: "json" (the answer is one JSON object), a JSON schema (the answer follows it:
    structured outputs), or absent; as GenerationRequest's fields."""
    fmt = data.get("format")
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"format": "json"}
    if isinstance(fmt, dict):
        return {"format": "json", "json_schema": fmt}
    raise ApiError(400, "format must be \"json\" or a JSON schema")


async def refuse_thinking(ctx: ServerContext, name: str | None, path: str | None) -> None:
    """`think` asked of a model that cannot: a 400, as Ollama answers (its clients' think toggles
    read it as "this model does not think"); the server's default setting is never an error."""
    loaded = loaded_model(ctx, path)
    if loaded is not None:
        thinks = loaded.thinks
    elif name:
        info = await asyncio.to_thread(ctx.find, name)
        thinks = "thinking" in info.capabilities
    else:  # the default model, not loaded yet: the engine decides
        return
    if not thinks:
        raise ApiError(400, f'"{name or loaded.name}" does not support thinking')


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def final_fields(result: Any, started_ns: int, chat: bool) -> dict[str, Any]:
    u = result.usage
    fields: dict[str, Any] = {"done": True, "done_reason": "length" if result.finish_reason == "length" else "stop"}
    if not chat:  # /api/generate's conversation as token ids, for the next request's `context`
        fields["context"] = result.context
    return {
        **fields,
        "total_duration": time.perf_counter_ns() - started_ns,
        "load_duration": int(u.load_s * 1e9),
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": int(u.prefill_s * 1e9),
        "eval_count": u.completion_tokens,
        "eval_duration": int(u.decode_s * 1e9),
    }


async def load_or_unload(request: Request, ctx: ServerContext, name: str | None, model: str | None,
                         keep_alive: float | None, chat: bool) -> Response:
    """An empty prompt / messages: load the model (or unload it with keep_alive 0), as Ollama does.
    `name` is what the client asked for, `model` what the engine gets (a library path)."""
    started = time.perf_counter_ns()
    name = name or ctx.loaded_name() or ""
    if keep_alive is not None and keep_alive == 0:
        # as Ollama: requests still answering finish first, then the model goes
        ctx.keep_alive.stop()
        await ctx.keep_alive.settle()
        reason = "unload"
        load_ns = 0
    else:
        try:
            summary = await asyncio.to_thread(ctx.engine.load, model)
        except Exception as exc:
            mapped = engine_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        name = name or summary.name
        ctx.keep_alive.touch(keep_alive)
        reason = "load"
        load_ns = int(getattr(summary, "load_s", 0.0) * 1e9)
    body: dict[str, Any] = {"model": name, "created_at": created_at()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body.update({"done": True, "done_reason": reason, "total_duration": time.perf_counter_ns() - started,
                 "load_duration": load_ns})
    return JSONResponse(body)


# --- generation -----------------------------------------------------------------------------------


async def generate(request: Request) -> Response:
    from influence_tui.engine.types import GenerationRequest

    started = time.perf_counter_ns()
    ctx = ctx_of(request)
    data = await read_json(request)
    name = get_field(data, "model", str)
    prompt = get_field(data, "prompt", str, "")
    system = get_field(data, "system", str)
    raw = get_field(data, "raw", bool, False)
    stream = get_field(data, "stream", bool, True)
    keep_alive = keep_alive_s(data)
    think = think_for(ctx, think_field(data))
    refuse_unsupported(data)
    if data.get("tools"):  # as Ollama: a prompt has no turns for calls and their results
        raise ApiError(400, "tools are taken by /api/chat, not /api/generate")
    params, num_ctx = ollama_params(data, ctx)
    model = await check_chat_model(ctx, name)
    if think_field(data):
        await refuse_thinking(ctx, name, model)
    suffix = get_field(data, "suffix", str) or None  # fill-in-the-middle: prompt and suffix around the gap
    if not prompt and suffix is None:
        return await load_or_unload(request, ctx, name, model, keep_alive, chat=False)
    context = get_field(data, "context", list)  # deprecated by Ollama, still sent by older clients
    if context is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise ApiError(400, "context must be an array of token ids (an earlier answer's context)")
    req = GenerationRequest(prompt=prompt, system=system, params=params, raw=raw, num_ctx=num_ctx, suffix=suffix,
                            context=context or None, think=think, logprobs=logprobs_field(data), **answer_format(data))
    return await answer(request, ctx, req, model, name, started, stream, keep_alive, chat=False)


async def chat(request: Request) -> Response:
    from influence_tui.engine.types import GenerationRequest

    started = time.perf_counter_ns()
    ctx = ctx_of(request)
    data = await read_json(request)
    name = get_field(data, "model", str)
    messages = parse_messages(data.get("messages"), allow_empty=True)
    tools = parse_tools(data.get("tools"), type_required=False)
    stream = get_field(data, "stream", bool, True)
    keep_alive = keep_alive_s(data)
    think = think_for(ctx, think_field(data))
    refuse_unsupported(data)
    params, num_ctx = ollama_params(data, ctx)
    model = await check_chat_model(ctx, name)
    if think_field(data):
        await refuse_thinking(ctx, name, model)
    if not messages:
        return await load_or_unload(request, ctx, name, model, keep_alive, chat=True)
    req = GenerationRequest(messages=messages, params=params, num_ctx=num_ctx, think=think, tools=tools,
                            logprobs=logprobs_field(data), **answer_format(data))
    return await answer(request, ctx, req, model, name, started, stream, keep_alive, chat=True)


async def answer(request: Request, ctx: ServerContext, req: Any, model: str | None, name: str | None, started: int,
                 stream: bool, keep_alive: float | None, chat: bool) -> Response:
    """Submit the request and answer it; its keep_alive starts when the answer is done (however it ends)."""
    ticket = ctx.keep_alive.begin()
    ended = False

    def end() -> None:
        nonlocal ended
        if not ended:
            ended = True
            ctx.keep_alive.end(ticket, keep_alive)

    try:
        gen = await submit(ctx, req, model)
        response = await _respond(request, ctx, gen, name, started, stream, chat, end)
    except BaseException:
        end()
        raise
    if not stream:
        end()
    return response


def tool_calls_of(calls: list[Any]) -> list[dict[str, Any]]:
    """The calls as Ollama sends them: arguments as an object."""
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


async def _respond(request: Request, ctx: ServerContext, gen: Any, name: str | None, started: int, stream: bool,
                   chat: bool, end: Any) -> Response:
    def piece(text: str, thinking: str, model_name: str, calls: list[Any] | None = None) -> dict[str, Any]:
        # `thinking` and `tool_calls` only when there are some: clients test for the keys (as Ollama omits them)
        body: dict[str, Any] = {"model": model_name, "created_at": created_at()}
        if chat:
            body["message"] = {"role": "assistant", "content": text}
            if thinking:
                body["message"]["thinking"] = thinking
            if calls:
                body["message"]["tool_calls"] = tool_calls_of(calls)
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        return body

    if not stream:
        result = await wait_result(request, gen)
        check_result(result)
        body = piece(result.text, result.thinking, name or ctx.loaded_name() or result.model, result.tool_calls)
        if result.logprobs is not None:
            body["logprobs"] = logprob_dicts(result.logprobs)
        body.update(final_fields(result, started, chat))
        return JSONResponse(body)

    async def lines() -> AsyncIterator[str]:
        model_name = name or ctx.loaded_name() or ""
        try:
            async for event in token_events(gen):
                body = {**piece(event.text, event.thinking, model_name), "done": False}
                if event.logprobs:
                    body["logprobs"] = logprob_dicts(event.logprobs)
                yield dumps(body) + "\n"
            result = gen.result
            if result.finish_reason == "error":
                yield dumps({"error": result.error or "generation failed"}) + "\n"
                return
            if result.tool_calls:  # known only now: a chunk of their own, as Ollama streams them
                yield dumps({**piece("", "", model_name, result.tool_calls), "done": False}) + "\n"
            yield dumps({**piece("", "", model_name), **final_fields(result, started, chat)}) + "\n"
        finally:
            end()

    await begin_stream(request, gen)
    return stream_response(lines(), NDJSON, gen, on_close=end)


# --- models ---------------------------------------------------------------------------------------


def digest_of(info: ModelInfo) -> str:
    """A stable id for a model without hashing gigabytes: path, size and modification time."""
    try:
        mtime = os.path.getmtime(info.path)
    except OSError:
        mtime = 0.0
    return hashlib.sha256(f"{info.path}\0{info.size_bytes}\0{mtime}".encode()).hexdigest()


def modified_at(info: ModelInfo) -> str:
    try:
        ts = os.path.getmtime(info.path)
    except OSError:
        ts = 0.0
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def details_of(info: ModelInfo) -> dict[str, Any]:
    family = info.architecture if info.architecture != "unknown" else ""
    return {
        "parent_model": "",
        "format": info.format,
        "family": family,
        "families": [family] if family else None,
        "parameter_size": human_params(info.parameters) if info.parameters else "",
        "quantization_level": info.quantization if info.quantization != "unknown" else "",
    }


def tagged(name: str) -> str:
    """Ollama names are `model:tag`, the tag `latest` by default (clients compare them that way)."""
    return name if ":" in name else f"{name}:latest"


def tag_of(info: ModelInfo) -> dict[str, Any]:
    return {"name": tagged(info.name), "model": tagged(info.name), "modified_at": modified_at(info),
            "size": info.size_bytes, "digest": digest_of(info), "details": details_of(info)}


async def tags(request: Request) -> Response:
    ctx = ctx_of(request)
    models = await asyncio.to_thread(ctx.list_models, True)
    return JSONResponse({"models": [tag_of(m) for m in models if m.usable]})


async def find_or_404(ctx: ServerContext, name: str) -> ModelInfo:
    try:
        return await asyncio.to_thread(ctx.find, name)
    except ModelNotFound:
        raise ApiError(404, f"model {name!r} not found") from None


def model_name_field(data: dict[str, Any]) -> str:
    # older clients send "name"; current ones "model"
    name = get_field(data, "model", str) or get_field(data, "name", str)
    if not name:
        raise ApiError(400, "model is required")
    return name


def chat_template_of(info: ModelInfo) -> str:
    """The model's own chat template (Jinja, where Ollama shows its Go template); "" if none."""
    try:
        if info.format == "gguf" and os.path.isfile(info.path):
            from influence_tui.formats.gguf import read_gguf_header

            return read_gguf_header(info.path, skip_arrays=True).chat_template or ""
        if os.path.isdir(info.path):
            return folder_chat_template(Path(info.path))
    except (OSError, ValueError):  # an unreadable file: show no template rather than fail the route
        pass
    return ""


def capabilities_of(ctx: ServerContext, info: ModelInfo) -> list[str]:
    """Ollama's capabilities (in its order), as the library read them from the model's template;
    the loaded model's own flags too (its tokenizer may know a think tag the template never names)."""
    loaded = loaded_model(ctx, info.path)
    out = list(info.capabilities) or ["completion"]
    if loaded is not None and loaded.tools and "tools" not in out:
        out.insert(1, "tools")
    if loaded is not None and loaded.infills and "insert" not in out:
        out.append("insert")
    if loaded is not None and loaded.thinks and "thinking" not in out:
        out.append("thinking")
    return out


async def show(request: Request) -> Response:
    ctx = ctx_of(request)
    data = await read_json(request)
    info = await find_or_404(ctx, model_name_field(data))
    arch = info.architecture
    model_info: dict[str, Any] = {"general.architecture": arch, "general.name": info.name}
    if info.parameters:
        model_info["general.parameter_count"] = info.parameters
    if info.context_length:
        model_info[f"{arch}.context_length"] = info.context_length
    base = ctx.base_params()
    parameters = "\n".join(f"{k:<16}{v}" for k, v in (("temperature", base.temperature), ("top_p", base.top_p),
                                                         ("repeat_penalty", base.repeat_penalty),
                                                         ("num_predict", base.max_tokens)))
    template = await asyncio.to_thread(chat_template_of, info)
    return JSONResponse({
        "license": "",
        "modelfile": f"# Modelfile generated by influence\nFROM {info.path}\n",
        "parameters": parameters,
        "template": template,
        "details": details_of(info),
        "model_info": model_info,
        "capabilities": capabilities_of(ctx, info),
        "modified_at": modified_at(info),
    })


async def ps(request: Request) -> Response:
    ctx = ctx_of(request)
    st = ctx.engine.status()
    models = []
    if st.model is not None:
        m = st.model
        info = ModelInfo(name=m.name, path=m.path, format=m.format, source="loaded", architecture=m.architecture,
                         quantization=m.quantization, parameters=m.parameters, context_length=m.context_length,
                         size_bytes=m.size_bytes)
        on_gpu = not str(m.device).startswith("cpu")
        expires = ctx.keep_alive.expires_at
        when = datetime.fromtimestamp(expires, timezone.utc) if expires is not None else FAR_FUTURE
        models.append({**tag_of(info), "expires_at": when.isoformat().replace("+00:00", "Z"),
                       "size_vram": m.size_bytes if on_gpu else 0, "context_length": m.context_length})
    return JSONResponse({"models": models})


async def delete(request: Request) -> Response:
    ctx = ctx_of(request)
    data = await read_json(request)
    name = model_name_field(data)
    info = await find_or_404(ctx, name)
    root = ctx.models_dir.resolve()
    path = Path(info.path).resolve()
    # only what lives in our own models folder: never the bundled wheels, the HF cache or a path
    if info.source != "models" or not path.is_relative_to(root) or path == root:
        raise ApiError(403, f"model {name!r} is not in the models folder ({info.source}); it can not be deleted here")
    loaded = ctx.engine.status().model
    if loaded is not None and Path(loaded.path).resolve() == path:
        await asyncio.to_thread(ctx.engine.unload)
    await asyncio.to_thread(_remove, path)
    ctx.list_models(fresh=True)
    return JSONResponse({})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
        parent = path.parent
        if parent != path and not any(parent.iterdir()):
            parent.rmdir()  # the last quantization of a repo folder: drop the empty folder too


# --- embeddings -----------------------------------------------------------------------------------


async def embed_route(request: Request) -> Response:
    started = time.perf_counter_ns()
    ctx = ctx_of(request)
    data = await read_json(request)
    raw = data.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        texts = raw
    else:
        raise ApiError(400, "input must be a string or an array of strings")
    truncate = get_field(data, "truncate", bool, True)
    dims = dimensions_field(data)
    keep_alive_s(data)
    requested = get_field(data, "model", str)
    name = await check_embedding_model(ctx, requested)
    if not texts:
        return JSONResponse({"model": requested or "", "embeddings": [], "total_duration": 0, "load_duration": 0,
                             "prompt_eval_count": 0})
    result = await embed(ctx, texts, name, truncate)
    return JSONResponse({"model": requested or result.model, "embeddings": shorten(result.embeddings, dims),
                         "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
                         "prompt_eval_count": result.prompt_tokens})


async def embeddings_route(request: Request) -> Response:
    ctx = ctx_of(request)
    data = await read_json(request)
    prompt = get_field(data, "prompt", str, "")
    keep_alive_s(data)
    name = await check_embedding_model(ctx, get_field(data, "model", str))
    if not prompt:
        return JSONResponse({"embedding": []})
    result = await embed(ctx, [prompt], name)
    return JSONResponse({"embedding": result.embeddings[0]})


# --- pull -----------------------------------------------------------------------------------------


def parse_pull_name(name: str) -> tuple[str, str | None]:
    """`org/repo`, `hf.co/org/repo:Q4_K_M`, `huggingface.co/org/repo` -> (repo id, quant or None)."""
    name = name.strip()
    for prefix in ("https://", "http://"):
        name = name.removeprefix(prefix)
    for host in ("hf.co/", "huggingface.co/"):
        name = name.removeprefix(host)
    quant = None
    if ":" in name:
        name, tag = name.rsplit(":", 1)
        quant = None if tag.lower() == "latest" else tag
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name):
        raise ApiError(400, f"pull needs a Hugging Face repo id like org/model or hf.co/org/model:Q4_K_M, got {name!r}")
    return name, quant


async def pull(request: Request) -> Response:
    ctx = ctx_of(request)
    data = await read_json(request)
    repo_id, quant = parse_pull_name(model_name_field(data))
    stream = get_field(data, "stream", bool, True)
    get_field(data, "insecure", bool)
    lines = _pull_lines(ctx, repo_id, quant)
    if stream:
        return stream_response((dumps(line) + "\n" async for line in lines), NDJSON)
    last: dict[str, Any] = {}
    async for line in lines:
        if "error" in line:
            raise ApiError(404 if "not found" in line["error"] else 502, line["error"])
        last = line
    return JSONResponse(last)


async def _pull_lines(ctx: ServerContext, repo_id: str, quant: str | None) -> AsyncIterator[dict[str, Any]]:
    """Run the Hub download in a thread; turn its progress into Ollama's status lines."""
    from influence_tui import hub

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    cancel = threading.Event()
    digests: dict[str, str] = {}

    def put(item: dict[str, Any] | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def on_progress(p: Any) -> None:
        if p.status in ("downloading", "retrying", "file_done") and p.file:
            digest = digests.setdefault(p.file, "sha256:" + hashlib.sha256(f"{repo_id}/{p.file}".encode()).hexdigest())
            put({"status": f"downloading {p.file}", "digest": digest, "total": p.file_total,
                 "completed": p.file_total if p.status == "file_done" else p.file_bytes})
        elif p.status == "verifying":
            put({"status": "verifying sha256 digest"})

    def work() -> None:
        try:
            put({"status": "pulling manifest"})
            endpoint = hub.resolve_endpoint(ctx.settings.mirror)
            plan = hub.plan_download(hub.repo_files(repo_id, None, endpoint), quant=quant)
            hub.download_model(repo_id, ctx.models_dir, quant=quant, endpoint=endpoint, progress=on_progress,
                               cancel=cancel, plan=plan)
            put({"status": "verifying sha256 digest"})
            put({"status": "writing manifest"})
            put({"status": "success"})
        except hub.DownloadCancelled:
            pass
        except hub.HubError as exc:
            put({"error": str(exc)})
        except Exception as exc:  # a bug in the download path: report it, never a traceback
            put({"error": f"pull failed: {exc.__class__.__name__}: {exc}"})
        finally:
            put(None)

    thread = threading.Thread(target=work, name=f"pull {repo_id}", daemon=True)
    thread.start()
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        cancel.set()  # the client left (or we are done): stop the download; the next pull resumes it
    ctx.list_models(fresh=True)


# --- small routes ---------------------------------------------------------------------------------


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": influence_tui.__version__})


ROUTES = [
    Route("/", root, methods=["GET", "HEAD"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET", "POST"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/embed", embed_route, methods=["POST"]),
    Route("/api/embeddings", embeddings_route, methods=["POST"]),
    Route("/api/pull", pull, methods=["POST"]),
    Route("/api/delete", delete, methods=["DELETE"]),
]
