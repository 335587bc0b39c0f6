"""Chat sessions as JSON files, compatible with the original tool's files.

Format (the original tool's keys, plus ``version``)::

    {"version": 1, "model_path": ..., "system_prompt": ..., "max_tokens": ..., "temperature": ...,
     "top_p": ..., "top_k": ..., "repeat_penalty": ...,
     "messages": [{"role": "user", "content": "...", "timestamp": "2026-01-29 14:30:15"}, ...],
     "created_at": "2026-01-29 14:30:15"}

A session may carry ``"title"`` (the name the app's Chats list shows, when the user gave one).
A message may also carry ``"stopped": true`` (an answer stopped with Esc) and ``"thinking"`` (a
reasoning model's reasoning; ``content`` is the answer alone). Both are written only when set, and
files without them (the original tool's, older ones of ours) load as before.

Files without ``version`` are the original tool's and load as version 0. Saving is atomic (temp
file + rename): a crash or a full disk mid-save leaves the old file whole. Loading validates every
field and raises ``SessionError`` with one line, so a broken or foreign file changes nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from influence_tui.config import atomic_write_text

VERSION = 1
ROLES = ("system", "user", "assistant")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # what the original tool writes


class SessionError(ValueError):
    """A session file cannot be read or written (message is one user-facing line)."""


def now_stamp() -> str:
    return datetime.now().strftime(TIME_FORMAT)


@dataclass
class SessionMessage:
    role: str
    content: str
    timestamp: str = field(default_factory=now_stamp)
    # Not in the original format: an answer stopped with Esc is kept and marked (extra keys are
    # ignored by the original tool, which reads role/content only).
    stopped: bool = False
    # A reasoning model's reasoning before the answer in `content`: kept for the reader, never
    # sent back to the model (content is the answer alone).
    thinking: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            d["thinking"] = self.thinking
        d["timestamp"] = self.timestamp
        if self.stopped:
            d["stopped"] = True
        return d


@dataclass
class Session:
    model_path: str | None = None
    system_prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    messages: list[SessionMessage] = field(default_factory=list)
    created_at: str = field(default_factory=now_stamp)
    version: int = VERSION
    # Not in the original format (which ignores it): the name the Chats list shows, when the user
    # gave one; otherwise the list shows the first question.
    title: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "model_path": self.model_path,
            "system_prompt": self.system_prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "messages": [m.to_dict() for m in self.messages],
            "created_at": self.created_at,
            **({"title": self.title} if self.title else {}),
        }


def _write(path: str | Path, text: str, what: str) -> Path:
    """Write atomically; raise SessionError (the old file stays whole) on failure."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise SessionError(f"cannot save {what}: {target} is a folder")
    try:
        atomic_write_text(target, text)
    except OSError as exc:
        raise SessionError(f"cannot save {what} to {target}: {exc.strerror or exc}") from None
    return target


def save_session(path: str | Path, session: Session) -> Path:
    """Write the session atomically; raise SessionError (the old file stays whole) on failure."""
    return _write(path, json.dumps(session.to_dict(), indent=2, ensure_ascii=False) + "\n", "session")


MARKDOWN_SUFFIXES = (".md", ".markdown")


def session_markdown(session: Session, title: str) -> str:
    """The chat as a Markdown transcript (what `/save FILE.md` writes: to read or share, not to
    load back). A reasoning model's reasoning is folded in a <details> block above its answer."""
    lines = [f"# {title}", ""]
    model = Path(session.model_path).name if session.model_path else None
    lines += [f"*{session.created_at}*" + (f" · {model}" if model else ""), ""]
    if session.system_prompt:
        lines += ["> **System:** " + session.system_prompt.replace("\n", "\n> "), ""]
    for m in session.messages:
        who = {"user": "You", "assistant": "Assistant", "system": "System"}[m.role]
        lines += [f"## {who}" + (" (stopped)" if m.stopped else ""), ""]
        if m.thinking:
            lines += ["<details><summary>Reasoning</summary>", "", _closed(m.thinking.strip()), "", "</details>", ""]
        text = _closed(m.content.rstrip())
        if m.role == "user":  # typed text: a line that starts with # is not a heading of the transcript
            text = _no_headings(text)
        lines += [text, ""]
    return "\n".join(lines).rstrip() + "\n"


