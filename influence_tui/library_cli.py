"""`influence list`: the library as a table or JSON."""

from __future__ import annotations

import argparse
import json

from influence_tui.config import Settings
from influence_tui.library import human_params, human_size, list_models


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    models = list_models(settings.output_dir, configured=settings.model_path)
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    # a pipe gets rich's 80 columns by default: give the table room instead of folding names
    console = Console(width=None if Console().is_terminal else 140)
    if not models:
        console.print(f"No models found in {settings.output_dir}. Try `influence search` and `influence download`.")
        return 0
    # the table lists what can be loaded; --all adds the rest with the reason each cannot
    hidden = [] if args.all else [m for m in models if not m.usable]
    models = [m for m in models if m not in hidden]
    table = Table(title=f"models ({settings.output_dir}, Hugging Face cache, Ollama, LM Studio, bundled)")
    for col in ("name", "source", "format", "quant", "arch", "params", "context", "size", "files", "can", "status"):
        table.add_column(col, no_wrap=col != "status")
    for m in models:
        status = "[green]ok[/]" if m.usable else f"[red]unusable[/]: {m.reason}"
        table.add_row(
            m.name,
            m.source,
            m.format,
            m.quantization,
            m.architecture,
            human_params(m.parameters),
            str(m.context_length or "?"),
            human_size(m.size_bytes),
            str(m.file_count),
            " ".join("chat" if c == "completion" else c for c in m.capabilities),
            status,
        )
    if models:
        console.print(table)
    if hidden:
        what = "model cannot" if len(hidden) == 1 else "models cannot"
        console.print(f"{len(hidden)} more {what} be used here (`influence list --all` shows why).")
    return 0
