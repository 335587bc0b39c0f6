"""The app's chats, kept on this disk: each conversation one session file in one folder.

The Chat screen saves its conversation after every answer (setting `save_chats`, on by default),
so quitting, a crash or starting a new chat loses nothing; the Chats list (ctrl+o in the app) and
`influence chats` read the folder back, newest first. The files are the session JSON that `/save`
writes and `/load` and `--session` read (the original tool's format, plus an optional `title`),
so a chat can be copied, shared or opened with `influence chat --session FILE`.

Nothing here imports the engine: the list is read by the CLI and the app's first frame.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from influence_tui.sessions import Session, SessionError, load_session, save_session

if TYPE_CHECKING:
    from influence_tui.config import Settings

UNTITLED = "New chat"
TITLE_CHARS = 60  # a title made from the first question is cut here (with an ellipsis)
SLUG_CHARS = 40  # the file name's words from the title


def chats_folder(settings: "Settings") -> Path:
    """`chats_dir`, else `chats` in the platform's data folder (~/.local/share/influence-tui on
    Linux); absolute, so that a chat's path compares equal however it was reached."""
    if settings.chats_dir:
        return Path(settings.chats_dir).expanduser().resolve()
    from platformdirs import user_data_dir

    return (Path(user_data_dir("influence-tui", appauthor=False)) / "chats").resolve()


def one_line(text: str, limit: int = TITLE_CHARS) -> str:
    """Whitespace collapsed; cut at `limit` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def title_of(session: Session, limit: int = TITLE_CHARS) -> str:
    """The name a chat is listed under: the one the user gave, else its first question."""
    if session.title and session.title.strip():
        return one_line(session.title, limit)
    first = next((m.content for m in session.messages if m.role == "user" and m.content.strip()), "")
    return one_line(first, limit) or UNTITLED


def _slug(title: str) -> str:
    words = re.findall(r"[a-z0-9]+", title.lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > SLUG_CHARS:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or "chat"


@dataclass
class ChatEntry:
    """One saved chat, as the list shows it."""

    path: Path
    title: str
    modified: float  # the file's time: when the chat last changed
    messages: int
    model: str | None  # the model it was recorded with (a path or a name)
    created_at: str
    text: str = field(default="", repr=False)
    given_title: str | None = None  # the title the user gave (None: listed under its first question)
    full_title: str = ""  # the title uncut  # the title and the messages, lower case: what a search reads

    def matches(self, query: str) -> bool:
        """Every word of `query` is in the title or a message (case-insensitive)."""
        return all(word in self.text for word in query.lower().split())

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "title": self.full_title or self.title, "messages": self.messages,
                "model": self.model, "created_at": self.created_at,
                "updated_at": datetime.fromtimestamp(self.modified).astimezone().isoformat(timespec="seconds")}


def entry_of(path: Path, session: Session, modified: float) -> ChatEntry:
    title, full = title_of(session), title_of(session, limit=10_000)
    text = "\n".join([full, *(m.content for m in session.messages)]).lower()
    given = " ".join(session.title.split()) if session.title and session.title.strip() else None
    return ChatEntry(path, title, modified, len(session.messages), session.model_path, session.created_at, text,
                     given, full)


def list_chats(folder: Path) -> tuple[list[ChatEntry], list[str]]:
    """The chats in `folder`, the most recently changed first, and one line for each file there
    that is not a session (left as it is: it may be the user's)."""
    entries: list[ChatEntry] = []
    problems: list[str] = []
    try:
        files = [p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
    except FileNotFoundError:
        return [], []
    except NotADirectoryError:
        blocker = not_a_folder(folder) or folder
        raise SessionError(f"the chats folder {folder} cannot be read: {blocker} is a file, not a folder "
                           "(setting chats_dir)") from None
    except OSError as exc:
        raise SessionError(f"cannot read the chats folder {folder}: {exc.strerror or exc}") from None
    for path in files:
        try:
            modified = path.stat().st_mtime
            entries.append(entry_of(path, load_session(path), modified))
        except (SessionError, OSError) as exc:
            problems.append(str(exc))
    entries.sort(key=lambda e: (e.modified, e.path.name), reverse=True)
    return entries, problems


def not_a_folder(folder: Path) -> Path | None:
    """The file that stands where `folder` or one of its parents should be a folder, if any."""
    for place in (folder, *folder.parents):
        try:
            if place.exists():
                return None if place.is_dir() else place
        except OSError:
            return None
    return None


def new_chat_path(folder: Path, session: Session) -> Path:
    """A new file name: when the chat started and its first words (sorts by time in a file manager)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M%S")
    base = f"{stamp}-{_slug(title_of(session))}"
    path, n = folder / f"{base}.json", 2
    while path.exists():
        path, n = folder / f"{base}-{n}.json", n + 1
    return path


def save_chat(folder: Path, session: Session, path: Path | None = None) -> Path:
    """Write the chat to `path` (a new file in `folder` when None), atomically; SessionError on failure."""
    return save_session(path or new_chat_path(folder, session), session)


def rename_chat(path: Path, title: str) -> Session:
    """Give a saved chat a title (empty: it is listed under its first question again). Its time
    stays: a name is not a change of the conversation (the list's order, `--continue`)."""
    session = load_session(path)
    session.title = " ".join(title.split()) or None
    times = path.stat()
    save_session(path, session)
    try:
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    except OSError:
        pass
    return session


def delete_chat(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SessionError(f"cannot delete {path}: {exc.strerror or exc}") from None


def resolve(name: str, folder: Path) -> Path:
    """A session file as given, else a saved chat of that file name (`influence chats` lists them;
    `.json` may be left out)."""
    path = Path(name).expanduser()
    if path.exists() or path.name != name:  # there, or a path with folders: as given
        return path
    for candidate in (folder / name, folder / f"{name}.json"):
        if candidate.is_file():
            return candidate
    return path


def in_folder(path: Path, folder: Path) -> bool:
    """Whether `path` is a chat of `folder` (so that opening it goes on saving there)."""
    try:
        return path.resolve().parent == folder.resolve()
    except OSError:
        return False


def model_name(model: str | None) -> str:
    """A recorded model path as a short name (its file or folder, without `.gguf`)."""
    if not model:
        return "model not recorded"
    name = Path(model).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def ago(modified: float, now: float | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', 'yesterday', 'Dec 3', '2025-11-02'."""
    now = time.time() if now is None else now
    seconds = max(now - modified, 0)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    then, today = datetime.fromtimestamp(modified), datetime.fromtimestamp(now)
    if then.date() == today.date():
        return f"{int(seconds // 3600)} h ago"
    if (today.date() - then.date()).days == 1:
        return "yesterday"
    if then.year == today.year:
        return f"{then:%b} {then.day}"
    return f"{then:%Y-%m-%d}"
