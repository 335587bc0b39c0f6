"""`influence` and `influence chat`: build the app from the parsed flags and run it.

`--save-on-exit` saves however the app ends: a normal quit, /quit, an exception, or SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from influence_tui.config import Settings


def build_app(args: argparse.Namespace, settings: Settings) -> Any:
    from influence_tui.tui.app import InfluenceApp

    return InfluenceApp(
        settings,
        model=getattr(args, "model_path", None) or settings.model_path,
        session_path=getattr(args, "session", None),
        continue_latest=bool(getattr(args, "resume", False)),
        save_on_exit=getattr(args, "save_on_exit", None),
    )


def run_app(args: argparse.Namespace, settings: Settings) -> int:
    app = build_app(args, settings)

    def on_signal(signum: int, frame: Any) -> None:
        app.save_on_exit()  # first, in case the exit below does not get to run
        app.exit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, on_signal)
    try:
        code = app.run()
    finally:
        app.save_on_exit()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if app.engine is not None:
            try:
                app.engine.shutdown()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
    return int(code or app.return_code or 0)
