"""The Settings screen: generation, device, models folder, Hub mirror, API server.

Each field is checked as it is typed with `config.validate_value` (the same rules as flags and
environment variables) and the reason is shown under it. Saving writes the user settings file and
updates the app's settings, so the next answer uses them without a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Static

from influence_tui.config import SPEC_BY_NAME, ConfigError, validate_value
from influence_tui.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp

# (section, [(setting, label)]) in the order of the form.
FORM: list[tuple[str, list[tuple[str, str]]]] = [
    ("Generation", [
        ("temperature", "Temperature"), ("top_p", "Top-p"), ("top_k", "Top-k"), ("min_p", "Min-p"),
        ("repeat_penalty", "Repeat penalty"), ("max_tokens", "Max tokens"), ("seed", "Seed"),
        ("think", "Think first"), ("system_prompt", "System prompt"),
    ]),
    ("Model", [("model_path", "Default model"), ("device", "Device"), ("context_length", "Context length"),
               ("output_dir", "Models folder"), ("mirror", "Hub mirror")]),
    ("API server", [("host", "Host"), ("port", "Port"), ("api_key", "API key")]),
    ("Chats", [("save_chats", "Keep chats"), ("chats_dir", "Chats folder")]),
]
FIELDS = [name for _, rows in FORM for name, _ in rows]


def _shown(value: Any) -> str:
    if isinstance(value, bool):  # a switch: on/off, as `/set think` and INFLUENCE_THINK spell it
        return "on" if value else "off"
    return "" if value is None else str(value)


class SettingsScreen(Screen[None]):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+z", "revert", "Revert", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="settings")
        self.errors: dict[str, str] = {}
        self._shown: dict[str, str] = {}  # what each field was last set to from the settings

    @property
    def influence(self) -> "InfluenceApp":
        return cast("InfluenceApp", self.app)

    def compose(self) -> Any:
        yield StatusBar("Settings")
        with VerticalScroll(id="settings-form"):
            for section, rows in FORM:
                yield Static(section, classes="section")
                for name, label in rows:
                    with Horizontal(classes="field"):
                        yield Label(label, classes="field-label")
                        with Vertical(classes="field-input"):
                            yield Input(id=f"set-{name}", placeholder=SPEC_BY_NAME[name].help,
                                        password=name == "api_key", compact=True)
                            yield Static("", id=f"err-{name}", classes="field-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save (ctrl+s)", id="settings-save", variant="primary")
                yield Button("Revert", id="settings-revert")
            yield Static(f"Saved to {self.influence.settings_file_label()}", id="settings-file")
        yield Footer()

    def palette_commands(self) -> list[SystemCommand]:
        return [
            SystemCommand("Save settings", "Check and save the form (ctrl+s)", self.action_save),
            SystemCommand("Revert settings", "Show the settings in use again", self.action_revert),
        ]

    def on_mount(self) -> None:
        self.action_revert()

    def on_screen_resume(self) -> None:
        """Back on this screen: fields the user has not edited show the settings in use now
        (`/set`, `/load` change them from the chat); edits in progress stay."""
        for name in FIELDS:
            field = self.query_one(f"#set-{name}", Input)
            if field.value == self._shown.get(name):
                field.value = self._shown[name] = _shown(getattr(self.influence.settings, name))

    def action_revert(self) -> None:
        """Show the settings in use (also what a Revert does)."""
        for name in FIELDS:
            self._shown[name] = _shown(getattr(self.influence.settings, name))
            self.query_one(f"#set-{name}", Input).value = self._shown[name]
        self.errors.clear()

    def on_input_changed(self, event: Input.Changed) -> None:
        name = (event.input.id or "").removeprefix("set-")
        if name in FIELDS:
            self.check(name, event.value)

    def check(self, name: str, raw: str) -> Any:
        """Validate one field as typed; show the reason under it."""
        box = self.query_one(f"#err-{name}", Static)
        field = self.query_one(f"#set-{name}", Input)
        try:
            value = self._parse(name, raw)
        except ConfigError as exc:
            reason = str(exc).split(" is not valid: ", 1)[-1]
            self.errors[name] = reason
            box.update(f"✗ {reason}")
            box.add_class("shown")
            field.add_class("invalid")
            return None
        self.errors.pop(name, None)
        box.update("")
        box.remove_class("shown")
        field.remove_class("invalid")
        return value

    def _parse(self, name: str, raw: str) -> Any:
        if name in ("top_k", "seed") and not raw.strip():
            return None
        if name == "model_path" and not raw.strip():
            return None
        return validate_value(name, raw)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "settings-save":
            self.action_save()
        elif event.button.id == "settings-revert":
            self.action_revert()

    def action_save(self) -> None:
        values = {}
        for name in FIELDS:
            values[name] = self.check(name, self.query_one(f"#set-{name}", Input).value)
        if self.errors:
            bad = ", ".join(self.errors)
            self.app.notify(f"Not saved: fix {bad}", severity="error")
            return
        settings = self.influence.settings
        folder_before = self.influence.chats_folder()
        changed = [name for name in FIELDS if getattr(settings, name) != values[name]]
        for name in FIELDS:
            setattr(settings, name, values[name])
            self._shown[name] = self.query_one(f"#set-{name}", Input).value  # the form now matches them
        if "system_prompt" in changed:
            self.influence.conversation.system_prompt = values["system_prompt"]
        # an opened chat's sampling settings apply now: a field left as it shows them saves the
        # user's own value (only what was edited becomes theirs)
        own = self.influence.keeper.own_params or {}
        overrides = {name: value for name, value in own.items() if name in FIELDS and name not in changed}
        try:
            path = settings.save(FIELDS, overrides)
        except OSError as exc:
            self.app.notify(f"cannot write the settings file: {exc.strerror or exc}", severity="error")
            return
        self.influence.keeper.settings_saved(changed, folder_before)
        note = f"Saved to {path}; the next answer uses them"
        if {"device", "model_path", "context_length"} & set(changed):
            note += " (device/model/context: on the next model load)"
        if {"host", "port", "api_key"} & set(changed):
            note += " (server: on its next start)"
        self.app.notify(note, title="Settings saved")
