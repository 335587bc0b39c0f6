"""One snapshot per screen (pytest-textual-snapshot). `pytest --snapshot-update` accepts changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

APP = Path(__file__).parent / "snapshot_app.py"
SIZE = (110, 34)


def test_chat_screen(snap_compare: Any) -> None:
    assert snap_compare(APP, terminal_size=SIZE)


def test_chat_slash_hint(snap_compare: Any) -> None:
    assert snap_compare(APP, press=["/", "s"], terminal_size=SIZE)


def test_help_screen(snap_compare: Any) -> None:
    assert snap_compare(APP, press=["f1"], terminal_size=SIZE)


def test_library_screen(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.press("f4")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.3)  # the files table measures its columns on the next idle

    assert snap_compare(APP, run_before=run_before, terminal_size=SIZE)


def test_library_confirm_delete(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.press("f4")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("down", "d")
        await pilot.pause()

    assert snap_compare(APP, run_before=run_before, terminal_size=SIZE)


def test_settings_screen(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.press("f5")
        await pilot.pause()
        pilot.app.screen.query_one("#set-temperature").value = "3"  # shows the reason under the field
        await pilot.pause()

    assert snap_compare(APP, run_before=run_before, terminal_size=SIZE)


def test_hub_screen(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.press("f3")
        await pilot.pause()
        await pilot.press(*"smollm2", "enter")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.3)  # the files table measures its columns on the next idle

    assert snap_compare(APP, run_before=run_before, terminal_size=SIZE)


def test_chats_list(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.press("ctrl+o")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(APP, run_before=run_before, terminal_size=SIZE)
