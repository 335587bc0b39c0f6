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

from influence_tui.chats import chats_folder, in_folder, not_a_folder, rename_chat, save_chat
from influence_tui.sessions import SessionError, save_session
from influence_tui.tui.conversation import SESSION_PARAMS

if TYPE_CHECKING:
    from influence_tui.tui.app import InfluenceApp


Stamp = tuple[int, int]  # a file's (modification time, inode): saves replace the file, so a new inode


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def _beside(path: Path) -> Path:
    """A free name next to `path`: notes-2.json, notes-3.json…"""
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix or '.json'}")).exists():
        n += 1
    return candidate


class ChatKeeper:
    def __init__(self, app: "InfluenceApp", exit_path: str | None) -> None:
        self.app = app
        self.exit_path = Path(exit_path).expanduser() if exit_path else None  # --save-on-exit, while its chat is open
        self.path: Path | None = None  # the open chat's file in the chats folder (resolved), once written or opened
        self._saved: int | None = None  # the conversation's fingerprint when last written or opened
        self._seen: tuple[Path, Stamp | None] | None = None  # the file last read or written here, and its stamp then
        self._failed = False  # a failed save is said once per chat, not after every answer
        self.own_params: dict[str, Any] | None = None  # the user's sampling settings while a chat's apply

    def folder(self) -> Path:
        return chats_folder(self.app.settings)

    def fingerprint(self) -> int:
        """What a save would write: the conversation and the sampling settings it carries."""
        settings = self.app.settings
        return hash((self.app.conversation.fingerprint(), tuple(getattr(settings, n) for n in SESSION_PARAMS)))

    def in_sync(self) -> bool:
        """The open chat is as it was last written or opened."""
        return self.fingerprint() == self._saved

    # -- writing -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write the open chat where it is kept, if it changed since it was read or written."""
        conversation = self.app.conversation
        if not conversation.kept_messages() or self.in_sync():
            return self.exit_path or self.path
        if self.exit_path is None and not self.app.settings.save_chats:
            return None
        session = self.app.current_session()
        conversation.created_at = session.created_at  # fixed from the first save on
        target = self.exit_path or self.path
        if target is not None and self._changed_elsewhere(target):
            target = self._fork(target)
            if target is None and not self.app.settings.save_chats:
                return None
        try:
            if target is not None and target == self.exit_path:
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
        self._saved = self.fingerprint()
        self._seen = (written, _stamp(written))
        if written != self.exit_path or in_folder(written, self.folder()):  # (listed: the Chats list marks it open)
            self.path = written.resolve()
        return written

    def _changed_elsewhere(self, target: Path) -> bool:
        """Another window wrote, renamed or deleted the file since this one read or wrote it."""
        if self._seen is None or self._seen[0] != target:
            return target == self.path and not target.exists()  # (opened from the list, deleted since)
        return _stamp(target) != self._seen[1]

    def _fork(self, target: Path) -> Path | None:
        """The chat's file changed in another window: this one goes on in a new file (both kept):
        beside `--save-on-exit`'s file, or a new chat in the folder (None)."""
        gone = not target.exists()
        what = f"{target.name} was {'deleted' if gone else 'changed'} by another window since this one had it"
        if target == self.exit_path:
            self.exit_path = _beside(target)
            self.app.notify(f"{what}: this chat goes on in {self.exit_path.name}", title="Chat kept apart", timeout=10)
            return self.exit_path
        self.path = None
        where = ("goes on as a new chat in the Chats list" if self.app.settings.save_chats
                 else "is not kept from now on (save_chats is off: /save FILE keeps it)")
        self.app.notify(f"{what}: this chat {where}", title="Chat kept apart", timeout=10)
        return None

    def _writable_folder(self) -> Path:
        folder = self.folder()
        blocker = not_a_folder(folder)
        if blocker is not None:  # a file where a folder should be: say so, by name
            raise SessionError(f"cannot save the chat: {blocker} is a file, not a folder (setting chats_dir)")
        return folder

    def rename(self, title: str | None) -> None:
        """Name the open chat (/rename, the Chats list). In sync with its file, the file is renamed
        in place (its time kept: it keeps its place in the list); else the name goes with the next
        save (which keeps another window's changes apart, as any save does)."""
        conversation = self.app.conversation
        path = self.path
        if path is None or self.exit_path is not None or not self.in_sync() or self._changed_elsewhere(path):
            conversation.title = title
            self.save()
            return
        try:
            conversation.title = rename_chat(path, title or "").title
        except SessionError:  # (gone meanwhile: the next save says so)
            conversation.title = title
            return
        self._saved, self._seen = self.fingerprint(), (path, _stamp(path))

    def written_by_save(self, path: Path) -> None:
        """`/save FILE` wrote the open chat, as it is, to the file it is kept in: not another window."""
        kept = self.exit_path or self.path
        if kept is not None and path.expanduser().resolve() == kept.expanduser().resolve():
            self._saved, self._seen = self.fingerprint(), (kept, _stamp(kept))

    def set_by_user(self, name: str) -> None:
        """/set NAME: while a chat's settings apply, the value is the user's own too (what the
        Settings screen saves, and what a new chat keeps)."""
        if self.own_params is not None and name in self.own_params:
            self.own_params[name] = getattr(self.app.settings, name)

    # -- switching chats -------------------------------------------------------------------------
    def opened(self, path: str | Path) -> None:
        """A session file was loaded into the conversation: it goes on in that file when it is one
        of the chats folder (the Chats list, `--continue`), else as a new chat there once it changes."""
        resolved = Path(path).expanduser().resolve()
        self.path = resolved if in_folder(resolved, self.folder()) else None
        self._saved = self.fingerprint()  # (after its sampling settings were applied: see apply_params)
        kept = self.exit_path if self.exit_path is not None and self.exit_path.resolve() == resolved else self.path
        self._seen = (kept, _stamp(resolved)) if kept is not None else None
        self._failed = False

    def leave(self, deleted: bool = False) -> None:
        """Before another chat takes the screen: this one written (unless its file was just
        deleted), `--save-on-exit` done with (it was for the chat the app started with), and the
        user's own sampling settings back."""
        if not deleted:
            self.save()
        if self.exit_path is not None:
            if self.app.conversation.kept_messages() and not deleted:
                then = ("new ones go to the Chats list" if self.app.settings.save_chats
                        else "new ones are not kept (save_chats is off: /save FILE keeps one)")
                self.app.notify(f"That chat is kept in {self.exit_path} (--save-on-exit); {then}", title="Chat kept")
            self.exit_path = None
        self.path, self._saved, self._seen, self._failed = None, None, None, False
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
        """The Settings screen saved `names` (those edited there): those sampling values are the
        user's own now; a new chats folder takes the open chat at once (the old one's chats stay)."""
        for name in names:
            self.set_by_user(name)
        if self.folder() != folder_before and self.path is not None and self.exit_path is None:
            self.path, self._saved, self._seen = None, None, None
            if self.save() is not None:
                self.app.notify(f"This chat is now kept in {self.folder()}; the chats saved before stay in {folder_before}",
                                title="Chats folder changed")
