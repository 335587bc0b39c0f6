"""InfluenceApp: four screens (Chat, Hub, Library, Settings) one key away, help, palette, server.

The engine is created and loaded lazily in a thread worker after the first frame, so the app paints
before torch is imported. Tests pass a shared, already-loaded `engine=` (one model load per module)
and `autoload=False` for deterministic snapshots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen

from influence_tui.config import Settings
from influence_tui.sessions import Session, SessionError
from influence_tui.tui.conversation import Conversation
from influence_tui.tui.keeper import ChatKeeper
from influence_tui.tui.screens.chat import ChatScreen
from influence_tui.tui.screens.help import HelpScreen
from influence_tui.tui.screens.hub import HubScreen
from influence_tui.tui.screens.library import LibraryScreen
from influence_tui.tui.screens.settings import SettingsScreen

STYLES = Path(__file__).resolve().parents[2] / "styles"
SCREENS = {"chat": "Chat", "hub": "Hub", "library": "Library", "settings": "Settings"}


class InfluenceApp(App[int]):
    TITLE = "Influence"
    CSS_PATH = [STYLES / name for name in ("base.tcss", "chat.tcss", "hub.tcss", "library.tcss", "settings.tcss", "help.tcss")]
    MODES = {"chat": ChatScreen, "hub": HubScreen, "library": LibraryScreen, "settings": SettingsScreen}
    DEFAULT_MODE = "chat"
    # Priority: the F-keys work whatever has focus (TextArea binds f6/f7 to selection otherwise).
    BINDINGS = [
        Binding("f1", "help", "Help", priority=True),
        Binding("f2", "switch_mode('chat')", "Chat", priority=True),
        Binding("f3", "switch_mode('hub')", "Hub", priority=True),
        Binding("f4", "switch_mode('library')", "Library", priority=True),
        Binding("f5", "switch_mode('settings')", "Settings", priority=True),
        Binding("f6", "toggle_server", "API", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
    ]

    model_state: reactive[str] = reactive("empty")  # empty | loading | ready | error

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        engine: Any = None,
        model: str | None = None,
        autoload: bool = True,
        session_path: str | None = None,
        save_on_exit: str | None = None,
        list_models: Callable[[], list[Any]] | None = None,
        initial_mode: str = "chat",
        continue_latest: bool = False,
    ) -> None:
        super().__init__()
        self.settings = settings or Settings.load()
        self.engine = engine
        self.model_request = model or self.settings.model_path
        self.autoload = autoload
        self.session_path = session_path
        self.continue_latest = continue_latest  # `influence chat --continue`: the newest saved chat
        self._list_models = list_models
        self.initial_mode = initial_mode
        self.conversation = Conversation(system_prompt=self.settings.system_prompt)
        self.keeper = ChatKeeper(self, save_on_exit)  # where the conversation is kept, and when
        self.chat_screen: ChatScreen | None = None  # (it registers itself when mounted)
        self.model_summary: Any = None
        self.model_error: str | None = None
        self.server: Any = None
        self.answers_done = 0
        self.last_copied: str | None = None
        self.mounted_first = False
        if autoload:
            self.set_reactive(InfluenceApp.model_state, "loading")
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme

    # -- start and stop --------------------------------------------------------------------------
    async def on_mount(self) -> None:
        self.mounted_first = True
        if self.initial_mode != "chat":
            await self.switch_mode(self.initial_mode)
        self._adopt_engine()

    def on_ready(self) -> None:
        # Ready comes once the first frame is on the screen (already saying "loading"); only
        # then does the load worker start, and with it the torch import.
        if self.autoload and self.model_state != "ready":
            self.load_model(self.model_request)

    def _adopt_engine(self) -> None:
        """A shared engine that already holds a model (tests, or a reload) is ready at once."""
        if self.engine is None:
            return
        status = self.engine.status()
        if status.state == "ready":
            self.model_summary = getattr(self.engine, "summary", None) or status.model
            self.model_state = "ready"

    async def load_start_session(self, chat: ChatScreen) -> None:
        """`--session FILE`: loaded once, by the Chat screen when it is mounted."""
        path, self.session_path = self.session_path, None
        if self.continue_latest:
            self.continue_latest = False
            path = self._latest_chat()
        if not path:
            return
        from influence_tui.chats import resolve

        path = str(resolve(path, self.chats_folder()))
        try:
            await chat.load_file(path, starting=True)
        except SessionError as exc:
            self.notify(str(exc), title="Session not loaded", severity="error", timeout=10)
            self._keep_unreadable(Path(path))

    def _latest_chat(self) -> str | None:
        from influence_tui.chats import list_chats

        try:
            entries, _ = list_chats(self.chats_folder())
        except SessionError as exc:
            self.notify(str(exc), title="No chat to continue", severity="error", timeout=10)
            return None
        if not entries:
            self.notify(f"No saved chat in {self.chats_folder()} yet: this is a new one", title="No chat to continue")
            return None
        return str(entries[0].path)

    def _keep_unreadable(self, path: Path) -> None:
        """`--session F --save-on-exit F` and F did not load: saving on exit would replace what
        is in F (a damaged session, someone's notes) with this chat. Save beside it instead."""
        target = self.keeper.exit_path
        if target is None or not path.exists() or target.resolve() != path.resolve():
            return
        beside = target.with_name(f"{target.stem}.new{target.suffix or '.json'}")
        self.keeper.exit_path = beside
        self.notify(f"{target.name} is left as it is: this chat will be saved to {beside.name} on exit",
                    title="Session kept", timeout=10)

    def save_on_exit(self) -> Path | None:
        """Keep the open chat however the app ends (`--save-on-exit`'s file while the chat the app
        started with is open, else the chats folder); safe to repeat. The answer being written, if
        any, is kept as far as it got, marked stopped (as Esc leaves it)."""
        if self.chat_screen is not None:
            self.chat_screen.keep_partial_answer()
        try:
            return self.keeper.save()
        except Exception as exc:  # noqa: BLE001 - leaving anyway: say why, once, on the terminal
            import sys

            print(f"error: the chat was not saved: {exc}", file=sys.stderr)
            return None

    def notify(self, message: str, *, title: str = "", severity: Any = "information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Notifications are plain text here: they carry model names, paths, queries and error
        messages, and a `[/]` in any of them made Textual's markup parser raise (a crash)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def action_help_quit(self) -> None:
        """ctrl+c: Textual's hint how to quit, in plain text (its own is markup, which the
        plain-text notifications above would show as `[b]ctrl+q[/b]`)."""
        for key, active in self.active_bindings.items():
            if active.binding.action in ("quit", "app.quit"):
                self.notify(f"Press {key} to quit the app", title="Do you want to quit?")
                return

    async def action_quit(self) -> None:
        self.exit(0)

    # -- the chats folder -------------------------------------------------------------------------
    @property
    def save_on_exit_path(self) -> str | None:
        """`--save-on-exit`'s file, while the chat the app started with is open."""
        return str(self.keeper.exit_path) if self.keeper.exit_path is not None else None

    @property
    def chat_path(self) -> Path | None:
        """The open chat's file in the chats folder, once it is written or opened from there."""
        return self.keeper.path

    def chats_folder(self) -> Path:
        return self.keeper.folder()

    def autosave(self) -> Path | None:
        return self.keeper.save()

    def new_conversation(self, deleted: bool = False, system_prompt: str | None = None) -> None:
        """A new chat (with the default system prompt, or this one); the one before is kept as it
        was last written (`deleted`: its file is gone)."""
        self.keeper.leave(deleted=deleted)
        self.conversation = Conversation(system_prompt=system_prompt or self.settings.system_prompt)

    def on_unmount(self) -> None:
        self.save_on_exit()
        if self.server is not None:
            try:
                self.server.stop()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass

    # -- the model -------------------------------------------------------------------------------
    def ensure_engine(self) -> Any:
        if self.engine is None:
            from influence_tui.engine import Engine  # imported here: torch stays out of the first frame

            self.engine = Engine(self.settings)
        return self.engine

    def answers_in_flight(self) -> int:
        """Answers the engine is writing now (this chat's, and the API server's)."""
        return self.engine.status().in_flight if self.engine is not None else 0

    def switch_model(self, model: str | None = None) -> bool:
        """A load the user asked for (Library, /model, the palette): refused while answers are
        being written, since a load cancels them (a chat answer was cut off, marked "stopped")."""
        busy = self.answers_in_flight()
        if busy:
            what = "an answer is" if busy == 1 else f"{busy} answers are"
            self.notify(f"{what} being written (here or through the API): let it finish or press Esc, then load",
                        title="Model not loaded", severity="warning")
            return False
        self.load_model(model)
        return True

    def load_model(self, model: str | None = None) -> None:
        self.model_state = "loading"
        self.model_error = None
        self.model_request = model or self.model_request
        self._load_worker(self.model_request)

    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, model: str | None) -> None:
        try:
            engine = self.ensure_engine()
            summary = engine.load(model)
        except Exception as exc:  # noqa: BLE001 - any load failure is one line for the user
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.call_from_thread(self._load_failed, message)
        else:
            self.call_from_thread(self._loaded, summary)

    def _loaded(self, summary: Any) -> None:
        self.model_summary = summary
        self.model_state = "ready"
        self.notify(f"{summary.name} ready on {summary.device} ({summary.load_s:.1f}s)", title="Model loaded")

    def _load_failed(self, message: str) -> None:
        self.model_error = message
        self.model_state = "error"
        self.notify(message, title="Model not loaded", severity="error", timeout=10)

    def model_label(self) -> str:
        summary = self.model_summary
        return getattr(summary, "name", None) or "Assistant"

    def sync_engine_state(self) -> None:
        """Follow model switches made by others (an API request naming another model)."""
        if self.engine is None or self.model_state != "ready":
            return
        status = self.engine.status()
        if status.state == "ready" and status.model is not None:
            self.model_summary = status.model

    def model_status_text(self) -> str:
        self.sync_engine_state()
        if self.model_state == "loading":
            return f"⏳ loading {Path(self.model_request).name if self.model_request else 'the default model'}…"
        if self.model_state == "error":
            return f"✗ {self.model_error}"
        if self.model_state == "ready" and self.model_summary is not None:
            s = self.model_summary
            if self.engine is not None and self.engine.status().state == "empty":
                return f"○ {s.name} · unloaded by an API client's keep_alive; the next message loads it again"
            return f"● {s.name} · {getattr(s, 'quantization', '')} · {getattr(s, 'device', '')} · ctx {getattr(s, 'context_length', '?')}"
        return "no model loaded"

    def is_loaded(self, name_or_path: str) -> bool:
        s = self.model_summary
        if s is None or self.model_state != "ready":
            return False
        return name_or_path in (getattr(s, "name", None), getattr(s, "path", None)) or (
            bool(getattr(s, "path", None)) and Path(name_or_path).expanduser().resolve() == Path(s.path).resolve()
        )

    def models(self) -> list[Any]:
        if self._list_models is not None:
            return self._list_models()
        from influence_tui.library import list_models

        return list_models(self.settings.output_dir, configured=self.settings.model_path)

    def hub_client(self) -> Any:
        # imported on first use: huggingface_hub is not light. The engine puts the offline
        # switches back after each model load (engine/offline.py), so the Hub works after a load.
        import influence_tui.hub as hub

        return hub

    def settings_file_label(self) -> str:
        from influence_tui.config import settings_file

        return str(settings_file())

    def current_session(self) -> Session:
        path = getattr(self.model_summary, "path", None) or self.model_request
        return self.conversation.to_session(self.settings, path)

    # -- the API server --------------------------------------------------------------------------
    def action_toggle_server(self) -> None:
        running = self.server is not None and self._server_running()
        self.set_server(not running)

    def set_server(self, on: bool) -> None:
        if on:
            self._start_server()
        elif self.server is not None:
            self._stop_server()

    @work(thread=True, exclusive=True, group="server")
    def _start_server(self) -> None:
        try:
            from influence_tui.server.runner import ServerRunner
        except ImportError:
            self.call_from_thread(self.notify, "the API server is not part of this build", severity="error")
            return
        try:
            # A new runner each start: host, port and key changed in Settings apply.
            self.server = ServerRunner(self.ensure_engine(), self.settings)
            self.server.start()
        except Exception as exc:  # noqa: BLE001 - port in use and the like
            self.call_from_thread(self.notify, f"API server not started: {exc}", severity="error", timeout=10)
            return
        self.call_from_thread(self.notify, f"API server on {self._server_field('url')}", title="API on")

    @work(thread=True, exclusive=True, group="server")
    def _stop_server(self) -> None:
        try:
            self.server.stop()
        except Exception as exc:  # noqa: BLE001
            self.call_from_thread(self.notify, f"API server stop failed: {exc}", severity="error")
            return
        self.call_from_thread(self.notify, "API server stopped", title="API off")

    def _server_field(self, name: str) -> Any:
        if self.server is None:
            return None
        status = self.server.status()
        if hasattr(status, name):
            return getattr(status, name)
        order = ("running", "url", "model", "requests_served", "in_flight")
        return status[order.index(name)] if isinstance(status, (tuple, list)) else status.get(name)

    def _server_running(self) -> bool:
        try:
            return bool(self._server_field("running"))
        except Exception:  # noqa: BLE001
            return False

    def server_status_text(self) -> tuple[bool, str]:
        if not self._server_running():
            return False, "off (F6)"
        served = self._server_field("requests_served") or 0
        busy = self._server_field("in_flight") or 0
        return True, f"{self._server_field('url')} · {served} served" + (f" · {busy} running" if busy else "")

    # -- navigation, help, palette, theme --------------------------------------------------------
    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
        else:
            self.push_screen(HelpScreen())

    def watch_theme(self, theme: str) -> None:
        # Remember the chosen theme (only when the user changes it, not at start).
        if getattr(self, "settings", None) is not None and self.settings.theme != theme and self.mounted_first:
            self.settings.theme = theme
            try:
                self.settings.save(["theme"])
            except OSError:
                pass

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, title in SCREENS.items():
            yield SystemCommand(f"{title} screen", f"Go to the {title} screen", lambda m=mode: self.run_action(f"switch_mode('{m}')"))
        yield SystemCommand("Keys and commands", "Show every key binding and slash command (F1)", self.action_help)
        yield SystemCommand("API server on/off", "Start or stop the local API server (F6)", self.action_toggle_server)
        yield SystemCommand("Reload model", "Load the current model again", lambda: self.switch_model(self.model_request))
        chat = screen if isinstance(screen, ChatScreen) else None
        if chat is not None:
            yield SystemCommand("Stop answer", "Stop the answer being written (Esc)", chat.action_stop)
            yield SystemCommand("Retry", "Answer the last message again (/retry)", chat.action_retry)
            yield SystemCommand("New chat", "Start a new chat; this one stays in the Chats list (ctrl+n, /new)", chat.action_new_chat)
            yield SystemCommand("Chats", "Open, search, rename or delete the saved chats (ctrl+o, /chats)", chat.action_chats)
            yield SystemCommand("Clear chat", "Start over with the same system prompt; the chat before stays in the Chats list (/clear)",
                                chat.action_clear)
            yield SystemCommand("Copy answer", "Copy the last answer (/copy)", chat.action_copy)
            yield SystemCommand("Chat history", "Show the conversation (/history)", lambda: chat.run_command("/history"))
        for command in getattr(screen, "palette_commands", lambda: [])():
            yield command
