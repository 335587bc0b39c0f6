"""Tool calls ("function calling"): a model's calls read out of its answer.

The tools go into the prompt through the model's own chat template (its `tools` variable, as
transformers passes them); the model answers with calls in its family's format, which Ollama and
llama-server read back the same way:

- Hermes / Qwen2.5 / Qwen3 / SmolLM3: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one
  block a call, possibly after some text;
- Llama 3.1+: the whole answer is one JSON object `{"name": …, "parameters": {…}}`;
- Mistral: `[TOOL_CALLS] [{"name": …, "arguments": {…}}]`;
- Granite 3 / Phi-4-mini: `<|tool_call|>[{"name": …, "arguments": {…}}]` (Phi closes it with
  `<|/tool_call|>`).

The template tells which format its model writes (`formats_of`). `ToolCallParser` is fed the
answer's text deltas (after any reasoning is split off) and lets plain text through as it comes;
what may be a call is held until it is known. Only calls of the tools the request gave count (as
Ollama matches them): a JSON answer that happens to have a "name" key stays an answer. Text that
looked like a call but is not one is given back as text. Pure text, no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"
PIPE_OPEN, PIPE_CLOSE = "<|tool_call|>", "<|/tool_call|>"  # Granite 3, Phi-4-mini
TAGS = (OPEN, CLOSE, MISTRAL, PIPE_OPEN, PIPE_CLOSE)
HERMES, JSON, MISTRAL_LIST, PIPE_LIST = "hermes", "json", "mistral", "pipe"
LIST_OPENERS = ((MISTRAL, MISTRAL_LIST), (PIPE_OPEN, PIPE_LIST))  # a tag, then the calls as a JSON list to the end


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # the client's id for it (OpenAI's tool_call_id), when it came from a client


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` list (else tools would vanish from the prompt)."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def formats_of(template: str | None) -> frozenset[str]:
    """The call formats a template's model writes: what its template shows it (a template that
    shows none of them: any)."""
    t = template or ""
    found = {fmt for fmt, mark in ((HERMES, OPEN), (MISTRAL_LIST, MISTRAL), (PIPE_LIST, PIPE_OPEN), (JSON, '"parameters"'))
             if mark in t}
    return frozenset(found or (HERMES, JSON, MISTRAL_LIST, PIPE_LIST))


def tool_openers(tokenizer: Any, formats: frozenset[str]) -> frozenset[int]:
    """The single tokens that open a call in these formats (Hermes' <tool_call>, Mistral's
    [TOOL_CALLS]) where the vocabulary has them: with tools and a JSON format, an answer may start
    with one instead of the object. Llama 3's calls are bare JSON objects: none."""
    ids = (tokenizer.tok.token_to_id(tag) for fmt, tag in ((HERMES, OPEN), (MISTRAL_LIST, MISTRAL), (PIPE_LIST, PIPE_OPEN))
           if fmt in formats)
    return frozenset(i for i in ids if i is not None)


