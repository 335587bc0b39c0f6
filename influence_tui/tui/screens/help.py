"""The help screen: every key binding of the app and its screens, and the slash commands.

Built from the BINDINGS tables themselves, so it cannot drift from what the keys do.
"""

from __future__ import annotations

from typing import Any

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from influence_tui.tui import slash


def _rows(bindings: list[Any]) -> list[str]:
    rows = []
    for b in bindings:
        if not isinstance(b, Binding) or not b.description:
            continue
        keys = ", ".join(k.strip() for k in b.key.split(","))
        rows.append(f"| `{b.key_display or keys}` | {b.description} |")
    return rows


def help_markdown() -> str:
    from influence_tui.tui.app import InfluenceApp
    from influence_tui.tui.screens.chat import ChatScreen
    from influence_tui.tui.screens.chats import ChatsScreen
    from influence_tui.tui.screens.hub import HubScreen
    from influence_tui.tui.screens.library import LibraryScreen
    from influence_tui.tui.screens.settings import SettingsScreen
    from influence_tui.tui.widgets.prompt import PromptInput

    parts = ["# Keys", "", "| key | action |", "|---|---|"]
    parts += _rows(InfluenceApp.BINDINGS)
    parts += ["| `ctrl+p` | Command palette: every action, themes |"]
    for title, cls in (("Chat", ChatScreen), ("Chat prompt", PromptInput), ("Chats list (ctrl+o)", ChatsScreen), ("Hub", HubScreen),
                       ("Library", LibraryScreen), ("Settings", SettingsScreen)):
        parts += ["", f"## {title}", "", "| key | action |", "|---|---|"] + _rows(cls.BINDINGS)
        if cls is ChatScreen:  # (a mouse action, not a binding)
            parts += ["| `click` on a code block | Copy the block |"]
    parts += ["", "# Slash commands (Chat)", "", slash.help_text()]
    return "\n".join(parts)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> Any:
        with VerticalScroll(id="help-body"):
            yield Markdown(help_markdown())
