"""The confirmation asked before the Library deletes a model, or the Chats list a chat, from the disk."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmDelete(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "cancel", "Keep"), Binding("y", "confirm", "Delete")]

    def __init__(self, name: str, path: str, size: str, what: str = "", consequence: str = "The files are removed from the disk.") -> None:
        super().__init__()
        self.model_name, self.model_path, self.size_text = name, path, size
        self.what, self.consequence = what, consequence

    def compose(self) -> Any:
        # names and paths come from the disk (a chat's title from the user): escaped, not markup
        what = f"{self.what} " if self.what else ""
        with Vertical(id="confirm-box"):
            yield Static(f"Delete {what}[b]{escape(self.model_name)}[/b] ({escape(self.size_text)})?", id="confirm-title")
            yield Static(f"{escape(self.model_path)}\n\n{escape(self.consequence)}", id="confirm-path")
            with Horizontal(id="confirm-buttons"):
                yield Button("Keep (n)", id="keep", variant="primary")
                yield Button("Delete (y)", id="delete", variant="error")

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "delete")

    def action_cancel(self) -> None:
        self.dismiss(False)

    def action_confirm(self) -> None:
        self.dismiss(True)
