"""Slash commands of the chat prompt: the table, parsing, validation and completion.

Pure functions, so the rules are tested without an app; the Chat screen runs the parsed command.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> (argument hint, help); the order is the order of /help.
COMMANDS: dict[str, tuple[str, str]] = {
    "/help": ("", "list the commands"),
    "/new": ("", "start a new chat (this one stays in the Chats list)"),
    "/chats": ("", "open, search, rename or delete the saved chats (ctrl+o)"),
    "/rename": ("[TITLE]", "name this chat in the Chats list (no title: its first question)"),
    "/clear": ("", "start over with the same system prompt (the chat before stays in the Chats list)"),
    "/history": ("", "show the conversation so far"),
    "/save": ("FILE", "save the session as JSON (FILE.md: a Markdown transcript to read or share)"),
    "/load": ("FILE", "load a session file (this tool's or the original tool's)"),
    "/set": ("NAME VALUE", "set temperature, top_p, top_k, min_p, repeat_penalty, max_tokens, seed, "
                           "or think on/off (whether a reasoning model thinks first)"),
    "/system": ("[TEXT]", "set the system prompt (no text: show it)"),
    "/model": ("NAME", "load another model (a name from the Library, an alias or a path)"),
    "/retry": ("", "answer the last message again"),
    "/edit": ("", "take back the last question (and its answer) into the prompt, to change and send again"),
    "/copy": ("[code]", "copy the last answer (or its last code block) to the clipboard"),
    "/quit": ("", "leave the app"),
    "/exit": ("", "leave the app"),
}
SETTABLE = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed", "think")
NEEDS_ARG = {"/save", "/load", "/set", "/model"}
NO_ARG = {"/help", "/new", "/chats", "/clear", "/history", "/retry", "/edit", "/quit", "/exit"}


class SlashError(ValueError):
    """A wrong command or argument (message is one user-facing line)."""


@dataclass
class Slash:
    name: str  # "/set"
    arg: str  # the rest of the line, stripped


def is_command(text: str) -> bool:
    return text.lstrip().startswith("/") and not text.lstrip().startswith("//")


def parse(text: str) -> Slash:
    """Split and check a command line; raise SlashError with what is wrong and what is allowed."""
    head, _, arg = text.strip().partition(" ")
    name, arg = head.lower(), arg.strip()
    if name not in COMMANDS:
        near = complete(name)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise SlashError(f"unknown command {head}.{hint} Type /help for the list.")
    if name in NEEDS_ARG and not arg:
        raise SlashError(f"{name} needs {COMMANDS[name][0]}: {COMMANDS[name][1]}")
    if name in NO_ARG and arg:
        raise SlashError(f"{name} takes no argument")
    if name == "/copy" and arg not in ("", "code"):
        raise SlashError("/copy takes no argument, or `code` for the last code block")
    if name == "/set":
        parse_set(arg)
    return Slash(name, arg)


def parse_set(arg: str) -> tuple[str, str]:
    parts = arg.split()
    if len(parts) != 2:
        raise SlashError(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}")
    name, value = parts[0].lower().replace("-", "_"), parts[1]
    if name not in SETTABLE:
        raise SlashError(f"/set: unknown setting {parts[0]!r}; one of {', '.join(SETTABLE)}")
    return name, value


def complete(prefix: str) -> list[str]:
    """Commands (or /set names) that begin with what is typed."""
    text = prefix.lstrip().lower()
    if text.startswith("/set "):
        rest = text[5:]
        if " " in rest:
            return []
        return [f"/set {n} " for n in SETTABLE if n.startswith(rest)]
    if " " in text:
        return []
    return [name for name in COMMANDS if name.startswith(text)]


def help_text() -> str:
    lines = ["| command | what it does |", "|---|---|"]
    for name, (hint, text) in COMMANDS.items():
        lines.append(f"| `{name}{' ' + hint if hint else ''}` | {text} |")
    return "\n".join(lines)


def last_code_block(markdown: str) -> str | None:
    """The body of the last fenced code block of an answer, if it has one."""
    blocks: list[str] = []
    inside, current, fence = False, [], ""
    for line in markdown.splitlines():
        stripped = line.strip()
        if not inside and stripped.startswith(("```", "~~~")):
            inside, current, fence = True, [], stripped[:3]
        elif inside and stripped.startswith(fence):
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    if inside and current:  # an unclosed fence at the end (a stopped answer)
        blocks.append("\n".join(current))
    return blocks[-1] if blocks else None
