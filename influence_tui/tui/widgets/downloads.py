"""One row of the Hub's download queue: name, progress bar, bytes, speed, time left, cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, ProgressBar, Static

from influence_tui.library import human_size


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def describe(p: Any) -> str:
    """bytes done / total · speed · time left · file k of n."""
    parts = [f"{human_size(p.total_done)} / {human_size(p.total_bytes)}"]
    if p.status == "downloading":
        parts += [f"{human_size(p.speed_bps)}/s", f"{_eta(p.eta_s)} left"]
    elif p.status not in ("done", "file_done"):
        parts.append(p.message or p.status)
    parts.append(f"file {min(p.files_done + 1, p.files_total)}/{p.files_total}")
    return " · ".join(parts)


class DownloadRow(Vertical):
    @dataclass
    class Progress(Message):
        row: "DownloadRow"
        progress: Any

    @dataclass
    class Finished(Message):
        row: "DownloadRow"
        outcome: str  # done | failed | cancelled
        detail: str

    @dataclass
    class CancelRequested(Message):
        row: "DownloadRow"

    def __init__(self, repo_id: str, quant: str | None) -> None:
        super().__init__(classes="download")
        self.repo_id = repo_id
        self.quant = quant
        self.finished = False
        self.outcome: str | None = None
        self.last: Any = None

    def compose(self) -> Any:
        with Horizontal(classes="download-head"):
            yield Static(f"[b]{self.repo_id}[/b]" + (f" {self.quant}" if self.quant else ""), classes="download-name")
            yield Button("Cancel", classes="download-cancel", compact=True)
        yield ProgressBar(total=None, show_eta=False, classes="download-bar")
        yield Static("waiting…", classes="download-info", markup=False)  # Hub errors ("[Errno 2] …") as they are

    def set_queued(self, ahead: int) -> None:
        self.query_one(".download-info", Static).update("queued" + (f" ({ahead} ahead)" if ahead else ""))

    def progress_from_thread(self, progress: Any) -> None:
        """The hub's progress callback: runs in the download thread, so only posts a message."""
        self.post_message(self.Progress(self, progress))

    def on_download_row_progress(self, event: "DownloadRow.Progress") -> None:
        event.stop()
        if self.finished:
            return
        p = event.progress
        self.last = p
        bar = self.query_one(ProgressBar)
        if p.total_bytes:
            bar.update(total=p.total_bytes, progress=p.total_done)
        self.query_one(".download-info", Static).update(describe(p))

    def on_download_row_finished(self, event: "DownloadRow.Finished") -> None:
        self.finish(event.outcome, event.detail)

    def finish(self, outcome: str, detail: str) -> None:
        self.finished = True
        self.outcome = outcome
        bar = self.query_one(ProgressBar)
        if outcome == "done":
            total = bar.total or 1
            bar.update(total=total, progress=total)
        self.add_class(outcome)
        mark = {"done": "✓", "failed": "✗", "cancelled": "⏹"}.get(outcome, "")
        self.query_one(".download-info", Static).update(f"{mark} {detail}")
        self.query_one(".download-cancel", Button).disabled = True

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.CancelRequested(self))