def _call_of(obj: Any, names: frozenset[str] | None) -> ToolCall | None:
    """A call object: the name of a tool given (any, where `names` is None) and its arguments."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    if "arguments" not in obj and "parameters" not in obj:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        args = {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def calls_in_json(text: str, names: frozenset[str] | None = None) -> list[ToolCall] | None:
    """A JSON call or list of calls; None when `text` is not one (every call must be valid)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_of(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Answer text deltas in, text deltas out; `calls` at the end.

    `names`: the tools the request gave (None: any name); `formats`: see `formats_of`."""

    def __init__(self, names: frozenset[str] | None = None, formats: frozenset[str] = frozenset((HERMES, JSON, MISTRAL_LIST, PIPE_LIST))) -> None:
        self.names, self.formats = names, formats
        self.state = "start"  # start | text | block (inside <tool_call>) | json (the whole answer may be calls)
        self.held = ""
        self.calls: list[ToolCall] = []

    def _json_start(self, body: str) -> bool:
        if JSON in self.formats and body.startswith(("{", "[")):
            return True
        return any(fmt in self.formats and body.startswith(tag) for tag, fmt in LIST_OPENERS)

    def _maybe_tag(self, body: str) -> bool:
        tags = [t for t, fmt in ((OPEN, HERMES), *LIST_OPENERS) if fmt in self.formats]
        return any(t.startswith(body) and len(body) < len(t) for t in tags)

    def feed(self, text: str) -> str:
        self.held += text
        out: list[str] = []
        while self.held:
            if self.state == "start":
                body = self.held.lstrip()
                if not body:
                    break
                if self._json_start(body):
                    self.state = "json"  # known only at the end: held whole
                    break
                if self._maybe_tag(body):
                    break  # maybe the start of a tag
                self.state = "text"
            elif self.state == "text":
                at = self.held.find(OPEN) if HERMES in self.formats else -1
                if at >= 0:
                    out.append(self.held[:at].rstrip())  # the blank before a call is not content
                    self.held, self.state = self.held[at:], "block"
                    continue
                # keep back a tag's possible start and trailing blank space (a call may follow)
                cut = len(self.held) - (_partial_suffix(self.held, OPEN) if HERMES in self.formats else 0)
                cut = len(self.held[:cut].rstrip())
                out.append(self.held[:cut])
                self.held = self.held[cut:]
                break
            elif self.state == "block":
                if not self._close_block(out):
                    break
            else:  # json
                break
        return "".join(out)

    def _close_block(self, out: list[str]) -> bool:
        """A `<tool_call>` block at the start of `held`: its call, once some `</tool_call>` closes
        a valid one (the first may lie inside one of its strings); False while none does yet."""
        end = self.held.find(CLOSE)
        while end >= 0:
            found = calls_in_json(self.held[len(OPEN): end].strip(), self.names)
            if found:
                self.calls += found
                self.held, self.state = self.held[end + len(CLOSE):].lstrip(), "text"
                return True
            end = self.held.find(CLOSE, end + 1)
        return False

    def flush(self) -> str:
        """The end of the answer: what was held is a call, or text after all."""
        held, self.held = self.held, ""
        if self.state == "json":
            body = held.strip()
            for tag, _ in LIST_OPENERS:
                if body.startswith(tag):
                    body = body[len(tag):].strip().removesuffix(PIPE_CLOSE).strip()
            found = calls_in_json(body, self.names)
            if found:
                self.calls += found
                return ""
        elif self.state == "block":  # never closed (max_tokens, a stop string): a whole call still counts
            found = calls_in_json(held[len(OPEN):].removesuffix(CLOSE).strip(), self.names)
            if found:
                self.calls += found
                return ""
        return "" if self.calls and not held.strip() else held


def mistral_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mistral's templates take only call ids of 9 letters and digits: others (OpenAI's
    "call_…", none from Ollama clients) are mapped to such, each tool result to the id of the call
    it answers (by its id, else in order)."""
    out, pending = [], []

    def short(key: str) -> str:
        return hashlib.sha1(key.encode()).hexdigest()[:9]

    for turn, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for i, call in enumerate(m["tool_calls"]):
                call = {**call, "id": short(call.get("id") or f"{turn}:{i}")}
                calls.append(call)
            m["tool_calls"], pending = calls, [c["id"] for c in calls]
        elif m.get("role") == "tool":
            given = m.get("tool_call_id")
            m["tool_call_id"] = short(given) if given else (pending.pop(0) if pending else short(f"{turn}"))
            if given and m["tool_call_id"] in pending:
                pending.remove(m["tool_call_id"])
        out.append(m)
    return out


def one_call_per_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Llama 3.x's templates take one call per assistant turn ("This model only supports single
    tool-calls at once!"): an answer that made several becomes as many assistant turns, each call
    followed by its result where the results came in the calls' order."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        calls = m.get("tool_calls") or []
        if len(calls) < 2:
            out.append(m)
            i += 1
            continue
        results = []
        j = i + 1
        while j < len(messages) and messages[j].get("role") == "tool":
            results.append(messages[j])
            j += 1
        for k, call in enumerate(calls):
            out.append({**m, "content": m.get("content", "") if k == 0 else "", "tool_calls": [call]})
            if k < len(results):
                out.append(results[k])
        out += results[len(calls):]
        i = j
    return out
