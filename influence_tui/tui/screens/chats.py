"""The Chats list (ctrl+o or /chats on the Chat screen): the saved chats, newest first, searched
as you type; Enter opens one, ctrl+r renames it, ctrl+d deletes it (after asking).

The folder is read in a thread worker (a folder of long chats takes a moment to parse); the list
dismisses with the path of the chat to open, and the Chat screen opens it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from influence_tui.chats import ChatEntry, ago, delete_chat, list_chats, model_name, rename_chat
from influence_tui.sessions import SessionError
from influence_tui.tui.screens.confirm_delete import ConfirmDelete

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp

KEYS = "Enter open · ctrl+r rename · ctrl+d delete · Esc close"
SHOWN = 200  # rows drawn at once: a search narrows the rest (3,000 rows took 0.5 s a key press)
SEARCH_DELAY = 0.12  # seconds of no typing before the list follows the search field


def entry_line(entry: ChatEntry, is_open: bool) -> Text:
    # titles and messages are the user's text: plain Text, never parsed as markup
    text = Text(entry.title, style="bold")
    if is_open:
        text.append("  ● open", style="green")
    text.append(f"\n{entry.messages} messages · {model_name(entry.model)} · {ago(entry.modified)}", style="dim")
    return text


class ChatsScreen(ModalScreen["Path | None"]):
    BINDINGS = [
        Binding("escape", "close", "Close the list"),
        Binding("down", "move(1)", "Next chat", show=False),
        Binding("up", "move(-1)", "Previous chat", show=False),
        Binding("enter", "open", "Open the chat", show=False),  # (the search field's Enter opens it too)
        # over the search field's own ctrl+d (delete right): the Delete key still does that
        Binding("ctrl+d", "delete", "Delete the chat (asks first)", priority=True),
        Binding("ctrl+r", "rename", "Rename the chat", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__(id="chats")
        self.entries: list[ChatEntry] = []
        self.shown: list[ChatEntry] = []
        self.loaded = False
        self._error: str | None = None  # the folder could not be read: said in the list
        self._keep: Path | None = None  # the row to highlight again after a refresh
        self._search_timer: Any = None

    @property
    def influence(self) -> "InfluenceApp":
        return cast("InfluenceApp", self.app)

    def compose(self) -> Any:
        with Vertical(id="chats-box"):
            yield Static("Chats", id="chats-title")
            yield Input(placeholder="search titles and messages", id="chats-filter", compact=True)
            yield OptionList(id="chats-list")
            yield Static(KEYS, id="chats-keys")

    def on_mount(self) -> None:
        self.query_one("#chats-filter", Input).focus()
        self.refresh_list()

    def refresh_list(self) -> None:
        self._scan(self.influence.chats_folder())

    @work(thread=True, exclusive=True, group="chats-scan")
    def _scan(self, folder: Path) -> None:
        error = None
        try:
            entries, problems = list_chats(folder)
        except SessionError as exc:
            entries, problems, error = [], [], str(exc)
        self.app.call_from_thread(self._show, entries, problems, error)

    def _show(self, entries: list[ChatEntry], problems: list[str], error: str | None = None) -> None:
        self.entries, self.loaded, self._error = entries, True, error
        folder = self.influence.chats_folder()
        title = f"Chats · {len(entries)} saved in {folder}"
        if problems:
            title += f" · {len(problems)} other file(s) there are not chats"
        if not self.influence.settings.save_chats:
            title += "\nNew chats are not being kept (setting save_chats is off)"
        self.query_one("#chats-title", Static).update(Text(title))
        self._filter(self.query_one("#chats-filter", Input).value)

    def on_input_changed(self, event: Input.Changed) -> None:
        if not self.loaded:
            return
        if self._search_timer is not None:
            self._search_timer.stop()
        self._search_timer = self.set_timer(SEARCH_DELAY, lambda: self._filter(event.value))

    def _flush_search(self) -> None:
        """A search typed but not applied yet (its delay): applied before a key acts on a row."""
        if self._search_timer is not None:
            self._search_timer.stop()
            self._search_timer = None
            self._filter(self.query_one("#chats-filter", Input).value)

    def _filter(self, query: str) -> None:
        self._search_timer = None
        keep = self._keep or (self.selected().path if self.selected() else None)
        self._keep = None
        matches = [e for e in self.entries if e.matches(query)]
        self.shown = matches[:SHOWN]
        options = self.query_one("#chats-list", OptionList)
        options.clear_options()
        current = self.influence.chat_path
        options.add_options([Option(entry_line(e, e.path == current), id=str(e.path)) for e in self.shown])
        if self.shown:
            paths = [e.path for e in self.shown]
            options.highlighted = paths.index(keep) if keep in paths else 0
        if len(matches) > SHOWN:
            options.add_option(Option(Text(f"… {len(matches) - SHOWN} more: type to narrow the search", style="dim"),
                                      disabled=True))
        elif self._error:
            options.add_option(Option(Text(f"✗ {self._error}", style="red"), disabled=True))
        elif not self.shown and self.entries:
            options.add_option(Option(Text("No chat matches the search."), disabled=True))
        elif not self.shown:
            options.add_option(Option(Text("No saved chats yet: they appear here after their first answer."), disabled=True))

    def selected(self) -> ChatEntry | None:
        if self._search_timer is not None:
            self._flush_search()
        row = self.query_one("#chats-list", OptionList).highlighted
        return self.shown[row] if row is not None and 0 <= row < len(self.shown) else None

    # -- keys --------------------------------------------------------------------------------------
    def action_move(self, step: int) -> None:
        self._flush_search()
        options = self.query_one("#chats-list", OptionList)
        if step > 0:
            options.action_cursor_down()
        else:
            options.action_cursor_up()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._open(self.selected())

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self._open(self.selected())

    def action_open(self) -> None:
        self._open(self.selected())

    def _open(self, entry: ChatEntry | None) -> None:
        if entry is not None:
            self.dismiss(entry.path)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_delete(self) -> None:
        entry = self.selected()
        if entry is None:
            return
        chat = self.influence.chat_screen
        if entry.path == self.influence.chat_path and chat is not None and chat.busy:
            self.app.notify("This chat is waiting for or writing an answer: close the list (Esc), stop the "
                            "answer (Esc), then delete it.", severity="warning")
            return

        def done(confirmed: bool | None) -> None:
            if not confirmed:
                return
            try:
                delete_chat(entry.path)
            except SessionError as exc:
                self.app.notify(str(exc), severity="error")
                return
            if entry.path == self.influence.chat_path:  # gone from the screen too: a new chat
                self.influence.new_conversation(deleted=True)
            self.app.notify(f"Deleted the chat “{entry.title}”")
            row = self.shown.index(entry) if entry in self.shown else 0
            rest = [e for e in self.shown if e is not entry]
            self._keep = rest[min(row, len(rest) - 1)].path if rest else None  # the row below takes its place
            self.refresh_list()

        self.app.push_screen(ConfirmDelete(entry.title, str(entry.path), f"{entry.messages} messages",
                                           what="chat", consequence="The file is removed from the disk."), done)

    def action_rename(self) -> None:
        entry = self.selected()
        if entry is None:
            return

        def done(title: str | None) -> None:
            if title is None:
                return
            self._keep = entry.path
            if entry.path == self.influence.chat_path:  # the open chat: through its keeper
                self.influence.keeper.rename(" ".join(title.split()) or None)
                self.refresh_list()
                return
            try:
                rename_chat(entry.path, title)
            except SessionError as exc:  # (deleted meanwhile, by another window)
                self.app.notify(str(exc), severity="error")
            self.refresh_list()

        self.app.push_screen(RenameChat(entry.given_title or ""), done)


class RenameChat(ModalScreen["str | None"]):
    """The new title of a chat (empty: listed under its first question again)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__(id="rename-chat")
        self.old_title = title

    def compose(self) -> Any:
        with Vertical(id="rename-box"):
            yield Static("Rename the chat (empty: listed under its first question) · Enter saves · Esc cancels",
                         id="rename-title")
            yield Input(self.old_title, placeholder="a name for the chat", id="rename-input", compact=True)

    def on_mount(self) -> None:
        self.query_one("#rename-input", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
