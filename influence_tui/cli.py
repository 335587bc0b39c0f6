"""The `influence` command. Parses arguments and hands off to the module that does the work.

Nothing heavy is imported here: `influence --help` and `influence list` never import torch or
transformers; the app's first frame paints before the engine is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from influence_tui import __version__
from influence_tui.config import ConfigError, Settings, env_flag

EPILOG = "Settings come from flags, then INFLUENCE_* environment variables, then ./.env, then the settings file (see `influence config`)."


class UserError(Exception):
    """An error to show as one line (exit code 1)."""


def _gen_flags(p: argparse.ArgumentParser, chat: bool = False, sub: bool = True) -> None:
    """The generation flags, on the main parser (sub=False) and on each command that takes them.
    A command's copies set nothing when absent (SUPPRESS): `influence --temperature 0 generate hi`
    keeps the 0 given before the command instead of the command's own default overwriting it."""
    g = _SuppressedGroup(p.add_argument_group("model and generation"), sub)
    g.add_argument("-m", "--model-path", help="model folder, .gguf file or a name from `influence list` (default: INFLUENCE_MODEL_PATH, else the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--device", help="auto | cpu | cuda | mps (default: auto)")
    g.add_argument("--device-index", type=str, help="GPU index when there are several")
    g.add_argument("--threads", type=str, help="CPU threads for inference (default: one per core)")
    g.add_argument("--ctx-size", "--context-length", dest="context_length", type=str,
                   help="context per request in tokens (default: the model's, at most 4096)")
    g.add_argument("--max-tokens", type=str, help="maximum tokens to generate (default 512)")
    g.add_argument("--temperature", type=str, help="0-2, 0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=str, help="0-1 (default 0.9)")
    g.add_argument("--top-k", type=str, help="top-k sampling (default off)")
    g.add_argument("--min-p", type=str, help="0-1 (default 0 = off)")
    g.add_argument("--repeat-penalty", type=str, help="repetition penalty, 1 or 0 = off (default 1.1)")
    g.add_argument("--seed", type=str, help="random seed: same seed and input, same text (-1: a new one each time)")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--think", metavar="on|off",
                   help="reasoning models (DeepSeek-R1 and kin) think before they answer, their reasoning kept apart (default on)")
    if not chat:
        # a command's --stop collects apart, then joins the ones given before it (see main)
        g.add_argument("--stop", action="append", dest="stop_after" if sub else "stop",
                       help="stop string (repeatable; not printed)")
        g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence (benchmarks)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _SuppressedGroup:
    """An argument group whose arguments default to SUPPRESS (when `suppress`)."""

    def __init__(self, group: Any, suppress: bool) -> None:
        self.group, self.suppress = group, suppress

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        if self.suppress:
            kwargs["default"] = argparse.SUPPRESS
        return self.group.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Privacy-first local LLM inference. With no command, opens the full-screen app.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"influence {__version__}")
    parser.add_argument("--batch", metavar="FILE", help="run every prompt of FILE (plain lines or JSONL; - for stdin) and print JSONL results")
    parser.add_argument("--output", metavar="FILE", help="with --batch: write results here instead of stdout (- for stdout)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    _gen_flags(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("search", help="search the Hugging Face Hub for models", epilog=EPILOG)
    p.add_argument("query", nargs="?", default="", help="words to search for")
    p.add_argument("--limit", type=_positive_int, default=20, help="number of results (default 20)")
    p.add_argument("--author", help="only models of this user or organisation")
    p.add_argument("--filter", help="a Hub tag, e.g. gguf, text-generation")
    p.add_argument("--sort", choices=("downloads", "likes", "updated"), default="downloads")
    p.add_argument("-r", "--mirror", help="Hub endpoint or mirror (default: INFLUENCE_MIRROR, HF_ENDPOINT, huggingface.co)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    p = sub.add_parser("download", help="download a model from the Hub (resumes interrupted downloads)", epilog=EPILOG)
    p.add_argument("-m", "--model", required=True, help="repo id, e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("-o", "--output", help="models folder (default: INFLUENCE_OUTPUT_DIR, ./models)")
    p.add_argument("-r", "--mirror", help="Hub endpoint or mirror")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quant", help="from a GGUF repo: the quantization to fetch (default Q4_K_M, else the nearest)")
    which.add_argument("--file", help="fetch this one file of the repo")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print progress and the result as JSON lines")

    p = sub.add_parser("list", help="list the models on this disk", epilog=EPILOG)
    p.add_argument("--models-dir", help="models folder (default: INFLUENCE_OUTPUT_DIR, ./models)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p.add_argument("--all", action="store_true", help="also list the models that cannot be used here, and why")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout", epilog=EPILOG)
    p.add_argument("prompt", help="the prompt (- reads stdin)")
    _gen_flags(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    p.add_argument("--suffix", help="fill in the middle: the prompt is the code before the gap and SUFFIX the code after "
                                    "it (a code model with fill-in-the-middle tokens)")
    p.add_argument("--logprobs", type=int, metavar="N", help="with --json: each token's log-probability and its N (0-20) "
                                                             "most likely alternatives")
    p.add_argument("--format", metavar="json|SCHEMA",
                   help="answer with one JSON object (each token checked as it is picked); a JSON schema "
                        "(a file, or the JSON itself) makes the answer follow it")
    p.add_argument("--hide-thinking", action="store_true",
                   help="do not show a reasoning model's thinking (shown on stderr, apart from the answer on stdout)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object with the text and timings")

    p = sub.add_parser("chat", help="open the app on the chat screen", epilog=EPILOG)
    _gen_flags(p, chat=True)
    first = p.add_mutually_exclusive_group()
    first.add_argument("--session", metavar="FILE", help="load this session file first (or a saved chat, by the file "
                                                         "name `influence chats` lists)")
    first.add_argument("-c", "--continue", dest="resume", action="store_true",
                       help="reopen the most recent saved chat (see `influence chats`)")
    p.add_argument("--save-on-exit", metavar="FILE", help="save the session to FILE however the app ends")

    p = sub.add_parser("chats", help="list the app's saved chats, newest first", epilog=EPILOG)
    p.add_argument("words", nargs="*", help="only the chats whose title or messages hold all these words")
    p.add_argument("--limit", type=_positive_int, help="at most this many")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    for name in ("serve", "deploy"):
        p = sub.add_parser(name, help="run the local API server (Ollama- and OpenAI-compatible)" + (" (alias of serve)" if name == "deploy" else ""), epilog=EPILOG)
        p.add_argument("-m", "--model-path", default=argparse.SUPPRESS, help="model to serve (default: INFLUENCE_MODEL_PATH, else the bundled one)")
        p.add_argument("--host", help="bind address (default 127.0.0.1)")
        p.add_argument("-p", "--port", type=str, help="port (default INFLUENCE_PORT, 8080)")
        # flags the main parser has too: SUPPRESS keeps one given before the command (see _gen_flags)
        p.add_argument("--device", default=argparse.SUPPRESS, help="auto | cpu | cuda | mps")
        p.add_argument("--device-index", type=str, default=argparse.SUPPRESS, help="GPU index")
        p.add_argument("--threads", type=str, default=argparse.SUPPRESS, help="CPU threads for inference (default: one per core)")
        p.add_argument("--ctx-size", "--context-length", dest="context_length", type=str, default=argparse.SUPPRESS,
                       help="context per request in tokens (default: the model's, at most 4096)")
        p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY')")
        p.add_argument("--cors", action="append", metavar="ORIGIN", help="allow this browser origin (repeatable)")
        p.add_argument("--detached", action="store_true", help="run in the background (pid and log files)")
        p.add_argument("--stop", action="store_true", help="stop a detached server")
        p.add_argument("--status", action="store_true", help="show whether a detached server runs")

    p = sub.add_parser("embed", help="print embeddings of texts as JSON", epilog=EPILOG)
    p.add_argument("texts", nargs="+", help="texts to embed (- reads one text from stdin)")
    p.add_argument("-m", "--model-path", default=argparse.SUPPRESS, help="embedding model (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default=argparse.SUPPRESS, help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=str, default=argparse.SUPPRESS, help="CPU threads (default: one per core)")

    p = sub.add_parser("config", help="show every setting, its value and where it came from", epilog=EPILOG)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p.add_argument("--show-secrets", action="store_true", help="print the API key instead of stars")
    return parser


_FLAG_SETTINGS = (
    "model_path", "device", "device_index", "threads", "context_length", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "repeat_penalty", "seed", "think", "host", "port", "api_key",
)


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {name: getattr(args, name, None) for name in _FLAG_SETTINGS}
    if getattr(args, "command", None) in ("download", "search"):
        flags["mirror"] = getattr(args, "mirror", None)
        if args.command == "download":
            flags["output_dir"] = getattr(args, "output", None)
    if getattr(args, "command", None) == "list":
        flags["output_dir"] = getattr(args, "models_dir", None)
    if getattr(args, "system", None) is not None:  # --system "" clears a system prompt set lower down
        flags["system_prompt"] = args.system
    return Settings.load(flags)


def _not_yet(what: str) -> Callable[..., int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        print(f"error: `influence {what}` is not available yet in this version", file=sys.stderr)
        return 2

    return run


def _handler(command: str | None, args: argparse.Namespace) -> Callable[[argparse.Namespace, Settings], int]:
    # Imports happen here, per command, so that nothing heavy loads for --help or list.
    if args.batch:
        from influence_tui.engine_cli import run_batch

        return run_batch
    if command == "list":
        from influence_tui.library_cli import run_list

        return run_list
    if command == "config":
        return run_config
    if command == "chats":
        from influence_tui.chats_cli import run_chats

        return run_chats
    if command in ("search", "download"):
        try:
            from influence_tui import hub_cli
        except ImportError:
            return _not_yet(command)
        return hub_cli.run_search if command == "search" else hub_cli.run_download
    if command in ("generate", "embed"):
        try:
            from influence_tui import engine_cli
        except ImportError:
            return _not_yet(command)
        return engine_cli.run_generate if command == "generate" else engine_cli.run_embed
    if command in ("serve", "deploy"):
        try:
            from influence_tui.server.cli import run_serve
        except ImportError:
            return _not_yet(command)
        return run_serve
    try:
        from influence_tui.tui.launch import run_app
    except ImportError:
        return _not_yet("chat")
    return run_app


def run_config(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from influence_tui.config import settings_file

    from influence_tui.chats import chats_folder

    rows = settings.rows(reveal=args.show_secrets)
    if args.json:
        print(json.dumps({"settings_file": str(settings_file()), "chats_folder": str(chats_folder(settings)),
                          "settings": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="influence settings")
    for col in ("setting", "value", "source"):
        table.add_column(col)
    for row in rows:
        value = row["value"]
        shown = "" if value is None else ("on" if value else "off") if isinstance(value, bool) else str(value)
        table.add_row(row["env"], shown, row["source"])
    console = Console()
    console.print(table)
    # on its own line, never wrapped: a path to copy
    console.print(f"settings file: {settings_file()}", soft_wrap=True, highlight=False)
    console.print(f"chats folder: {chats_folder(settings)}", soft_wrap=True, highlight=False)
    return 0


def _warn_threads(settings: Settings) -> None:
    from influence_tui.engine.governor import usable_cpus  # no torch: a plain module

    if settings.threads and settings.threads > usable_cpus():
        source = settings.sources.get("threads", "")
        print(f"warning: {settings.threads} threads (set by {source}) is more than the {usable_cpus()} CPUs here: "
              f"using {usable_cpus()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    after = vars(args).pop("stop_after", None)
    if after:  # `influence --stop A generate x --stop B`: both
        args.stop = (getattr(args, "stop", None) or []) + after
    if args.output and not args.batch and args.command != "download":  # (download's own -o/--output)
        parser.error("--output goes with --batch (it names the results file)")
    if args.batch and args.command:
        parser.error(f"--batch runs on its own: leave out the `{args.command}` command")
    try:
        settings = settings_from_args(args)
        _warn_threads(settings)
        handler = _handler(args.command, args)
        return int(handler(args, settings) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        # Leave without the interpreter's teardown: the engine's worker thread may be inside torch
        # (converting a GGUF on first load), and finalizing under it aborts the process (SIGABRT,
        # "terminate called without an active exception") instead of exiting 130.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # user-facing errors from the engine, hub, library: one line, no traceback
        if env_flag("INFLUENCE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
