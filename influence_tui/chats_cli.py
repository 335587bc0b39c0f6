"""`influence chats`: the app's saved chats as a table or JSON (open one with `influence chat
--session FILE`, the latest with `influence chat --continue`)."""

from __future__ import annotations

import argparse
import json
import sys

from influence_tui.chats import ago, chats_folder, list_chats, model_name
from influence_tui.config import Settings


def run_chats(args: argparse.Namespace, settings: Settings) -> int:
    folder = chats_folder(settings)
    entries, problems = list_chats(folder)
    if args.words:
        entries = [e for e in entries if e.matches(" ".join(args.words))]
    if args.limit:
        entries = entries[: args.limit]
    for problem in problems:  # files there that are not chats: named, not fatal
        print(f"warning: skipped {problem}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=None if Console().is_terminal else 140)
    if not entries:
        what = "matches" if args.words else "is saved"
        console.print(Text(f"No chat {what} in {folder}."
                           + ("" if settings.save_chats else " (save_chats is off: the app does not keep chats)")))
        return 0
    table = Table(title=Text("chats"))
    table.add_column("updated", no_wrap=True)
    table.add_column("title", min_width=24, ratio=2)
    table.add_column("messages", justify="right", no_wrap=True)
    table.add_column("model", max_width=32, overflow="ellipsis", no_wrap=True)
    table.add_column("file", overflow="fold")  # a name to copy: folded, never cut
    for e in entries:
        table.add_row(ago(e.modified), Text(e.title), str(e.messages), Text(model_name(e.model)), Text(e.path.name))
    console.print(table)
    console.print(Text(f"in {folder}\nopen one: influence chat --session FILE · the latest: influence chat --continue"),
                  soft_wrap=True, highlight=False)
    return 0
