"""`influence generate`, `influence embed` and `influence --batch`: the engine without the app."""

from __future__ import annotations

import argparse
import codecs
import difflib
import json
import os
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, TextIO

from influence_tui.config import Settings
from influence_tui.engine.types import ChatMessage, GenerationRequest
from influence_tui.params import PARAM_NAMES, GenerationParams, ParamError, params_from_mapping


class InputError(Exception):
    """Bad input (a file, stdin, an argument): one line on stderr and exit 2, before any model loads."""


def _decode(data: bytes, label: str) -> str:
    """Strict UTF-8 (a leading BOM dropped): undecodable bytes must not reach the tokenizer as
    lone surrogates, which fail deep inside it, and in a batch take every other prompt down too."""
    skip = 3 if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start  # an offset into the file as given, BOM included
        raise InputError(f"{label} is not UTF-8 text (byte 0x{data[at]:02x} at offset {at})") from None


def _read_text(name: str) -> str:
    """The text of file `name`, or of standard input for '-'."""
    if name == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise InputError("standard input is closed")
        return _decode(sys.stdin.buffer.read(), "standard input")
    try:
        with open(name, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    return _decode(data, name)


def _arg_text(value: str, label: str) -> str:
    """An argument (or setting) as text: argv bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return value
    try:
        raw = os.fsencode(value)  # the bytes as given on the command line or in the environment
    except UnicodeEncodeError:  # a surrogate that came from elsewhere (a "\ud800" JSON escape)
        raise InputError(f"{label} is not valid Unicode text") from None
    return _decode(raw, label)  # raises InputError naming the bad byte


def _params(args: argparse.Namespace, settings: Settings) -> GenerationParams:
    params = settings.generation_params()
    stop = [_arg_text(s, "--stop") for s in getattr(args, "stop", None) or []]
    return params.with_(stop=stop or None, ignore_eos=getattr(args, "ignore_eos", False) or None)


def _system(settings: Settings) -> str | None:
    system = settings.system_prompt
    return _arg_text(system, "the system prompt") if system else system


def answer_format(value: Any, label: str = "format") -> dict[str, Any]:
    """`format`: "json" or a JSON schema (checked now: it is an error before any model loads), as
    GenerationRequest's fields."""
    from influence_tui.engine.json_schema import SchemaError, compile_schema

    if value in (None, ""):
        return {}
    if value == "json":
        return {"format": "json"}
    if not isinstance(value, dict):
        raise ParamError(f"{label} must be \"json\" (the answer is one JSON object) or a JSON schema (an object)")
    try:
        compile_schema(value)
    except SchemaError as exc:
        raise ParamError(f"{label}: JSON schema: {exc}") from None
    except Exception as exc:  # a schema no check foresaw: still one line, not a traceback
        raise ParamError(f"{label}: JSON schema: cannot be followed ({type(exc).__name__}: {exc})") from None
    return {"format": "json", "json_schema": value}


def _format_arg(value: str | None) -> dict[str, Any]:
    """--format: json, a JSON schema as text ('{...}'), or a file holding one."""
    if value is None or value == "json":
        return answer_format(value)
    text = value if value.lstrip().startswith("{") else _read_text(value)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        where = "the --format schema" if text is value else value
        raise InputError(f"{where} is not valid JSON ({exc})") from None
    try:
        return answer_format(schema, "--format")
    except ParamError as exc:
        raise InputError(str(exc)) from None


def _engine(settings: Settings, max_batch: int = 8):
    from influence_tui.engine import Engine

    return Engine(settings, max_batch=max_batch)


def run_generate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        prompt = _read_text("-") if args.prompt == "-" else _arg_text(args.prompt, "the prompt")
        logprobs = getattr(args, "logprobs", None)
        if logprobs is not None and not (getattr(args, "json", False) and 0 <= logprobs <= 20):
            raise InputError("--logprobs takes 0 to 20 alternatives and needs --json (the values go into its output)")
        suffix = getattr(args, "suffix", None)
        request = GenerationRequest(prompt=prompt, system=_system(settings), params=_params(args, settings), raw=args.raw,
                                    think=settings.think, logprobs=logprobs,
                                    suffix=_arg_text(suffix, "the suffix") if suffix is not None else None,
                                    **_format_arg(getattr(args, "format", None)))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not prompt.strip() and request.suffix is None:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    engine = _engine(settings, max_batch=1)
    try:
        return _stream_generate(engine, request, args, settings)
    finally:
        engine.shutdown()


def _stream_generate(engine: Any, request: GenerationRequest, args: argparse.Namespace, settings: Settings) -> int:
    t0 = time.perf_counter()
    summary = engine.load(settings.model_path, device=settings.device)
    load_s = time.perf_counter() - t0
    stream = engine.submit(request)
    shown = _Reasoning(hidden=args.json or getattr(args, "hide_thinking", False))
    try:
        for event in stream:
            shown.write(event.thinking)
            if not args.json:
                if event.text:
                    shown.end()
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        stream.wait()
        shown.end(done=False)
        if not args.json:
            sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)
        return 130
    result = stream.result
    assert result is not None
    shown.end(done=bool(result.text))  # reasoning only: cut off while thinking (the note below says so)
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
            **({"thinking": result.thinking} if result.thinking else {}),
            **({"logprobs": logprob_rows(result.logprobs)} if result.logprobs is not None else {}),
        }))
    else:
        sys.stdout.write("\n")
        if u.dropped_tokens:
            print(f"note: {u.dropped_tokens} tokens of the prompt did not fit the context and were dropped", file=sys.stderr)
    if result.finish_reason == "length" and result.thinking and not result.text:
        print(f"note: the model was still thinking after {u.completion_tokens} tokens, so there is no answer: "
              "raise --max-tokens, or --think off", file=sys.stderr)
    return 0


