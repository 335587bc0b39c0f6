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

A reasoning model's reasoning streams the same way into a `ThinkingSection` above the answer: a
Collapsible, open while the model thinks, folded ("Thought for 2.1 s") once the answer begins.
Answers without reasoning get no section at all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Collapsible, Markdown, Static

FLUSH_HZ = 10
THINKING_TITLE = "Thinking…"


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


def thought_title(seconds: float | None) -> str:
    """The folded section's title: how long the model thought, when this run saw it think."""
    return "Thought" if seconds is None else f"Thought for {seconds:.1f} s"


class ThinkingSection(Collapsible):
    """A reasoning model's reasoning, dim, foldable; the user opens it with a click or Enter.

    Folded, its markdown is parsed only when first opened: a session of 50 answers with long
    reasoning took 14 s to mount when every folded section parsed its text (0.5 s without)."""

    def __init__(self, text: str = "", collapsed: bool = True, title: str = THINKING_TITLE) -> None:
        self.source = text  # the whole reasoning, whether or not the body shows it yet
        self._stale = collapsed and bool(text)  # the body is behind `source` (drawn on opening)
        self.body = Markdown("" if self._stale else text, classes="thinking-body")
        self._folding = False  # the app folds it, not the user (set before the watcher can run)
        self.folded = collapsed  # folded by the app once: the user's own toggles are theirs
        super().__init__(self.body, title=title, collapsed=collapsed, classes="thinking")

    async def set_source(self, text: str) -> None:
        """The whole reasoning (an answer's end): parsed now if open, else when opened."""
        self.source = text
        if self.collapsed:
            self._stale = True
        else:
            self._stale = False
            await self.body.update(text)

    async def _render_source(self) -> None:
        if self._stale:
            self._stale = False
            await self.body.update(self.source)

    def fold(self, title: str) -> None:
        """Close it and retitle it without moving the view (see `_watch_collapsed`)."""
        self.title, self.folded = title, True
        self._folding = True
        try:
            self.collapsed = True
        finally:
            self._folding = False

    def _watch_collapsed(self, collapsed: bool) -> None:
        if not collapsed and self._stale:
            self.call_next(self._render_source)
        # Collapsible scrolls itself into view on every toggle: right for the user's own click,
        # wrong when the answer's start folds it while they read further up the conversation.
        if not self._folding:
            super()._watch_collapsed(collapsed)
            return
        self._update_collapsed(collapsed)
        self.post_message(self.Collapsed(self))


class AssistantMessage(Vertical):
    """An answer: (a reasoning model's folded reasoning,) streamed markdown, a statistics line."""

    def __init__(self, text: str = "", model: str = "", stopped: bool = False, thinking: str = "") -> None:
        super().__init__(classes="message assistant")
        self.text = text
        self.thinking = thinking
        self.model = model
        self.stopped = stopped
        self.finished = bool(text or thinking)
        self.finish_reason: str | None = None
        self._pending: list[str] = []
        self._pending_thinking: list[str] = []
        self._streaming = False
        self._timer: Timer | None = None
        # the timer's flush and finish()'s (another task) must not append or mount at once
        self._flush_lock = asyncio.Lock()
        self._body = Markdown(self.text, classes="body")
        self._section: ThinkingSection | None = None
        if thinking:  # from a session: folded, as after a live answer (open if it is all there is)
            self._section = ThinkingSection(thinking, collapsed=bool(text), title=thought_title(None))
        self._thinking_since: float | None = None
        self.thought_s: float | None = None  # set once the answer starts (or ends) after reasoning
        self.writes = 0  # stream writes so far: more than one means the answer was shown as it grew

    def compose(self) -> Any:
        yield Static(self.model or "Assistant", classes="role", markup=False)
        if self._section is not None:
            yield self._section
        yield self._body
        yield Static(self._history_stats(), classes="stats", markup=False)  # may carry an error message

    def _history_stats(self) -> str:
        return "⏹ stopped: partial answer" if self.stopped else ""

    @property
    def markdown(self) -> Markdown:
        """The answer's markdown (the reasoning has its own, in `thinking_section`)."""
        return self._body

    @property
    def thinking_section(self) -> ThinkingSection | None:
        return self._section

    @property
    def stats(self) -> Static:
        return self.query_one(".stats", Static)

    def set_status(self, text: str) -> None:
        self.stats.update(text)

    def start(self) -> None:
        """Begin streaming: start the flush timer."""
        self._streaming = True
        self._timer = self.set_interval(1 / FLUSH_HZ, self._flush)

    def feed(self, text: str, thinking: str = "") -> None:
        """Queue new answer text and reasoning (called per token; cheap: the timer writes them
        out, the first of each at once so that the section opens and folds without delay)."""
        first = False
        if thinking:
            if not self.thinking:
                first, self._thinking_since = True, time.monotonic()
            self.thinking += thinking
            self._pending_thinking.append(thinking)
        if text:
            first = first or not self.text
            if not self.text and self._thinking_since is not None:
                self.thought_s = time.monotonic() - self._thinking_since
            self.text += text
            self._pending.append(text)
        if first:
            self.call_next(self._flush)

    async def _flush(self) -> None:
        async with self._flush_lock:
            if not self._streaming or not (self._pending or self._pending_thinking):
                return
            thinking, chunk = "".join(self._pending_thinking), "".join(self._pending)
            self._pending_thinking.clear()
            self._pending.clear()
            self.writes += 1
            with self.app.batch_update():  # the block's update and any new blocks: one frame
                if thinking:
                    await self._write_thinking(thinking)
                if chunk:
                    self._fold_thinking()
                    await self.markdown.append(chunk)

    async def _write_thinking(self, chunk: str) -> None:
        if self._section is None:  # the first reasoning: the section opens above the answer
            self._section = ThinkingSection(collapsed=False)
            await self.mount(self._section, before=self._body)
        self._section.source += chunk
        await self._section.body.append(chunk)

    def _fold_thinking(self, fold: bool = True) -> None:
        """Title the section with the time spent thinking, and fold it (`fold`: an answer came;
        an answer that is all reasoning, cut off or stopped, stays open: it is all there is)."""
        section = self._section
        if section is None or section.folded:
            return  # no reasoning, or folded already
        if self.thought_s is None and self._thinking_since is not None:  # ended while still thinking
            self.thought_s = time.monotonic() - self._thinking_since
        if fold:
            section.fold(thought_title(self.thought_s))
        else:
            section.title = thought_title(self.thought_s)

    async def finish(self, stats: str, stopped: bool = False, error: str | None = None) -> None:
        """Stop streaming, render the full text once, and show the statistics."""
        if self._timer is not None:
            self._timer.stop()
        await self._flush()
        self._streaming = False
        self.stopped = stopped
        self.finished = True
        self._fold_thinking(fold=bool(self.text))
        if self._section is not None:
            await self._section.set_source(self.thinking)
        await self.markdown.update(self.text)
        if error:
            self.add_class("error")
        if stopped:
            self.add_class("stopped")
        self.stats.update(stats)
