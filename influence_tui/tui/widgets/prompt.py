"""The chat prompt: a TextArea that grows with its text; Enter sends, ctrl+j / alt+enter add a line.

Most terminals send the same bytes for Shift+Enter and Enter, so the newline key is ctrl+j (sent as
a line feed everywhere) or alt+enter; shift+enter works too where the terminal reports it.
Typing `/` shows the matching slash commands; Tab completes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea

from influence_tui.tui import slash

NEWLINE_KEYS = ("ctrl+j", "alt+enter", "shift+enter", "ctrl+enter")


class PromptInput(TextArea):
    BINDINGS = [
        Binding("enter", "submit", "Send", priority=True),
        Binding("ctrl+j", "newline", "Newline", key_display="^j/alt+⏎"),
        Binding("tab", "complete", "Complete /command", show=False),
    ]

    @dataclass
    class Submitted(Message):
        prompt: "PromptInput"
        text: str

    @dataclass
    class Hint(Message):
        """The slash-command matches for what is typed ([] hides the hint)."""

        matches: list[str]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", compact=True, **kwargs)  # type: ignore[arg-type]
        self.sent: list[str] = []

    async def _on_key(self, event: events.Key) -> None:
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")

    def action_submit(self) -> None:
        text = self.text
        if not text.strip():
            return
        word = text.strip()
        if word.startswith("/") and " " not in word:  # `/se` that the hint showed as `/set` only: run it
            matches = slash.complete(word)
            # never for what cannot be undone (quitting, clearing, replacing the last answer)
            if len(matches) == 1 and matches[0].rstrip() not in ("/quit", "/exit", "/clear", "/retry"):
                text = matches[0].rstrip()
        self.sent.append(text)
        self.clear()
        self.post_message(self.Submitted(self, text))

    def action_complete(self) -> None:
        if not self.text.startswith("/"):  # nothing to complete: Tab moves on (an empty prompt typed "/")
            self.screen.focus_next()
            return
        matches = slash.complete(self.text)
        if len(matches) == 1:
            value = matches[0] if matches[0].endswith(" ") else matches[0] + " "
            self.text = value
            self.move_cursor(self.document.end)
        elif matches:
            common = _common_prefix(matches)
            if len(common) > len(self.text.strip()):
                self.text = common
                self.move_cursor(self.document.end)
        else:
            self.screen.focus_next()

    def _on_text_area_changed(self, event: TextArea.Changed) -> None:
        text = self.text
        matches = slash.complete(text) if text.startswith("/") and "\n" not in text else []
        self.post_message(self.Hint(matches))


def _common_prefix(words: list[str]) -> str:
    first, last = min(words), max(words)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]
