"""The Chat screen: the conversation, the prompt, slash commands, streaming answers.

The answer is consumed by an async worker on the UI loop (`async for` over the engine's stream
never blocks it: the engine's thread wakes the loop per token), so keys keep working while the
model writes; Esc cancels the stream and the partial answer is kept and marked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from textual import events, work
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.widgets.markdown import MarkdownFence

from influence_tui.chats import title_of
from influence_tui.config import ConfigError, validate_value
from influence_tui.sessions import MARKDOWN_SUFFIXES, SessionError, load_session, save_markdown, save_session
from influence_tui.tui import slash
from influence_tui.tui.conversation import Conversation
from influence_tui.tui.screens.chats import ChatsScreen
from influence_tui.tui.widgets.messages import AssistantMessage, NoteMessage, UserMessage
from influence_tui.tui.widgets.prompt import PromptInput
from influence_tui.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp

WELCOME = (
    "**Influence** — a local model, nothing leaves this machine.  \n"
    "Type a message and press **Enter**; **ctrl+j** or **alt+enter** adds a line. "
    "`/help` lists the commands; **F1** shows every key."
)


SHOWN_MESSAGES = 100  # messages of a loaded conversation mounted as widgets (the newest)
HISTORY_LINES = 200  # messages /history lists (the newest)


def format_stats(result: Any, stopped_by_user: bool = True) -> str:
    """The line under an answer: tokens, speed, time to first token, context used, drops."""
    u = result.usage
    if result.finish_reason == "error" and not u.completion_tokens:  # nothing was generated: no figures
        return f"✗ error: {result.error}"
    parts = [f"{u.completion_tokens} tokens", f"{u.decode_tokens_per_s:.1f} tok/s", f"first token {u.ttft_s:.2f}s"]
    if u.context_length:
        used = u.prompt_tokens + u.completion_tokens
        parts.append(f"context {used}/{u.context_length}")
    if u.cached_tokens:
        parts.append(f"{u.cached_tokens} cached")
    text = " · ".join(parts)
    if result.finish_reason == "cancelled":
        why = "(Esc)" if stopped_by_user else "(the model was unloaded or switched)"
        text = f"⏹ stopped {why}: partial answer · " + text
    elif result.finish_reason == "length":
        text += " · stopped at max_tokens"
    elif result.finish_reason == "error":
        text = f"✗ error: {result.error} · " + text
    if u.dropped_tokens:
        text += f"\n⚠ {u.dropped_tokens} tokens of old turns were dropped to fit the context window"
    return text


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+r", "retry", "Retry", show=False),
        Binding("ctrl+l", "clear", "Clear", show=False),
        Binding("ctrl+y", "copy", "Copy answer", show=False, priority=True),  # over the prompt's redo
        Binding("ctrl+t", "toggle_think", "Thinking on/off", show=False, priority=True),  # as oterm's
        Binding("ctrl+n", "new_chat", "New chat", show=False, priority=True),
        Binding("ctrl+o", "chats", "Chats", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__(id="chat")
        self._stream: Any = None
        self._current: AssistantMessage | None = None
        self._stopped_by_user = False  # Esc, not an unload or a model switch, ended the answer
        self._unanswered: str | None = None  # the last question dropped without an answer (for /retry)
        self._partial_kept = False  # the app ended mid-answer and keep_partial_answer() kept it

    @property
    def influence(self) -> "InfluenceApp":
        return cast("InfluenceApp", self.app)

    @property
    def conversation(self) -> Conversation:
        return self.influence.conversation

    @property
    def busy(self) -> bool:
        return self._current is not None

    def compose(self) -> Any:
        yield StatusBar("Chat")
        yield VerticalScroll(id="messages")
        yield Static("", id="slash-hint")
        yield PromptInput(id="prompt")
        yield Footer()

    async def on_mount(self) -> None:
        container = self.query_one("#messages", VerticalScroll)
        # Anchored: new text keeps the view at the bottom until the user scrolls up to read;
        # scrolling back down re-anchors (Textual >= 4).
        container.anchor()
        self.influence.chat_screen = self
        await self.render_conversation()
        self.query_one(PromptInput).focus()
        await self.influence.load_start_session(self)

    def keep_partial_answer(self) -> None:
        """The app ends while an answer is written: it goes into the conversation as far as it got,
        marked stopped (as Esc leaves it), so the saved chat does not end on an unanswered question."""
        bubble = self._current
        if bubble is None or self._partial_kept or not self.conversation.messages \
                or self.conversation.messages[-1].role != "user":
            return
        self._partial_kept = True
        self.conversation.add("assistant", bubble.text, stopped=True, thinking=bubble.thinking)

    def on_unmount(self) -> None:
        self.keep_partial_answer()  # (before the answer's worker is cancelled with the screen)
        # Leaving the app mid-answer: free the engine for the API server and the next run.
        if self._stream is not None and not self._stream.done:
            self._stream.cancel()

    # -- rendering -------------------------------------------------------------------------------
    async def render_conversation(self) -> None:
        container = self.query_one("#messages", VerticalScroll)
        await container.remove_children()
        widgets: list[Any] = [NoteMessage(WELCOME, "welcome")]
        if self.conversation.system_prompt:
            widgets.append(NoteMessage(f"System prompt: {self.conversation.system_prompt}"))
        messages = self.conversation.messages
        if len(messages) > SHOWN_MESSAGES:
            # each message is a Markdown widget: 400 took 5 s to mount, 10,000 over two minutes
            widgets.append(NoteMessage(f"{len(messages) - SHOWN_MESSAGES} earlier messages are in the conversation "
                                       f"but not shown (`/save` keeps them all)"))
            messages = messages[-SHOWN_MESSAGES:]
        for m in messages:
            if m.role == "user":
                widgets.append(UserMessage(m.content))
            else:
                widgets.append(AssistantMessage(m.content, stopped=m.stopped, thinking=m.thinking))
        await container.mount_all(widgets)
        container.anchor()

    async def note(self, text: str, kind: str = "info") -> None:
        await self.query_one("#messages", VerticalScroll).mount(NoteMessage(text, kind))

    def on_prompt_input_hint(self, event: PromptInput.Hint) -> None:
        hint = self.query_one("#slash-hint", Static)
        if event.matches:
            hint.update("  ".join(f"{m.strip()} {slash.COMMANDS.get(m.strip(), ('',))[0]}".strip() for m in event.matches[:8]) + "   (Tab completes)")
        hint.set_class(bool(event.matches), "visible")

    # -- sending ---------------------------------------------------------------------------------
    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        self.query_one("#slash-hint", Static).set_class(False, "visible")
        if slash.is_command(event.text):
            await self.run_command(event.text)
            return
        await self.send(event.text.lstrip("/") if event.text.lstrip().startswith("//") else event.text)

    async def send(self, text: str) -> None:
        if self.busy:
            self.app.notify("An answer is still being written: Esc stops it.", severity="warning")
            self.query_one(PromptInput).text = text
            return
        self._unanswered = None
        self.conversation.add("user", text)
        container = self.query_one("#messages", VerticalScroll)
        await container.mount(UserMessage(text))
        await self._start_answer()

    async def _start_answer(self) -> None:
        self._partial_kept = self._stopped_by_user = False
        container = self.query_one("#messages", VerticalScroll)
        bubble = AssistantMessage(model=self.influence.model_label())
        self._current = bubble
        self.refresh_bindings()
        await container.mount(bubble)
        container.anchor()  # the user just sent: follow the answer
        self.answer(bubble)

    @work(exclusive=True, group="answer")
    async def answer(self, bubble: AssistantMessage) -> None:
        try:
            await self._answer(bubble)
        except asyncio.CancelledError:
            if self._stream is not None or not self._stopped_by_user:
                # the app is ending (its workers are cancelled first): the answer as far as it got
                self.keep_partial_answer()
            else:  # Esc while waiting for the model: nothing was generated
                bubble.set_status("⏹ stopped before the model was ready")
                bubble.add_class("stopped")
                self._drop_unanswered()
            raise
        finally:
            self._current = None
            self._stream = None
            self.refresh_bindings()

    async def _answer(self, bubble: AssistantMessage) -> None:
        app = self.influence
        if not await self._wait_for_model(bubble):
            return
        from influence_tui.engine.types import GenerationRequest  # types only: no torch

        request = GenerationRequest(
            messages=self.conversation.engine_messages(),
            system=self.conversation.system_prompt,
            params=app.settings.generation_params(),
            think=app.settings.think,  # off: a reasoning model answers straight away
        )
        # an API client's keep_alive may have unloaded the model meanwhile: this chat's model loads again
        model = app.model_summary.path if app.engine.status().model is None and app.model_summary else None
        try:
            stream = app.engine.submit(request, model)
        except Exception as exc:  # QueueFull, EngineError: one line in the bubble
            await bubble.finish(f"✗ {exc}", error=str(exc))
            return
        self._stream = stream
        self._stopped_by_user = False
        bubble.set_status("writing… (Esc stops)")
        bubble.start()
        async for event in stream:
            bubble.feed(event.text, event.thinking)
        result = stream.result
        stopped = result.finish_reason == "cancelled"
        await bubble.finish(format_stats(result, self._stopped_by_user), stopped=stopped, error=result.error if result.finish_reason == "error" else None)
        if self._partial_kept:  # the app is ending: the answer was kept as far as it got
            return
        if result.finish_reason != "error" or bubble.text or bubble.thinking:
            self.conversation.add("assistant", bubble.text, stopped=stopped, thinking=bubble.thinking)
            app.autosave()
        elif result.error_kind == "request":
            # the question cannot be answered as it is (too long for the context): out of the
            # history, so it is not resent with every later message, and back in the prompt to edit
            question = self.conversation.messages[-1].content if self.conversation.messages else ""
            self._drop_unanswered()
            prompt = self.query_one(PromptInput)
            if question and not prompt.text:
                prompt.text = question
        app.answers_done += 1

    async def _wait_for_model(self, bubble: AssistantMessage) -> bool:
        """Wait for a load in progress (the user may type before the model is ready)."""
        app = self.influence
        if app.model_state == "loading":
            bubble.set_status("waiting for the model to load…")
            while app.model_state == "loading":
                await asyncio.sleep(0.1)
        if app.model_state != "ready" or app.engine is None:
            reason = app.model_error or "no model is loaded"
            await bubble.finish(f"✗ {reason}: load one with /model NAME or in the Library (F4)", error=reason)
            self._drop_unanswered()
            return False
        return True

    def _drop_unanswered(self) -> None:
        # The question stays on screen but not in the history, so a retry does not send it twice;
        # /retry with nothing else to answer sends it again.
        if self.conversation.messages and self.conversation.messages[-1].role == "user":
            self._unanswered = self.conversation.messages.pop().content

    def on_click(self, event: events.Click) -> None:
        """A click on a code block copies it (as oterm's); a drag still selects text."""
        node = event.widget
        while node is not None and not isinstance(node, MarkdownFence):
            node = node.parent
        if node is None or self.get_selected_text():
            return
        code = node.code.rstrip("\n")
        self.app.copy_to_clipboard(code)
        self.influence.last_copied = code
        lines = code.count("\n") + 1
        self.app.notify(f"Copied the code block ({lines} line{'s' if lines != 1 else ''}; OSC 52: your terminal must allow it)")

    # -- actions ---------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # "Stop answer" shows in the footer only while an answer is being written.
        if action == "stop":
            return self.busy
        return True

    def action_stop(self) -> None:
        self._stopped_by_user = True
        if self._stream is not None and not self._stream.done:
            self._stream.cancel()
        elif self._current is not None:
            self.workers.cancel_group(self, "answer")
            self._current = None

    async def action_retry(self) -> None:
        await self.run_command("/retry")

    async def action_clear(self) -> None:
        await self.run_command("/clear")

    async def action_new_chat(self) -> None:
        await self.run_command("/new")

    async def action_chats(self) -> None:
        await self.run_command("/chats")

    async def action_copy(self) -> None:
        await self.run_command("/copy")

    async def action_toggle_think(self) -> None:
        """Reasoning models think before the next answers, or not (`/set think`)."""
        await self.run_command(f"/set think {'off' if self.influence.settings.think else 'on'}")

    # -- slash commands --------------------------------------------------------------------------
    async def run_command(self, text: str) -> None:
        try:
            cmd = slash.parse(text)
            handler = getattr(self, "_cmd_" + cmd.name[1:])
            await handler(cmd.arg)
        except (slash.SlashError, SessionError, ConfigError) as exc:
            await self.note(f"✗ {exc}", "error")
            self.app.notify(str(exc), severity="error")

    async def _cmd_help(self, arg: str) -> None:
        await self.note("**Commands**\n\n" + slash.help_text() + "\n\nKeys: Enter sends · ctrl+j / alt+enter newline · Esc stops · F1 all keys"
                        "\n\nA reasoning model's thinking is folded above its answer (▶ Thought): click it, "
                        "or shift+Tab to it and press Enter; ctrl+t turns thinking off or on.")

    async def _cmd_clear(self, arg: str) -> None:
        if self.busy:
            raise slash.SlashError("wait for the answer to finish (or press Esc) before /clear")
        had = bool(self.conversation.messages)
        self.influence.new_conversation(system_prompt=self.conversation.system_prompt)  # the turns stay in their file
        self._unanswered = None
        await self.render_conversation()
        kept = " (system prompt kept)" if self.conversation.system_prompt else ""
        where = "; the chat before is in the Chats list (ctrl+o)" if had and self.influence.settings.save_chats else ""
        self.app.notify("Conversation cleared" + kept + where)

    async def _cmd_new(self, arg: str) -> None:
        if self.busy:
            raise slash.SlashError("wait for the answer to finish (or press Esc) before /new")
        self.influence.new_conversation()
        self._unanswered = None
        await self.render_conversation()
        self.query_one(PromptInput).focus()

    async def _cmd_chats(self, arg: str) -> None:
        self.influence.autosave()  # the open chat as it is now (a rename or /system since its last answer)
        before = self.conversation

        async def closed(path: Path | None) -> None:
            if path is not None:
                await self.open_chat(path)
            elif self.conversation is not before:  # the open chat was deleted from the list
                self._unanswered = None
                await self.render_conversation()

        self.app.push_screen(ChatsScreen(), closed)

    async def open_chat(self, path: Path) -> None:
        if self.busy:
            self.app.notify("An answer is still being written: Esc stops it first.", severity="warning")
            return
        try:
            await self.load_file(path)
        except SessionError as exc:
            self.app.notify(str(exc), title="Chat not opened", severity="error")

    async def _cmd_rename(self, arg: str) -> None:
        keeper = self.influence.keeper
        has_file = keeper.path is not None or keeper.exit_path is not None
        keeper.rename(" ".join(arg.split()) or None)
        name = title_of(self.influence.current_session())
        # plain-text notifications: a title is the user's text, not Markdown
        if keeper.exit_path is not None:
            self.app.notify(f"This chat is now named “{name}” (kept in {keeper.exit_path})", title="Renamed")
        elif not self.influence.settings.save_chats:
            self.app.notify(f"This chat is now named “{name}”; chats are not kept (save_chats is off: /save FILE keeps it)",
                            title="Renamed")
        elif has_file or self.conversation.kept_messages():
            self.app.notify(f"This chat is now listed as “{name}” (ctrl+o lists the chats)", title="Renamed")
        else:
            self.app.notify(f"This chat will be listed as “{name}” once it has a message", title="Renamed")

    async def _cmd_history(self, arg: str) -> None:
        msgs = self.conversation.messages
        if not msgs:
            await self.note("The conversation is empty.")
            return
        lines = [f"**History** ({len(msgs)} messages)", ""]
        first = max(len(msgs) - HISTORY_LINES, 0)
        if first:
            lines.append(f"… {first} earlier messages (in the conversation and in `/save`)")
        for i, m in enumerate(msgs[first:], first + 1):
            preview = " ".join(m.content.split())[:80]  # the answer; its reasoning only counted
            mark = " (stopped)" if m.stopped else ""
            if m.thinking:
                mark += f" (after {len(m.thinking.split())} words of reasoning)"
            lines.append(f"{i}. **{m.role}**{mark} `{m.timestamp}`: {preview}")
        await self.note("\n".join(lines))

    async def _cmd_save(self, arg: str) -> None:
        session = self.influence.current_session()
        if arg.lower().endswith(MARKDOWN_SUFFIXES):  # a transcript to read or share
            path = save_markdown(arg, session, title_of(session))
            await self.note(f"Saved the chat as Markdown to `{path}` (`/save FILE.json` keeps a session to load)")
            return
        path = save_session(arg, session)
        self.influence.keeper.written_by_save(path)
        await self.note(f"Saved the session to `{path}`")

    async def _cmd_load(self, arg: str) -> None:
        if self.busy:
            raise slash.SlashError("wait for the answer to finish (or press Esc) before /load")
        await self.load_file(arg)

    async def load_file(self, path: str | Path, starting: bool = False) -> None:
        """A session file into the conversation (`starting`: the one the app starts with, which
        `--save-on-exit` keeps)."""
        session = load_session(path)  # raises SessionError before anything changes
        app = self.influence
        if not starting:
            app.keeper.leave()  # the chat being left, as it is now
        app.conversation = Conversation.from_session(session)
        self._unanswered = None  # a question of the previous conversation is not this one's to retry
        changed = [f"{name} {getattr(app.settings, name)}" for name in app.keeper.apply_params(session)]
        app.keeper.opened(path)
        await self.render_conversation()
        note = f"Loaded `{path}`: {len(app.conversation.messages)} messages"
        if changed:  # the file's generation settings now apply: say which
            note += f"; its settings apply: {', '.join(changed)}"
        if app.keeper.path is None and app.keeper.exit_path is None and app.settings.save_chats:
            note += "\n\nChanges are kept as a new chat in the Chats list (ctrl+o); `/save FILE` writes a file."
        if session.model_path and not app.is_loaded(session.model_path):
            note += f"\n\nIt was recorded with `{session.model_path}`; `/model NAME` switches model."
        await self.note(note)

    async def _cmd_set(self, arg: str) -> None:
        name, raw = slash.parse_set(arg)
        value = validate_value(name, raw)
        setattr(self.influence.settings, name, value)
        self.influence.keeper.set_by_user(name)
        shown = "off" if value is None or value is False else "on" if value is True else value
        await self.note(f"{name} = {shown} (for the next answers; the Settings screen saves it)")

    async def _cmd_system(self, arg: str) -> None:
        if not arg:
            current = self.conversation.system_prompt
            await self.note(f"System prompt: {current}" if current else "No system prompt. `/system TEXT` sets one.")
            return
        self.conversation.system_prompt = arg
        self.influence.autosave()
        await self.note(f"System prompt set: {arg}")

    async def _cmd_model(self, arg: str) -> None:
        if self.busy:
            raise slash.SlashError("wait for the answer to finish (or press Esc) before /model")
        from influence_tui.library import ModelNotFound, find_model

        try:
            info = find_model(arg, self.influence.models())
        except ModelNotFound as exc:  # the library's hint names the CLI; here the Library screen lists them
            raise slash.SlashError(str(exc).replace("see `influence list`", "the Library, F4, lists them")) from None
        if not info.usable:
            raise slash.SlashError(f"{info.name} cannot be used: {info.reason}")
        if self.influence.switch_model(info.path):
            await self.note(f"Loading {info.name}…")

    async def _cmd_retry(self, arg: str) -> None:
        if self.busy:
            raise slash.SlashError("an answer is being written; Esc stops it first")
        msgs = self.conversation.messages
        if self.conversation.held:  # after /edit: the edit is given up, the question it took back answered again
            msgs.extend(self.conversation.held)
            self.conversation.held.clear()
            await self.render_conversation()
        if (not msgs or msgs[-1].role == "assistant") and self._unanswered:
            self.conversation.add("user", self._unanswered)  # the question on screen that got no answer
            self._unanswered = None
            await self._start_answer()
            return
        if not any(m.role == "user" for m in msgs):
            raise slash.SlashError("nothing to retry: send a message first")
        while msgs and msgs[-1].role == "assistant":
            msgs.pop()
            answers = self.query(AssistantMessage)
            if answers:
                await answers.last().remove()
        await self._start_answer()

    async def _cmd_edit(self, arg: str) -> None:
        if self.busy:
            raise slash.SlashError("an answer is being written; Esc stops it first")
        if self._unanswered:  # the question on screen that got no answer (it is the last one there)
            text, self._unanswered = self._unanswered, None
        else:
            msgs = self.conversation.messages
            last = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i].role == "user"), None)
            if last is None:
                raise slash.SlashError("nothing to edit: send a message first")
            text = self.conversation.take_back(last).content  # (the saved chat keeps them until a new message)
        await self._remove_from_last_question()
        self._to_prompt(text)

    async def _remove_from_last_question(self) -> None:
        """The last question's bubble and everything under it."""
        children = list(self.query_one("#messages", VerticalScroll).children)
        first = max((i for i, w in enumerate(children) if isinstance(w, UserMessage)), default=None)
        if first is not None:
            await self.query_one("#messages", VerticalScroll).remove_children(children[first:])

    def _to_prompt(self, text: str) -> None:
        prompt = self.query_one(PromptInput)
        prompt.text = text
        prompt.move_cursor(prompt.document.end)
        prompt.focus()

    async def _cmd_copy(self, arg: str) -> None:
        last = self.conversation.last("assistant")
        if last is None:
            raise slash.SlashError("nothing to copy yet")
        text = last.content
        if not text:
            raise slash.SlashError("the last answer has no text" + (" (only reasoning)" if last.thinking else ""))
        if arg == "code":
            code = slash.last_code_block(text)
            if code is None:
                raise slash.SlashError("the last answer has no code block")
            text = code
        self.app.copy_to_clipboard(text)
        self.influence.last_copied = text
        self.app.notify(f"Copied {len(text)} characters (OSC 52: your terminal must allow it)")

    async def _cmd_quit(self, arg: str) -> None:
        self.app.exit(0)

    async def _cmd_exit(self, arg: str) -> None:
        self.app.exit(0)
