"""The chat's state, apart from its widgets: turns, system prompt, and the session file mapping.

Kept on the app (not the Chat screen) so that `--save-on-exit` can save it however the app ends,
and so that tests can check it without reading widgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from influence_tui.sessions import Session, SessionMessage

if TYPE_CHECKING:
    from influence_tui.config import Settings

# The session keys of the original tool that are generation settings.
SESSION_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty")


@dataclass
class Conversation:
    system_prompt: str | None = None
    messages: list[SessionMessage] = field(default_factory=list)
    created_at: str | None = None
    title: str | None = None  # the name the user gave it in the Chats list (None: its first question)
    # turns taken back by /edit: still in the saved chat until a new message replaces them (an
    # edit given up, by a new chat or quitting, loses nothing), never sent to the model
    held: list[SessionMessage] = field(default_factory=list)

    def add(self, role: str, content: str, stopped: bool = False, thinking: str = "") -> SessionMessage:
        message = SessionMessage(role, content, stopped=stopped, thinking=thinking)
        self.messages.append(message)
        self.held.clear()  # what /edit took back is replaced now
        return message

    def take_back(self, index: int) -> SessionMessage:
        """/edit: the messages from `index` on leave the conversation (held until a new message);
        the first of them (a question) is returned, for the prompt."""
        taken, self.messages[index:] = self.messages[index:], []
        self.held[:0] = taken
        return taken[0]

    def kept_messages(self) -> list[SessionMessage]:
        """What the saved chat holds: the conversation and what /edit holds back."""
        return self.messages + self.held

    def fingerprint(self) -> int:
        """Changes whenever what a saved chat holds changes (so an unchanged chat is not rewritten:
        its file's time is when it last changed, and the Chats list sorts by it)."""
        return hash((self.system_prompt, self.title,
                     tuple((m.role, m.content, m.stopped, m.thinking) for m in self.kept_messages())))

    def engine_messages(self) -> list[Any]:
        """The turns as the model gets them: answers without their reasoning (as reasoning
        models' own templates strip it; resent, it would fill the context for nothing)."""
        from influence_tui.engine.types import ChatMessage  # no torch: types only

        return [ChatMessage(m.role, m.content) for m in self.messages if m.role in ("user", "assistant")]

    def last(self, role: str) -> SessionMessage | None:
        return next((m for m in reversed(self.messages) if m.role == role), None)

    def to_session(self, settings: "Settings", model_path: str | None) -> Session:
        session = Session(model_path=model_path, system_prompt=self.system_prompt, messages=self.kept_messages())
        for name in SESSION_PARAMS:
            setattr(session, name, getattr(settings, name))
        if self.created_at:
            session.created_at = self.created_at
        session.title = self.title
        return session

    @classmethod
    def from_session(cls, session: Session) -> "Conversation":
        # A system message inside the list (some files carry one) becomes the system prompt.
        system = session.system_prompt
        messages = []
        for m in session.messages:
            if m.role == "system":
                system = system or m.content
            else:
                messages.append(m)
        return cls(system_prompt=system, messages=messages, created_at=session.created_at, title=session.title)


def apply_session_params(settings: "Settings", session: Session) -> list[str]:
    """Copy the session's generation settings (those it has) onto the in-memory settings."""
    from influence_tui.params import ParamError, coerce

    changed = []
    for name in SESSION_PARAMS:
        value = getattr(session, name)
        if value is None:
            continue
        try:
            value = coerce(name, value)
        except ParamError:
            continue  # an out-of-range value in an old file: keep ours rather than refuse the chat
        setattr(settings, name, value)
        changed.append(name)
    return changed