class _Reasoning:
    """A reasoning model's thinking, on stderr as it comes (dim on a terminal), so that stdout holds
    the answer alone: `influence generate … > answer.txt` keeps the file clean, and a person at the
    terminal still sees the model think (Ollama's CLI shows it too; --hide-thinking hides it)."""

    def __init__(self, hidden: bool) -> None:
        self.hidden, self.open = hidden, False
        self.tty = sys.stderr.isatty()

    def write(self, text: str) -> None:
        if not text or self.hidden:
            return
        if not self.open:
            self.open = True
            sys.stderr.write("\x1b[2mThinking...\n" if self.tty else "Thinking...\n")
        sys.stderr.write(text)
        sys.stderr.flush()

    def end(self, done: bool = True) -> None:
        """`done`: the model finished thinking (not: it was cut off or stopped while it thought)."""
        if self.open:
            self.open = False
            said = "\n...done thinking." if done else ""
            sys.stderr.write(said + ("\x1b[0m" if self.tty else "") + ("\n\n" if done else "\n"))
            sys.stderr.flush()


def run_embed(args: argparse.Namespace, settings: Settings) -> int:
    from influence_tui.engine import Engine

    try:
        texts = _embed_texts(list(args.texts))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(settings)
    try:
        result = engine.embed(texts, model=getattr(args, "model_path", None))
    finally:
        engine.shutdown()
    print(json.dumps({"model": result.model, "prompt_tokens": result.prompt_tokens, "embeddings": result.embeddings}))
    return 0


def _embed_texts(args: list[str]) -> list[str]:
    """The texts to embed: '-' is standard input (one text, read once); none may be blank,
    since a blank text still gets a vector that means nothing."""
    if args.count("-") > 1:
        raise InputError("'-' (standard input) can be given only once")
    texts = [_read_text("-") if a == "-" else _arg_text(a, f"text {n}") for n, a in enumerate(args, 1)]
    for n, text in enumerate(texts, 1):
        if not text.strip():
            raise InputError(f"text {n} is empty")
    return texts


# --- batch ----------------------------------------------------------------------------------------

# What a JSONL line may hold: anything else is most likely a typo ("temprature") that would
# otherwise be ignored without a word, leaving the default in force.
BATCH_FIELDS = ("id", "prompt", "messages", "system", "format", "think", "suffix", "logprobs", *PARAM_NAMES)


