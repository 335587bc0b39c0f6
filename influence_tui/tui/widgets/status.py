"""The bar at the top of every screen: the model's state and the API server switch with its URL
and request count. It reads the app's state twice a second (cheap: no engine calls that block)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.containers import Horizontal
from textual.widgets import Label, Static, Switch

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp


class StatusBar(Horizontal):
    def __init__(self, screen_title: str) -> None:
        super().__init__(classes="status-bar")
        self.screen_title = screen_title
        self._shown: dict[str, str] = {}  # selector -> the text it shows

    def compose(self) -> Any:
        yield Static(f"Influence · {self.screen_title}", classes="status-title")
        yield Static("", classes="model-status", markup=False)  # model names and errors, shown as they are
        yield Label("API", classes="server-label")
        yield Switch(False, classes="server-switch", tooltip="API server on/off (F6)")
        yield Static("", classes="server-status", markup=False)

    @property
    def influence(self) -> "InfluenceApp":
        return cast("InfluenceApp", self.app)

    def on_mount(self) -> None:
        self.refresh_status()
        self.set_interval(0.5, self.refresh_status)

    def refresh_status(self) -> None:
        app = self.influence
        running, text = app.server_status_text()
        # only what changed: an update re-lays out the screen, twice a second even when idle
        for selector, value in ((".model-status", app.model_status_text()), (".server-status", text)):
            if self._shown.get(selector) != value:
                self._shown[selector] = value
                self.query_one(selector, Static).update(value)
        switch = self.query_one(Switch)
        if switch.value != running:
            with switch.prevent(Switch.Changed):
                switch.value = running

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        self.influence.set_server(event.value)
