"""Where the open chat is kept on disk, and when it is written.

The app's conversation is written after every answer, and when it is renamed, its system prompt
changes, another chat is opened or the app ends, to one file:

- the `--save-on-exit FILE` while the chat the app started with is open (the user's own file: it is
  kept there after every answer, not copied into the chats folder);
- else its file in the chats folder (setting `save_chats`; a new file at its first save).

A chat only read is never rewritten (its file's time says when it last changed); a file that
another window changed since this one read or wrote it is not overwritten (the chat goes on in a
new file); an empty chat never replaces a file. A chat's sampling settings travel with it: opening
one applies them (except those given as flags), leaving it for a new chat restores the user's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from influence_tui.chats import chats_folder, in_folder, save_chat
from influence_tui.sessions import SessionError, save_session
from influence_tui.tui.conversation import SESSION_PARAMS

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class ChatKeeper:
    def __init__(self, app: "InfluenceApp", exit_path: str | None) -> None:
        self.app = app
        self.exit_path = Path(exit_path).expanduser() if exit_path else None  # --save-on-exit, while its chat is open
        self.path: Path | None = None  # the open chat's file in the chats folder (resolved), once written or opened
        self._saved: int | None = None  # the conversation's fingerprint when last written or opened
        self._stamp: int | None = None  # the file's time then: another window's write changes it
        self._failed = False  # a failed save is said once per chat, not after every answer
        self.own_params: dict[str, Any] | None = None  # the user's sampling settings while a chat's apply

    def folder(self) -> Path:
        return chats_folder(self.app.settings)

    # -- writing -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write the open chat where it is kept, if it changed since it was read or written."""
        conversation = self.app.conversation
        if not conversation.messages or conversation.fingerprint() == self._saved:
            return self.exit_path or self.path
        if self.exit_path is None and not self.app.settings.save_chats:
            return None
        session = self.app.current_session()
        conversation.created_at = session.created_at  # fixed from the first save on
        target = self.exit_path or self.path
        if target is not None and self._stamp is not None and _stamp(target) not in (self._stamp, None):
            target = self._fork(target)
            if self.exit_path is None and not self.app.settings.save_chats:
                return None
        try:
            if self.exit_path is not None and target == self.exit_path:
                written = save_session(target, session)
            else:
                written = save_chat(self._writable_folder(), session, target)
        except SessionError as exc:
            if not self._failed:
                self._failed = True
                self.app.notify(f"{exc} (the chat stays open; /save FILE saves it elsewhere)", title="Chat not saved",
                                severity="warning", timeout=10)
            return None
        self._failed = False
        self._saved, self._stamp = conversation.fingerprint(), _stamp(written)
        if self.exit_path is None or target != self.exit_path:
            self.path = written.resolve()
        return written

    def _fork(self, target: Path) -> None:  # (the new target: none yet)
        """Another window wrote the chat's file: this one goes on in a new file (both kept)."""
        self.app.notify(f"{target.name} was changed by another window since it was opened here: this chat "
                        "goes on in a new file (both are in the Chats list)", title="Chat kept apart", timeout=10)
        self.exit_path = None if target == self.exit_path else self.exit_path
        self.path = None
        return None

    def _writable_folder(self) -> Path:
        folder = self.folder()
        for place in (folder, *folder.parents):  # a file where a folder should be: say so, by name
            if place.exists():
                if not place.is_dir():
                    raise SessionError(f"cannot save the chat: {place} is a file, not a folder (setting chats_dir)")
                break
        return folder

    # -- switching chats -------------------------------------------------------------------------
    def opened(self, path: str | Path) -> None:
        """A session file was loaded into the conversation: it goes on in that file when it is one
        of the chats folder (the Chats list, `--continue`), else as a new chat there once it changes."""
        resolved = Path(path).expanduser().resolve()
        self.path = resolved if in_folder(resolved, self.folder()) else None
        self._saved = self.app.conversation.fingerprint()
        self._stamp = _stamp(resolved)
        self._failed = False

    def leave(self, deleted: bool = False) -> None:
        """Before another chat takes the screen: this one written (unless its file was just
        deleted), `--save-on-exit` done with (it was for the chat the app started with), and the
        user's own sampling settings back."""
        if not deleted:
            self.save()
        if self.exit_path is not None:
            if self.app.conversation.messages and not deleted:
                self.app.notify(f"That chat is kept in {self.exit_path} (--save-on-exit); new ones go to the Chats list",
                                title="Chat kept")
            self.exit_path = None
        self.path, self._saved, self._stamp, self._failed = None, None, None, False
        self.restore_params()

    def apply_params(self, session: Any) -> list[str]:
        """The opened chat's sampling settings (not those given as flags); the names changed."""
        from influence_tui.tui.conversation import apply_session_params

        settings = self.app.settings
        if self.own_params is None:
            self.own_params = {name: getattr(settings, name) for name in SESSION_PARAMS}
        before = {name: getattr(settings, name) for name in SESSION_PARAMS}
        flags = {name: before[name] for name in SESSION_PARAMS if settings.sources.get(name) == "flag"}
        apply_session_params(settings, session)
        for name, value in flags.items():  # what the command line said wins over the file
            setattr(settings, name, value)
        return [name for name in SESSION_PARAMS if getattr(settings, name) != before[name]]

    def restore_params(self) -> None:
        if self.own_params is not None:
            for name, value in self.own_params.items():
                setattr(self.app.settings, name, value)
            self.own_params = None

    def settings_saved(self, names: list[str], folder_before: Path) -> None:
        """The Settings screen saved: saved sampling values are the user's own now; a new chats
        folder takes the open chat at once (the chats in the old one stay there)."""
        if self.own_params is not None:
            for name in names:
                if name in self.own_params:
                    self.own_params[name] = getattr(self.app.settings, name)
        if self.folder().expanduser().resolve() != folder_before.expanduser().resolve() and self.path is not None:
            self.path, self._saved, self._stamp = None, None, None
            if self.save() is not None:
                self.app.notify(f"This chat is now kept in {self.folder()}; the chats saved before stay in {folder_before}",
                                title="Chats folder changed")
