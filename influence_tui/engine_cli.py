"""`influence generate`, `influence embed` and `influence --batch`: the engine without the app."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from influence_tui.config import Settings
from influence_tui.engine.types import ChatMessage, GenerationRequest
from influence_tui.params import GenerationParams, ParamError, params_from_mapping


def _params(args: argparse.Namespace, settings: Settings) -> GenerationParams:
    params = settings.generation_params()
    return params.with_(stop=getattr(args, "stop", None) or None, ignore_eos=getattr(args, "ignore_eos", False) or None)


def _engine(settings: Settings, max_batch: int = 8):
    from influence_tui.engine import Engine

    return Engine(settings, max_batch=max_batch)


def run_generate(args: argparse.Namespace, settings: Settings) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    engine = _engine(settings, max_batch=1)
    t0 = time.perf_counter()
    summary = engine.load(settings.model_path, device=settings.device)
    load_s = time.perf_counter() - t0
    request = GenerationRequest(prompt=prompt, system=settings.system_prompt, params=_params(args, settings), raw=args.raw,
                                format=getattr(args, "format", None))
    stream = engine.submit(request)
    try:
        for event in stream:
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        stream.wait()
        if not args.json:
            sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        engine.shutdown()
    result = stream.result
    assert result is not None
    if result.finish_reason == "error":
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    u = result.usage
    if args.json:
        print(json.dumps({
            "text": result.text, "finish_reason": result.finish_reason, "model": summary.name,
            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens, "dropped_tokens": u.dropped_tokens,
            "load_s": round(load_s, 4), "ttft_s": round(u.ttft_s, 4),
            "prefill_tokens_per_s": round(u.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(u.decode_tokens_per_s, 2),
        }))
    else:
        sys.stdout.write("\n")
        if u.dropped_tokens:
            print(f"note: {u.dropped_tokens} tokens of the prompt did not fit the context and were dropped", file=sys.stderr)
    return 0


def run_embed(args: argparse.Namespace, settings: Settings) -> int:
    from influence_tui.engine import Engine

    engine = Engine(settings)
    result = engine.embed(list(args.texts), model=getattr(args, "model_path", None))
    print(json.dumps({"model": result.model, "prompt_tokens": result.prompt_tokens, "embeddings": result.embeddings}))
    return 0


# --- batch ----------------------------------------------------------------------------------------


@dataclass
class BatchItem:
    index: int
    id: Any
    request: GenerationRequest | None
    error: str | None = None


def parse_batch_line(index: int, line: str, base: GenerationParams, system: str | None) -> BatchItem:
    """A plain line is a prompt; a line starting with '{' is JSON: {"id"?, "prompt"|"messages", "format"?, …params}."""
    text = line.strip()
    if not text.startswith("{"):
        return BatchItem(index, index + 1, GenerationRequest(prompt=text, system=system, params=base))
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return BatchItem(index, index + 1, None, f"line {index + 1}: invalid JSON ({exc.msg})")
    item_id = obj.get("id", index + 1) if isinstance(obj, dict) else index + 1
    if not isinstance(obj, dict):
        return BatchItem(index, item_id, None, f"line {index + 1}: expected a JSON object")
    try:
        params = params_from_mapping({k: v for k, v in obj.items() if k not in ("id", "prompt", "messages", "system", "format")}, base)
        fmt = obj.get("format")
        if fmt not in (None, "", "json"):
            raise ParamError("format must be \"json\" (the answer is one JSON object)")
        fmt = fmt or None
        messages = obj.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in messages):
                raise ParamError("messages must be a list of {role: system|user|assistant, content: string}")
            msgs = [ChatMessage(m["role"], m["content"]) for m in messages]
            return BatchItem(index, item_id, GenerationRequest(messages=msgs, system=obj.get("system", system), params=params,
                                                               format=fmt))
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ParamError("needs a non-empty \"prompt\" string or a \"messages\" list")
        return BatchItem(index, item_id, GenerationRequest(prompt=prompt, system=obj.get("system", system), params=params,
                                                           format=fmt))
    except ParamError as exc:
        return BatchItem(index, item_id, None, f"line {index + 1}: {exc}")


def read_batch(source: TextIO, base: GenerationParams, system: str | None) -> list[BatchItem]:
    lines = [ln for ln in source.read().splitlines() if ln.strip()]
    return [parse_batch_line(i, ln, base, system) for i, ln in enumerate(lines)]


def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    if args.batch == "-":
        items = read_batch(sys.stdin, _params(args, settings), settings.system_prompt)
    else:
        try:
            with open(args.batch, encoding="utf-8") as fh:
                items = read_batch(fh, _params(args, settings), settings.system_prompt)
        except OSError as exc:
            print(f"error: cannot read {args.batch}: {exc.strerror}", file=sys.stderr)
            return 2
    out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        failed = _run_batch_items(items, settings, out)
    finally:
        if args.output:
            out.close()
    return 1 if failed == len(items) and items else 0


def _run_batch_items(items: list[BatchItem], settings: Settings, out: TextIO) -> int:
    from influence_tui.engine import Engine, QueueFull

    engine = Engine(settings, max_batch=8, max_queue=max(64, len(items) + 1))
    engine.load(settings.model_path, device=settings.device)
    # Submit everything at once: the engine starts up to 8 together (a shared system prompt is
    # prefilled once) and refills slots as answers finish.
    valid = [item for item in items if item.request is not None]
    try:
        streams = dict(zip((i.index for i in valid), engine.submit_many([i.request for i in valid])))
    except QueueFull as exc:
        streams = {}
        for item in valid:
            item.error = str(exc)
    failed = 0
    with _Progress(len(items)) as progress:
        for item in items:  # results in input order, each written as soon as its turn comes
            if item.index in streams:
                result = streams[item.index].wait()
                if result.finish_reason == "error":
                    item.error = result.error
                else:
                    row = {"id": item.id, "text": result.text, "prompt_tokens": result.usage.prompt_tokens,
                           "completion_tokens": result.usage.completion_tokens, "cached_tokens": result.usage.cached_tokens,
                           "finish_reason": result.finish_reason}
            if item.error:
                failed += 1
                row = {"id": item.id, "error": item.error}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            progress.advance()
    engine.shutdown()
    return failed


class _Progress:
    """A progress bar on stderr when it is a terminal; nothing otherwise (stdout stays clean JSONL)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> "_Progress":
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=True, console=__import__("rich.console").console.Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task("batch", total=self.total)
        return self

    def advance(self) -> None:
        if self._bar:
            self._bar.advance(self._task)

    def __exit__(self, *exc: Any) -> None:
        if self._bar:
            self._bar.stop()


