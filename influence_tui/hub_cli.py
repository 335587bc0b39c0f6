"""`influence search` and `influence download`: thin terminal front ends over influence_tui.hub."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from influence_tui import hub
from influence_tui.hub import DownloadProgress, HubError

INTERRUPTED = "download interrupted; run the same command again to resume"


def _endpoint(args: argparse.Namespace, settings: Any) -> str:
    # -r > settings.mirror (INFLUENCE_MIRROR, settings file) > HF_ENDPOINT > huggingface.co
    return hub.resolve_endpoint(getattr(args, "mirror", None) or getattr(settings, "mirror", None))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _quiet_hf_logs() -> None:
    # huggingface_hub logs each retry as a warning; our own messages say what matters.
    try:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


# -- search ----------------------------------------------------------------------------------------
def run_search(args: argparse.Namespace, settings: Any) -> int:
    _quiet_hf_logs()
    try:
        endpoint = _endpoint(args, settings)
        models = hub.search_models(
            getattr(args, "query", "") or "", limit=getattr(args, "limit", 20) or 20,
            author=getattr(args, "author", None), filter=getattr(args, "filter", None),
            sort=getattr(args, "sort", "downloads") or "downloads", endpoint=endpoint,
        )
    except HubError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("search interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps([m.to_json() for m in models], indent=2))
        return 0
    if not models:
        print(f"no models found on {endpoint}", file=sys.stderr)
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models on {endpoint}" if endpoint != hub.DEFAULT_ENDPOINT else None, box=box.SIMPLE_HEAD)
    table.add_column("model", no_wrap=True)  # ids stay whole (copy-pasteable); other columns give way
    table.add_column("downloads", justify="right", no_wrap=True, min_width=9)
    table.add_column("likes", justify="right", no_wrap=True, min_width=5)
    table.add_column("updated", no_wrap=True, min_width=10)
    console = Console()
    show_task = console.width >= 96  # on a narrow terminal the task column goes first
    if show_task:
        table.add_column("task", overflow="ellipsis", no_wrap=True)
    table.add_column("weights", no_wrap=True, min_width=11)
    for m in models:
        weights = ", ".join(f for f in ("gguf", "safetensors", "pickle") if f in m.formats) or "-"
        row = [m.repo_id + (" (gated)" if m.gated else ""), f"{m.downloads:,}", f"{m.likes:,}",
               m.last_modified.strftime("%Y-%m-%d") if m.last_modified else "-"]
        table.add_row(*row, *([m.pipeline_tag or "-"] if show_task else []), weights)
    console.print(table)
    return 0


# -- download --------------------------------------------------------------------------------------
def run_download(args: argparse.Namespace, settings: Any) -> int:
    _quiet_hf_logs()
    as_json = bool(getattr(args, "json", False))
    output = getattr(args, "output", None) or getattr(settings, "output_dir", None) or "./models"
    try:
        endpoint = _endpoint(args, settings)
        listing = hub.repo_files(args.model, getattr(args, "revision", None), endpoint)
        plan = hub.plan_download(listing, quant=getattr(args, "quant", None), file=getattr(args, "file", None))
        if plan.note and not as_json:
            print(f"note: {plan.note}", file=sys.stderr)
        reporter = _reporter(plan, as_json)
        try:
            folder = hub.download_model(args.model, output, endpoint=endpoint, plan=plan, progress=reporter.update)
        finally:
            reporter.close()
    except HubError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps({"event": "done", "path": str(folder), "repo_id": plan.repo_id, "sha": plan.sha,
                          "kind": plan.kind, "quant": plan.quant, "files": [e.name for e in plan.files],
                          "bytes": plan.total_bytes, "note": plan.note}), flush=True)
    else:
        print(f"downloaded {plan.repo_id} ({_size(plan.total_bytes)}) to {folder}")
    return 0


class _Reporter:
    def update(self, p: DownloadProgress) -> None:  # pragma: no cover - interface
        pass

    def close(self) -> None:
        pass


def _reporter(plan: hub.DownloadPlan, as_json: bool) -> _Reporter:
    if as_json:
        return _JsonReporter(sys.stdout)
    if sys.stderr.isatty():
        return _RichReporter(plan)
    return _LineReporter(sys.stderr)


class _JsonReporter(_Reporter):
    """JSON lines on stdout, at most one per second while bytes flow, one per event otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.last = out, 0.0

    def update(self, p: DownloadProgress) -> None:
        now = time.monotonic()
        if p.status == "downloading" and now - self.last < 1.0:
            return
        self.last = now
        data = {"event": "progress", **{k: getattr(p, k) for k in p.__dataclass_fields__}}
        if p.status != "done":  # the final "done" line with the path follows
            print(json.dumps(data), file=self.out, flush=True)


class _LineReporter(_Reporter):
    """Plain lines for logs and pipes: one per finished file, one every few seconds meanwhile."""

    def __init__(self, out: TextIO, every_s: float = 5.0) -> None:
        self.out, self.every, self.last = out, every_s, time.monotonic()

    def update(self, p: DownloadProgress) -> None:
        now = time.monotonic()
        if p.status == "file_done":
            print(f"[{p.files_done}/{p.files_total}] {p.file} {_size(p.file_total)} done", file=self.out, flush=True)
        elif p.status == "retrying":
            print(f"{p.file}: {p.message}", file=self.out, flush=True)
        elif p.status == "downloading" and now - self.last >= self.every:
            self.last = now
            pct = 100 * p.total_done / p.total_bytes if p.total_bytes else 100
            eta = f", {_duration(p.eta_s)} left" if p.eta_s is not None else ""
            print(f"{p.file}: {_size(p.total_done)}/{_size(p.total_bytes)} ({pct:.0f}%) "
                  f"at {_size(p.speed_bps)}/s{eta}", file=self.out, flush=True)


class _RichReporter(_Reporter):
    """A bar per file and one for the total, with bytes, speed and time left."""

    def __init__(self, plan: hub.DownloadPlan) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}", justify="left"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self.total = self.progress.add_task(f"{plan.repo_id}", total=plan.total_bytes)
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    def update(self, p: DownloadProgress) -> None:
        if p.status == "retrying":
            self.progress.console.print(f"[yellow]{p.file}: {p.message}[/]", highlight=False)
        if p.file and p.file not in self.tasks:
            self.tasks[p.file] = self.progress.add_task(f"  {p.file}", total=p.file_total)
        if p.file:
            self.progress.update(self.tasks[p.file], completed=p.file_bytes)
        self.progress.update(self.total, completed=p.total_done)

    def close(self) -> None:
        self.progress.stop()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
