"""How long a key press takes to show while a search runs.

``python -m workbench.tui.latency SPEC.yml [--presses 20] [--runs-dir DIR]`` starts the UI
headless (Textual's test driver, 120x40), starts the search of SPEC.yml, waits for its first
candidate, then presses `s` (sort the candidates table) every 0.1 s and measures, for each press,
the time to its handler and to the next screen update after it; then it stops the search and
measures the same with nothing running. Prints one JSON line. tests/test_tui.py runs the same
measurement on tiny models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


class PaintSpy:
    """Records the time of every screen update the app computes (also when headless)."""

    def __init__(self, app) -> None:
        self.times: list[float] = []
        self._display = app._display
        app._display = self

    def __call__(self, screen, renderable) -> None:
        if renderable is not None:
            self.times.append(time.perf_counter())
        return self._display(screen, renderable)


async def press_and_time(app, table, spy: PaintSpy, presses: int, check=None) -> tuple[list[float], list[float]]:
    """Press `s` on the candidates table ``presses`` times; (to handler, to screen update) in seconds."""
    from textual import events

    to_handler, to_paint = [], []
    for _ in range(presses):
        await asyncio.sleep(0.1)
        if check is not None:
            check()
        n = len(table.key_times)
        t0 = time.perf_counter()
        key = events.Key("s", "s")
        key.set_sender(app)
        app._driver.send_message(key)  # as a terminal's key press
        deadline = t0 + 10
        while len(table.key_times) == n or not spy.times or spy.times[-1] < table.key_times[-1]:
            if time.perf_counter() > deadline:
                raise TimeoutError("no handler or no screen update within 10 s of a key press")
            await asyncio.sleep(0.001)
        to_handler.append(table.key_times[-1] - t0)
        to_paint.append(next(p for p in spy.times if p >= table.key_times[-1]) - t0)
    return to_handler, to_paint


def summary(xs: list[float]) -> dict:
    p90 = sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))]
    return {"median_ms": round(1e3 * statistics.median(xs), 1), "p90_ms": round(1e3 * p90, 1),
            "max_ms": round(1e3 * max(xs), 1), "n": len(xs)}


async def measure(spec: Path, runs_dir: Path, presses: int = 20, size=(120, 40), timeout: float = 600) -> dict:
    from textual.widgets import DataTable, Input

    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import load_config

    config = load_config()
    config.runs_dir = runs_dir
    app = WorkbenchApp(config)
    async with app.run_test(size=size) as pilot:
        spy = PaintSpy(app)
        screen = app.screen
        table = screen.query_one("#candidates", DataTable)
        screen.query_one("#spec-path", Input).value = str(spec)
        await pilot.press("ctrl+r")
        deadline = time.monotonic() + timeout
        while table.row_count < 1:
            if time.monotonic() > deadline or screen.phase == "failed":
                raise RuntimeError(f"the search did not start (phase {screen.phase})")
            await pilot.pause(0.05)
        table.focus()
        table.move_cursor(column=3)
        await pilot.pause()

        def running() -> None:
            if screen.phase != "running":
                raise RuntimeError(f"the search ended before the measurement did (phase {screen.phase})")

        busy = await press_and_time(app, table, spy, presses, running)
        candidates = table.row_count
        lag = list(screen.message_lag)
        await pilot.press("ctrl+b")
        while screen.phase != "stopped":
            await pilot.pause(0.05)
        idle = await press_and_time(app, table, spy, max(5, presses // 2))
    return {"during_search": {"to_handler": summary(busy[0]), "to_screen_update": summary(busy[1]),
                              "worker_message_to_handler": summary(lag), "candidates_scored": candidates},
            "idle": {"to_handler": summary(idle[0]), "to_screen_update": summary(idle[1])}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.tui.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", type=Path)
    p.add_argument("--presses", type=int, default=20)
    p.add_argument("--runs-dir", type=Path, default=None, help="where the run goes (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(args.spec, args.runs_dir or Path(tmp), args.presses))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