def logprob_rows(entries: list[Any]) -> list[dict[str, Any]]:
    """Each token with its log-probability (and alternatives), as the OpenAI and Ollama routes write them."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top]} for e in entries]


@dataclass
class BatchItem:
    line: int  # the 1-based line of the input: unique, and what an editor shows
    id: Any
    request: GenerationRequest | None
    error: str | None = None


def _check_text(value: Any, what: str) -> str:
    """A JSON string the tokenizer can take: a "\\udcce" escape decodes to a lone surrogate."""
    if not isinstance(value, str):
        raise ParamError(f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _check_fields(obj: dict[str, Any]) -> None:
    for key in obj:
        if key not in BATCH_FIELDS:
            close = difflib.get_close_matches(key, BATCH_FIELDS, n=1)
            raise ParamError(f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for flag in ("ignore_eos", "think"):
        if flag in obj and not isinstance(obj[flag], bool):
            raise ParamError(f"{flag} must be true or false")  # bool("false") would be True
    if "prompt" in obj and "messages" in obj:
        raise ParamError("give either \"prompt\" or \"messages\", not both")
    for s in obj.get("stop") or []:
        if isinstance(s, str):
            _check_text(s, "stop")


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in value):
        raise ParamError("messages must be a list of {role: system|user|assistant, content: string}")
    return [ChatMessage(m["role"], _check_text(m["content"], "a message's content")) for m in value]


def _json_request(obj: dict[str, Any], base: GenerationParams, system: str | None) -> GenerationRequest:
    """The request of one JSON line (ParamError with a user-facing message when it is wrong)."""
    _check_fields(obj)
    params = params_from_mapping({k: v for k, v in obj.items() if k in PARAM_NAMES}, base)
    fmt = answer_format(obj.get("format"))
    if "system" in obj:
        system = _check_text(obj["system"], "system")
    logprobs, suffix = obj.get("logprobs"), obj.get("suffix")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
        raise ParamError("logprobs must be a whole number of alternatives from 0 to 20")
    if suffix is not None:
        suffix = _check_text(suffix, "suffix")
    shared: dict[str, Any] = dict(system=system, params=params, think=obj.get("think"), logprobs=logprobs, suffix=suffix, **fmt)
    if obj.get("messages") is not None:
        return GenerationRequest(messages=_messages(obj["messages"]), **shared)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or (not prompt.strip() and suffix is None):
        raise ParamError("needs a non-empty \"prompt\" string or a \"messages\" list")
    return GenerationRequest(prompt=_check_text(prompt, "prompt"), **shared)


def parse_batch_line(line: int, text: str, base: GenerationParams, system: str | None) -> BatchItem:
    """A plain line is a prompt; a line starting with '{' is JSON: {"id"?, "prompt"|"messages", "format"?, …params}.
    `line` is the 1-based line number in the file: errors name it, and it is the default id."""
    text = text.strip()
    if not text.startswith("{"):
        return BatchItem(line, line, GenerationRequest(prompt=text, system=system, params=base))
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return BatchItem(line, line, None, f"line {line}: invalid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return BatchItem(line, line, None, f"line {line}: expected a JSON object")
    item_id = obj.get("id", line)
    try:
        return BatchItem(line, item_id, _json_request(obj, base, system))
    except ParamError as exc:
        return BatchItem(line, item_id, None, f"line {line}: {exc}")


def read_batch(text: str, base: GenerationParams, system: str | None) -> list[BatchItem]:
    """One item per non-blank line. Split on '\\n' only: str.splitlines() also breaks at \\x0c,
    \\u2028 and the like (valid inside a JSON string), which would shift every later line number."""
    lines = text.split("\n")
    return [parse_batch_line(n, ln, base, system) for n, ln in enumerate(lines, 1) if ln.strip()]


def run_batch(args: argparse.Namespace, settings: Settings) -> int:
    try:
        items = _read_items(args, settings)
        out = _output(args.output)  # before the model loads: a bad output path is reported at once
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        failed = _run_batch_items(items, settings, out)
    except KeyboardInterrupt:
        out.close(keep=out.rows > 0)  # the answers that finished are kept
        raise
    except BaseException:
        out.close(keep=False)
        raise
    if failed < len(items):
        out.close(keep=True)
        return 0
    # every prompt failed: rows made only of errors must not replace an earlier good output
    first = next(item.error for item in items if item.error)
    which = "the prompt" if len(items) == 1 else f"all {len(items)} prompts"
    kept = f"; {args.output} was left as it was" if isinstance(out, _AtomicOutput) else ""
    print(f"error: {which} failed (first: {first}){kept}", file=sys.stderr)
    out.close(keep=False)
    return 1


def _read_items(args: argparse.Namespace, settings: Settings) -> list[BatchItem]:
    items = read_batch(_read_text(args.batch), _params(args, settings), _system(settings))
    if not items:
        raise InputError(f"no prompts in {'standard input' if args.batch == '-' else args.batch}")
    for item in items:  # a line's own "think" wins over the setting
        if item.request is not None and item.request.think is None:
            item.request.think = settings.think
    return items


class _Sink:
    """Where result rows go, one JSON line each, flushed as each completes (`tail -f` works)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.stream.flush()
        self.rows += 1

    def close(self, keep: bool) -> None:
        """What was written stays written (stdout, a pipe): nothing to undo."""
        if self.stream is not sys.stdout:
            self.stream.close()