def _open_fence(text: str) -> str | None:
    """The marker of a code block left open at the end of `text` (``` or ~~~), if any."""
    fence = None
    for line in text.split("\n"):
        mark = line.lstrip()[:3]
        if fence is None and mark in ("```", "~~~"):
            fence = mark
        elif fence is not None and mark == fence:
            fence = None
    return fence


def _closed(text: str) -> str:
    """A message whose code block is left open (a stopped answer) closed, so the messages after
    it stay messages."""
    fence = _open_fence(text)
    return f"{text}\n{fence}" if fence else text


def _no_headings(text: str) -> str:
    """Typed text's lines that Markdown would make headings (`# x`, or a line under a `---` /
    `===` one) escaped, outside code blocks: the transcript's own headings are its turns."""
    out: list[str] = []
    fence = None
    for line in text.split("\n"):
        bare = line.strip()
        if fence is None and bare[:3] in ("```", "~~~"):
            fence = bare[:3]
        elif fence is not None:
            fence = None if bare[:3] == fence else fence
        elif bare.startswith("#") or (len(bare) >= 2 and set(bare) in ({"-"}, {"="})):
            line = "\\" + bare
        out.append(line)
    return "\n".join(out)


def save_markdown(path: str | Path, session: Session, title: str) -> Path:
    """Write the transcript atomically; SessionError (the old file whole) on failure."""
    return _write(path, session_markdown(session, title), "the transcript")


def load_session(path: str | Path) -> Session:
    """Read and validate a session file (ours or the original tool's); SessionError if it is not one."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SessionError(f"no session file {source}") from None
    except IsADirectoryError:
        raise SessionError(f"{source} is a folder, not a session file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SessionError(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SessionError(f"{source} is not valid JSON (line {getattr(exc, 'lineno', '?')}): not a session file") from None
    return session_from_dict(data, str(source))


def session_from_dict(data: Any, where: str = "session") -> Session:
    if not isinstance(data, dict):
        raise SessionError(f"{where} is not a session file: expected a JSON object")
    if "messages" not in data:
        raise SessionError(f"{where} is not a session file: no \"messages\" list")
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SessionError(f"{where}: \"version\" must be a whole number")
    if version > VERSION:
        raise SessionError(f"{where} was written by a newer version (session format {version}; this one reads up to {VERSION})")
    return Session(
        model_path=_opt_str(data, "model_path", where),
        system_prompt=_opt_str(data, "system_prompt", where),
        max_tokens=_opt_num(data, "max_tokens", where, int),
        temperature=_opt_num(data, "temperature", where, float),
        top_p=_opt_num(data, "top_p", where, float),
        top_k=_opt_num(data, "top_k", where, int),
        repeat_penalty=_opt_num(data, "repeat_penalty", where, float),
        messages=_messages(data["messages"], where),
        created_at=_opt_str(data, "created_at", where) or now_stamp(),
        version=VERSION,
        title=_opt_str(data, "title", where),
    )


def _opt_str(data: dict[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise SessionError(f"{where}: \"{key}\" must be text, got {type(value).__name__}")


def _opt_num(data: dict[str, Any], key: str, where: str, kind: type) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SessionError(f"{where}: \"{key}\" must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise SessionError(f"{where}: \"{key}\" must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _messages(raw: Any, where: str) -> list[SessionMessage]:
    if not isinstance(raw, list):
        raise SessionError(f"{where}: \"messages\" must be a list")
    out = []
    for i, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise SessionError(f"{where}: message {i} is not an object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise SessionError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise SessionError(f"{where}: message {i} has no text \"content\"")
        thinking = item.get("thinking")
        if thinking is not None and not isinstance(thinking, str):
            raise SessionError(f"{where}: message {i} has \"thinking\" that is not text")
        stamp = item.get("timestamp")
        if stamp is not None and not isinstance(stamp, str):
            stamp = str(stamp)
        out.append(SessionMessage(role, content, stamp or "", bool(item.get("stopped", False)), thinking or ""))
    return out
