"""The chat prompt: a TextArea that grows with its text; Enter sends, ctrl+j / alt+enter add a line.

Most terminals send the same bytes for Shift+Enter and Enter, so the newline key is ctrl+j (sent as
a line feed everywhere) or alt+enter; shift+enter works too where the terminal reports it.
Typing `/` shows the matching slash commands; Tab completes them. Up on the first line brings back
what was sent before (messages and commands, as a shell's history), Down on the last line goes
forward again and then back to what was being typed.
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
        Binding("up", "back", "Earlier messages sent (on the first line)", show=False),
        Binding("down", "forward", "Later messages sent (on the last line)", show=False),
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
        self._recalled: int | None = None  # the index in `sent` shown, while going through it
        self._draft = ""  # what was typed before going back

    async def _on_key(self, event: events.Key) -> None:
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_back(self) -> None:
        if not self._recall(-1):
            self.action_cursor_up()

    def action_forward(self) -> None:
        if not self._recall(1):
            self.action_cursor_down()

    def _recall(self, step: int) -> bool:
        """Up on the first line / Down on the last: the previous / next text sent (False: the key
        moves the cursor as usual)."""
        # (the first / last row as shown: a long line wraps over several)
        first, last = self.navigator.is_first_wrapped_line(self.cursor_location), self.navigator.is_last_wrapped_line(self.cursor_location)
        if not self.sent or (step < 0 and not first) or (step > 0 and (not last or self._recalled is None)):
            return False
        if self._recalled is None:
            self._draft, self._recalled = self.text, len(self.sent)
        index = self._recalled + step
        if index < 0:
            return True  # the oldest: stay
        self._recalled = index if index < len(self.sent) else None
        self.text = self.sent[index] if self._recalled is not None else self._draft
        self.move_cursor(self.document.end)
        return True

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
        if not self.sent or self.sent[-1] != text:  # (a text sent twice in a row is recalled once)
            self.sent.append(text)
        self._recalled = None
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
        if self._recalled is not None and text != self.sent[self._recalled]:
            self._recalled = None  # edited: it is now what is being typed (Down will not replace it)
        matches = slash.complete(text) if text.startswith("/") and "\n" not in text else []
        self.post_message(self.Hint(matches))


def _common_prefix(words: list[str]) -> str:
    first, last = min(words), max(words)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]
