"""Chat message bubbles: a user turn, an assistant answer that streams, and notes from the app.

The answer streams as markdown: the first text is written as soon as it comes, then tokens are
coalesced and appended `FLUSH_HZ` times a second with `Markdown.append` (which parses only the
last block and what follows), and the finished text is rendered once more with `update()` so that
code fences closed late render right (oterm #308). Each write re-lays out and redraws the
conversation (10-35 ms of the app's thread, more as it grows), CPU the model's threads want too:
at 20 writes a second answers came 30-50% slower than from the engine alone, at 10 about 10-40%,
more with a longer conversation on screen (2 cores, 256 tokens). Each append runs inside
`batch_update()`, so the last block's update and the new blocks' mounts reach the screen in one
frame: through `MarkdownStream` (whose task appends after the write returns) a write cost ~1.5
frames of ~20 ms, here ~1.2 of ~14 ms, and answers came 6-16% faster (3 alternated pairs of 6
answers, 2 cores).
"""

from __future__ import annotations

from typing import Any

from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Markdown, Static

FLUSH_HZ = 10


class UserMessage(Vertical):
    def __init__(self, text: str) -> None:
        super().__init__(classes="message user")
        self.text = text

    def compose(self) -> Any:
        yield Static("You", classes="role")
        yield Markdown(self.text, classes="body")


class NoteMessage(Vertical):
    """Output of slash commands and app notices, shown in the chat but never sent to the model."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(classes=f"message note {kind}")
        self.text = text

    def compose(self) -> Any:
        yield Markdown(self.text, classes="body")


class AssistantMessage(Vertical):
    """An answer: streamed markdown plus a statistics line under it."""

    def __init__(self, text: str = "", model: str = "", stopped: bool = False) -> None:
        super().__init__(classes="message assistant")
        self.text = text
        self.model = model
        self.stopped = stopped
        self.finished = bool(text)
        self.finish_reason: str | None = None
        self._pending: list[str] = []
        self._streaming = False
        self._timer: Timer | None = None
        self.writes = 0  # stream writes so far: more than one means the answer was shown as it grew

    def compose(self) -> Any:
        yield Static(self.model or "Assistant", classes="role", markup=False)
        yield Markdown(self.text, classes="body")
        yield Static(self._history_stats(), classes="stats", markup=False)  # may carry an error message

    def _history_stats(self) -> str:
        return "⏹ stopped: partial answer" if self.stopped else ""

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    @property
    def stats(self) -> Static:
        return self.query_one(".stats", Static)

    def set_status(self, text: str) -> None:
        self.stats.update(text)

    def start(self) -> None:
        """Begin streaming: start the flush timer."""
        self._streaming = True
        self._timer = self.set_interval(1 / FLUSH_HZ, self._flush)

    def feed(self, text: str) -> None:
        """Queue new text (called per token; cheap: the timer writes it out, the first at once)."""
        if text:
            first = not self.text
            self.text += text
            self._pending.append(text)
            if first:
                self.call_next(self._flush)

    async def _flush(self) -> None:
        if self._pending and self._streaming:
            chunk = "".join(self._pending)
            self._pending.clear()
            self.writes += 1
            with self.app.batch_update():  # the block's update and any new blocks: one frame
                await self.markdown.append(chunk)

    async def finish(self, stats: str, stopped: bool = False, error: str | None = None) -> None:
        """Stop streaming, render the full text once, and show the statistics."""
        if self._timer is not None:
            self._timer.stop()
        await self._flush()
        self._streaming = False
        self.stopped = stopped
        self.finished = True
        await self.markdown.update(self.text)
        if error:
            self.add_class("error")
        if stopped:
            self.add_class("stopped")
        self.stats.update(stats)