def _output(path: str | None) -> _Sink:
    if not path or path == "-":  # `--output -`: standard output, as `--batch -` reads standard input
        return _Sink(sys.stdout)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        try:  # a pipe or a device (/dev/stderr, a FIFO): nothing there to keep, write straight to it
            return _Sink(open(path, "w", encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
    return _AtomicOutput(path)


class _AtomicOutput(_Sink):
    """--output: rows go to a temp file beside OUTPUT, which replaces OUTPUT only when the run
    keeps its results, so a run that fails (model not found, Ctrl-C before any answer) leaves the
    old file's bytes as they were."""

    def __init__(self, path: str) -> None:
        # write through a symlink to its target rather than replacing the link with a file
        self.path = os.path.realpath(path)
        if os.path.isdir(self.path):
            raise InputError(f"cannot write {path}: it is a folder")
        if os.path.exists(self.path) and not os.access(self.path, os.W_OK):  # a read-only file stays protected
            raise InputError(f"cannot write {path}: Permission denied")
        folder, name = os.path.split(self.path)
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".partial", dir=folder)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        super().__init__(os.fdopen(fd, "w", encoding="utf-8"))

    def close(self, keep: bool) -> None:
        if not keep:
            self.stream.close()
            os.unlink(self.tmp)
            return
        self.stream.flush()
        os.fsync(self.stream.fileno())  # the bytes are on disk before the name moves
        self.stream.close()
        try:
            os.chmod(self.tmp, self._mode())
            os.replace(self.tmp, self.path)
        except OSError as exc:  # the results stay where they are rather than being lost
            raise OSError(f"cannot replace {self.path} ({exc.strerror}): the results are in {self.tmp}") from None

    def _mode(self) -> int:
        """mkstemp makes the file 0600: keep the old file's mode, or use what open() would give."""
        try:
            return stat.S_IMODE(os.stat(self.path).st_mode)
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            return 0o666 & ~umask


def _run_batch_items(items: list[BatchItem], settings: Settings, out: _Sink) -> int:
    from influence_tui.engine import Engine

    if all(item.request is None for item in items):
        return _write_results(items, {}, out)  # every line is wrong: no model to load
    engine = Engine(settings, max_batch=8, max_queue=max(64, len(items) + 1))
    try:
        engine.load(settings.model_path, device=settings.device)
        streams = _submit_all(engine, items)
        try:
            return _write_results(items, streams, out)
        finally:
            for stream in streams.values():  # on Ctrl-C: stop what is still generating
                stream.cancel()
    finally:
        engine.shutdown()


def _submit_all(engine: Any, items: list[BatchItem]) -> dict[int, Any]:
    """Submit everything at once: the engine starts up to 8 together (a shared system prompt is
    prefilled once) and refills slots as answers finish. Keyed by line number."""
    from influence_tui.engine import QueueFull

    valid = [item for item in items if item.request is not None]
    try:
        return dict(zip((i.line for i in valid), engine.submit_many([i.request for i in valid])))
    except QueueFull as exc:
        for item in valid:
            item.error = str(exc)
        return {}


def _write_results(items: list[BatchItem], streams: dict[int, Any], out: _Sink) -> int:
    """Rows in input order, each written as soon as its turn comes; returns how many failed."""
    failed = 0
    with _Progress(len(items)) as progress:
        for item in items:
            row: dict[str, Any] = {}
            if item.line in streams:
                result = streams[item.line].wait()
                if result.finish_reason == "error":
                    item.error = result.error
                else:
                    row = {"id": item.id, "text": result.text, "prompt_tokens": result.usage.prompt_tokens,
                           "completion_tokens": result.usage.completion_tokens, "cached_tokens": result.usage.cached_tokens,
                           "finish_reason": result.finish_reason}
                    if result.thinking:  # a reasoning model's reasoning, apart from its answer
                        row["thinking"] = result.thinking
                    if result.logprobs is not None:
                        row["logprobs"] = logprob_rows(result.logprobs)
            if item.error:
                failed += 1
                row = {"id": item.id, "error": item.error}
            out.write(row)
            progress.advance()
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


