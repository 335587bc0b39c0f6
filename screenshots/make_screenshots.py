"""Write an SVG of each screen of the app, running headless, into screenshots/.

    python screenshots/make_screenshots.py            # 120x36 by default
    python screenshots/make_screenshots.py --size 100x30

Uses the snapshot app (tests/snapshot_app.py): a fixed conversation, model list and Hub answers,
so the pictures do not depend on this machine and no model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


async def shoot(size: tuple[int, int], out: Path) -> list[Path]:
    from snapshot_app import make_app

    app = make_app()
    written: list[Path] = []

    def save(name: str) -> None:
        written.append(Path(app.save_screenshot(f"{name}.svg", str(out))))

    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        from influence_tui.tui.widgets.messages import AssistantMessage

        # what a live answer ends with (history answers carry no timings)
        app.screen.query(AssistantMessage).last().stats.update(
            "38 tokens · 41.7 tok/s · first token 0.09s · context 112/8192")
        await pilot.pause()
        save("chat")
        await pilot.press("ctrl+o")
        await app.workers.wait_for_complete()
        await pilot.pause()
        save("chats")
        await pilot.press("escape", "f1")
        await pilot.pause()
        save("help")
        await pilot.press("escape", "f3")
        await pilot.pause()
        await pilot.press(*"smollm2", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        save("hub")
        await pilot.press("f4")
        await app.workers.wait_for_complete()
        await pilot.pause()
        save("library")
        await pilot.press("f5")
        await pilot.pause()
        save("settings")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal size, COLSxROWS")
    parser.add_argument("--out", default=str(HERE), help="folder for the SVG files")
    args = parser.parse_args()
    cols, rows = (int(n) for n in args.size.lower().split("x"))
    for path in asyncio.run(shoot((cols, rows), Path(args.out))):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
