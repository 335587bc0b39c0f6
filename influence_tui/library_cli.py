"""`influence list`: the library as a table or JSON."""

from __future__ import annotations

import argparse
import json

from influence_tui.config import Settings
from influence_tui.library import human_params, human_size, list_models


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    models = list_models(settings.output_dir)
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
    table = Table(title=f"models ({settings.output_dir}, Hugging Face cache, Ollama, LM Studio, bundled)")
    for col in ("name", "source", "format", "quant", "arch", "params", "context", "size", "files", "status"):
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
            status,
        )
    console.print(table)
    return 0
