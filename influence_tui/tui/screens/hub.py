"""The Hub screen: search, results, a repo's files and quantizations, queued downloads.

Network calls run in thread workers. Downloads run one at a time from a queue in one thread
worker; each reports progress with `post_message` (thread-safe, never waits on the UI) and has its
own cancel event. A finished model is in the models folder, which the Library rescans on show.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from textual import work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from rich.text import Text
from textual.widgets import Button, DataTable, Footer, Input, Select, Static

from influence_tui.library import human_size
from influence_tui.tui.widgets.downloads import DownloadRow
from influence_tui.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp

RESULT_COLUMNS = ("repo", "downloads", "likes", "updated", "formats")
AUTO = "auto"
AUTO_LABEL = "quant: auto (Q4_K_M or nearest)"


@dataclass
class DownloadJob:
    repo_id: str
    quant: str | None
    row: DownloadRow
    cancel: threading.Event = field(default_factory=threading.Event)


def _count(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class HubScreen(Screen[None]):
    BINDINGS = [
        Binding("ctrl+f", "focus_search", "Search", show=False),
        # priority: the search box has focus on arrival, and its own ctrl+d / ctrl+x (delete, cut) won
        Binding("ctrl+d", "download", "Download", priority=True),
        Binding("ctrl+x", "cancel_download", "Cancel download", key_display="^x", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__(id="hub")
        self.results: list[Any] = []
        self.listing: Any = None
        self.queue: deque[DownloadJob] = deque()
        self.jobs: list[DownloadJob] = []
        self._queue_running = False
        self._queue_lock = threading.Lock()

    @property
    def influence(self) -> "InfluenceApp":
        return cast("InfluenceApp", self.app)

    def compose(self) -> Any:
        yield StatusBar("Hub")
        yield Input(placeholder="Search models on the Hub (Enter), e.g. smollm gguf", id="hub-search")
        results: DataTable[str] = DataTable(id="hub-results", cursor_type="row", zebra_stripes=True)
        results.add_columns(*RESULT_COLUMNS)
        yield results
        with Horizontal(id="hub-detail"):
            with Vertical(id="hub-side"):
                yield Static("Search, then pick a result to see its files.", id="hub-repo")
                yield Select([(AUTO_LABEL, AUTO)], value=AUTO, allow_blank=False, id="hub-quant", compact=True)
                yield Button("Download (ctrl+d)", id="hub-download", variant="primary", disabled=True, compact=True)
            files: DataTable[str] = DataTable(id="hub-files", cursor_type="row")
            files.add_columns("file", "size", "quant")
            yield files
        yield Static("Downloads", id="hub-downloads-title")
        yield VerticalScroll(id="hub-downloads")
        yield Footer()

    def palette_commands(self) -> list[SystemCommand]:
        return [
            SystemCommand("Search the Hub", "Focus the search box (ctrl+f)", self.action_focus_search),
            SystemCommand("Download", "Download the selected repo (ctrl+d)", self.action_download),
            SystemCommand("Cancel download", "Cancel the running or first queued download (ctrl+x)", self.action_cancel_download),
        ]

    def on_mount(self) -> None:
        self.query_one("#hub-search", Input).focus()

    def action_focus_search(self) -> None:
        self.query_one("#hub-search", Input).focus()

    @property
    def hub(self) -> Any:
        """The Hub client module (the snapshot app swaps in a canned one)."""
        return self.influence.hub_client()

    def _endpoint(self) -> str:
        return self.hub.resolve_endpoint(self.influence.settings.mirror)

    # -- search ----------------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "hub-search":
            self.query_one("#hub-repo", Static).update(Text(f"Searching for {event.value!r}…"))
            self._search(event.value.strip())

    @work(thread=True, exclusive=True, group="hub-search")
    def _search(self, query: str) -> None:
        try:
            results = self.hub.search_models(query, limit=30, endpoint=self._endpoint())
        except self.hub.HubError as exc:
            self.app.call_from_thread(self._failed, "Search failed", str(exc))
            return
        self.app.call_from_thread(self._show_results, query, results)

    def _failed(self, title: str, message: str) -> None:
        self.query_one("#hub-repo", Static).update(Text(message, style="red"))
        self.app.notify(message, title=title, severity="error", timeout=10)

    def _show_results(self, query: str, results: list[Any]) -> None:
        self.results = results
        table = self.query_one("#hub-results", DataTable)
        table.clear()
        for m in results:
            updated = m.last_modified.strftime("%Y-%m-%d") if m.last_modified else ""
            table.add_row(Text(m.repo_id), _count(m.downloads), _count(m.likes), updated, ", ".join(sorted(m.formats)), key=m.repo_id)
        found = f"{len(results)} models for {query!r}" if results else f"Nothing found for {query!r}"
        self.query_one("#hub-repo", Static).update(Text(found + (": pick one (↑/↓) to see its files" if results else "")))
        if results:
            table.focus()

    # -- detail ----------------------------------------------------------------------------------
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "hub-results" and 0 <= event.cursor_row < len(self.results):
            repo = self.results[event.cursor_row].repo_id
            self.query_one("#hub-repo", Static).update(Text.assemble((repo, "bold"), ": reading files…"))
            self._files(repo)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "hub-results":
            self.query_one("#hub-quant", Select).focus()

    @work(thread=True, exclusive=True, group="hub-files")
    def _files(self, repo_id: str) -> None:
        try:
            listing = self.hub.repo_files(repo_id, endpoint=self._endpoint())
        except self.hub.HubError as exc:
            self.app.call_from_thread(self._failed, "Cannot list files", str(exc))
            return
        self.app.call_from_thread(self._show_files, listing)

    def _show_files(self, listing: Any) -> None:
        gguf_quant = self.hub.gguf_quant
        self.listing = listing
        table = self.query_one("#hub-files", DataTable)
        table.clear()
        for e in sorted(listing.files, key=lambda e: e.path):
            table.add_row(Text(e.path), human_size(e.size), Text(gguf_quant(e.path) or ""))
        quants = sorted(listing.quants)
        select = self.query_one("#hub-quant", Select)
        select.set_options([(AUTO_LABEL if quants else "all model files", AUTO)] + [(f"{q} ({human_size(sum(e.size for e in listing.quants[q]))})", q) for q in quants])
        select.value = AUTO
        total = human_size(sum(e.size for e in listing.files))
        kinds = f"{len(quants)} GGUF quantization(s)" if quants else "safetensors / other files"
        self.query_one("#hub-repo", Static).update(
            Text.assemble((listing.repo_id, "bold"), f" · {len(listing.files)} files · {total} · {kinds}"))
        self.query_one("#hub-download", Button).disabled = False

    # -- downloads -------------------------------------------------------------------------------
    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "hub-download":
            self.action_download()

    def on_download_row_cancel_requested(self, event: DownloadRow.CancelRequested) -> None:
        for job in self.jobs:
            if job.row is event.row:
                self._cancel(job)

    async def action_download(self) -> None:
        if self.listing is None:
            self.app.notify("Pick a search result first", severity="warning")
            return
        value = self.query_one("#hub-quant", Select).value
        quant = None if value in (AUTO, Select.BLANK) else str(value)
        repo = self.listing.repo_id
        if any(j.repo_id == repo and not j.row.finished for j in self.jobs):
            self.app.notify(f"{repo} is already in the download queue", severity="warning")
            return
        row = DownloadRow(repo, quant)
        await self.query_one("#hub-downloads", VerticalScroll).mount(row)
        job = DownloadJob(repo, quant, row)
        self.jobs.append(job)
        with self._queue_lock:  # the worker may be deciding to stop right now
            self.queue.append(job)
            start = not self._queue_running
            self._queue_running = True
        row.set_queued(len(self.queue) - 1 if start else len(self.queue))
        if start:
            self._run_queue()

    def action_cancel_download(self) -> None:
        active = [j for j in self.jobs if not j.row.finished]
        if not active:
            self.app.notify("No download to cancel")
            return
        focused = self.app.focused
        job = next((j for j in active if focused is not None and focused in j.row.walk_children()), active[0])
        self._cancel(job)

    def _cancel(self, job: DownloadJob) -> None:
        job.cancel.set()
        with self._queue_lock:
            queued = job in self.queue
            if queued:  # not started yet: just take it out
                self.queue.remove(job)
        if queued:
            job.row.finish("cancelled", "cancelled before it started")

    @work(thread=True, group="hub-downloads")
    def _run_queue(self) -> None:
        while True:
            with self._queue_lock:
                if not self.queue:
                    self._queue_running = False
                    return
                job = self.queue.popleft()
            try:
                self._download(job)
            except Exception as exc:  # noqa: BLE001 - one bad job must not stall the queue
                job.row.post_message(DownloadRow.Finished(job.row, "failed", str(exc)))

    def _download(self, job: DownloadJob) -> None:
        hub = self.hub
        row = job.row
        try:
            folder = hub.download_model(job.repo_id, self.influence.settings.output_dir, quant=job.quant,
                                    endpoint=self._endpoint(), progress=row.progress_from_thread, cancel=job.cancel)
        except hub.DownloadCancelled:
            row.post_message(DownloadRow.Finished(row, "cancelled", "cancelled: the next download resumes it"))
        except (hub.HubError, OSError) as exc:
            row.post_message(DownloadRow.Finished(row, "failed", str(exc)))
            self.app.call_from_thread(self.app.notify, str(exc), title=f"Download of {job.repo_id} failed",
                                      severity="error", timeout=10)
        else:
            row.post_message(DownloadRow.Finished(row, "done", f"saved in {folder}"))
            self.app.call_from_thread(self.app.notify, f"{job.repo_id} is in the Library (F4)", title="Downloaded")
