"""The Library screen: the models of `influence list`, details, load for chat, delete, refresh.

Scanning reads headers only but may touch many files, so it runs in a thread worker; the list is
rescanned whenever the screen is shown (a finished download appears without a key press).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual import work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from influence_tui.library import human_params, human_size
from influence_tui.tui.screens.confirm_delete import ConfirmDelete
from influence_tui.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp

COLUMNS = ("", "name", "format", "quant", "params", "size", "source", "status")


def model_details(m: Any, loaded: bool) -> Text:
    # names, paths and reasons come from the disk: plain Text, never parsed as markup
    text = Text.assemble((m.name, "bold"), ("  ● loaded for chat", "green") if loaded else "")
    for line in (f"format        {m.format:<14}  architecture  {m.architecture}",
                 f"quantization  {m.quantization:<14}  parameters    {human_params(m.parameters)}",
                 f"context       {str(m.context_length or '?'):<14}  size          {human_size(m.size_bytes)} in {m.file_count} file(s)",
                 f"kind          {m.kind:<14}  source        {m.source}",
                 f"capabilities  {', '.join(m.capabilities) or '?'}",
                 f"path          {m.path}"):
        text.append("\n" + line)
    if not m.usable:
        text.append(f"\n\nunusable: {m.reason}", style="red")
    return text


class LibraryScreen(Screen[None]):
    BINDINGS = [
        Binding("enter,l", "load", "Load for chat"),
        Binding("d,delete", "delete", "Delete"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__(id="library")
        self.models: list[Any] = []

    @property
    def influence(self) -> "InfluenceApp":
        return cast("InfluenceApp", self.app)

    def compose(self) -> Any:
        yield StatusBar("Library")
        table: DataTable[str] = DataTable(id="library-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static("Scanning…", id="library-detail")
        yield Footer()

    def palette_commands(self) -> list[SystemCommand]:
        return [
            SystemCommand("Load model", "Load the selected model for chat (l)", self.action_load),
            SystemCommand("Delete model", "Delete the selected model from the disk (d)", self.action_delete),
            SystemCommand("Refresh library", "Scan the model folders again (r)", self.action_refresh),
        ]

    def on_screen_resume(self) -> None:
        self.action_refresh()
        self.query_one("#library-table", DataTable).focus()

    def action_refresh(self) -> None:
        self._scan()

    @work(thread=True, exclusive=True, group="library-scan")
    def _scan(self) -> None:
        try:
            models = self.influence.models()
        except Exception as exc:  # noqa: BLE001 - a bad models folder is a notification
            self.app.call_from_thread(self.app.notify, f"cannot list models: {exc}", severity="error")
            return
        self.app.call_from_thread(self._show, models)

    def _show(self, models: list[Any]) -> None:
        self.models = models
        table = self.query_one("#library-table", DataTable)
        keep = table.cursor_row
        table.clear()
        for m in models:
            mark = "●" if self.influence.is_loaded(m.path) else ""
            status = "ok" if m.usable else "unusable"
            table.add_row(mark, Text(m.name), m.format, Text(m.quantization), human_params(m.parameters),
                          human_size(m.size_bytes), m.source, status, key=m.path)
        if models:
            table.move_cursor(row=min(keep, len(models) - 1))
            self._detail(min(keep, len(models) - 1))
        else:
            self.query_one("#library-detail", Static).update(
                f"No models yet.\n\nFind one on the Hub (F3); downloads go to {self.influence.settings.output_dir}.")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail(event.cursor_row)

    def _detail(self, row: int) -> None:
        if 0 <= row < len(self.models):
            m = self.models[row]
            self.query_one("#library-detail", Static).update(model_details(m, self.influence.is_loaded(m.path)))

    def selected(self) -> Any:
        row = self.query_one("#library-table", DataTable).cursor_row
        return self.models[row] if 0 <= row < len(self.models) else None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_load()

    def action_load(self) -> None:
        m = self.selected()
        if m is None:
            return
        if not m.usable:
            self.app.notify(f"{m.name} cannot be used: {m.reason}", severity="error")
            return
        if m.kind != "chat":
            self.app.notify(f"{m.name} is an embedding model: it serves /api/embed, not chat", severity="warning")
            return
        if not self.influence.switch_model(m.path):
            return
        self.app.notify(f"Loading {m.name} for chat…")
        self.watch(self.app, "model_state", self._after_load, init=False)

    def _after_load(self, state: str) -> None:
        if state in ("ready", "error"):
            self.action_refresh()

    def action_delete(self) -> None:
        m = self.selected()
        if m is None:
            return
        if m.source != "models":
            where = {"bundled": "bundled with the app", "ollama": "Ollama's (use `ollama rm` to remove it)",
                     "lmstudio": "LM Studio's (remove it there)"}.get(m.source, "in the Hugging Face cache (use `hf cache` to remove it)")
            self.app.notify(f"{m.name} is {where}; only models in {self.influence.settings.output_dir} are deleted here",
                            severity="warning")
            return
        if self.influence.is_loaded(m.path):
            self.app.notify(f"{m.name} is loaded for chat; load another model first", severity="warning")
            return

        def done(confirmed: bool | None) -> None:
            if confirmed:
                self._delete(m)

        self.app.push_screen(ConfirmDelete(m.name, m.path, human_size(m.size_bytes)), done)

    @work(thread=True, group="library-delete")
    def _delete(self, m: Any) -> None:
        path = Path(m.path)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
                _remove_empty_parent(path.parent, Path(self.influence.settings.output_dir))
        except OSError as exc:
            self.app.call_from_thread(self.app.notify, f"cannot delete {m.name}: {exc.strerror or exc}", severity="error")
            return
        self.app.call_from_thread(self.app.notify, f"Deleted {m.name}")
        self.app.call_from_thread(self.action_refresh)


def _remove_empty_parent(folder: Path, root: Path) -> None:
    # A loose .gguf in org_name/: remove the folder too once it is empty, never the root itself.
    try:
        if folder.resolve() != root.expanduser().resolve() and not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass
