"""Tool calls ("function calling"): a model's calls read out of its answer.

The tools go into the prompt through the model's own chat template (its `tools` variable, as
transformers passes them); the model answers with calls in its family's format, which Ollama and
llama-server read back the same way:

- Hermes / Qwen2.5 / Qwen3 / SmolLM3: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one
  block a call, possibly after some text;
- Llama 3.1+: the whole answer is one JSON object `{"name": …, "parameters": {…}}` (or a list);
- Mistral: `[TOOL_CALLS] [{"name": …, "arguments": {…}}]`.

`ToolCallParser` is fed the answer's text deltas (after any reasoning is split off) and lets plain
text through as it comes; what may be a call is held until it is known. Text that looked like a
call but does not parse as one is given back as text. Pure text, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # the client's id for it (OpenAI's tool_call_id), when it came from a client


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` list (else tools would vanish from the prompt)."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def _call_of(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def calls_in_json(text: str) -> list[ToolCall] | None:
    """A JSON call or list of calls (Llama's and Mistral's form); None when `text` is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_of(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Answer text deltas in, (text deltas out, `calls` at the end)."""

    def __init__(self) -> None:
        self.state = "start"  # start | text | block (inside <tool_call>) | json (the whole answer may be calls)
        self.held = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> str:
        self.held += text
        out: list[str] = []
        while self.held:
            if self.state == "start":
                body = self.held.lstrip()
                if not body:
                    break
                if body.startswith(("{", "[", MISTRAL)):
                    self.state = "json"  # known only at the end: held whole
                    break
                if any(tag.startswith(body) for tag in (OPEN, MISTRAL)) and len(body) < len(MISTRAL):
                    break  # maybe the start of a tag
                self.state = "text"
            elif self.state == "text":
                at = self.held.find(OPEN)
                if at >= 0:
                    out.append(self.held[:at])
                    self.held, self.state = self.held[at:], "block"
                    continue
                cut = len(self.held) - _partial_suffix(self.held, OPEN)
                out.append(self.held[:cut])
                self.held = self.held[cut:]
                break
            elif self.state == "block":
                end = self.held.find(CLOSE)
                if end < 0:
                    break
                block, self.held = self.held[: end + len(CLOSE)], self.held[end + len(CLOSE):]
                found = calls_in_json(block[len(OPEN): end].strip())
                if found:
                    self.calls += found
                else:
                    out.append(block)  # not a call after all: the model's text
                self.state = "text"
            else:  # json
                break
        return "".join(out)

    def flush(self) -> str:
        """The end of the answer: what was held is a call, or text after all."""
        held, self.held = self.held, ""
        if self.state == "json":
            body = held.strip()
            if body.startswith(MISTRAL):
                body = body[len(MISTRAL):].strip()
            found = calls_in_json(body)
            if found:
                self.calls += found
                return ""
        return held  # an unclosed block, a tag's start, JSON that is not a call
