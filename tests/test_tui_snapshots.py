"""Snapshots of every screen at 120x40 (SVG, as Textual exports them) in tests/snapshots/.

A snapshot is compared after removing the random id Rich puts in SVG class names. To accept a
change after looking at it: ``WORKBENCH_UPDATE_SNAPSHOTS=1 pytest tests/test_tui_snapshots.py``
(the SVGs open in a browser). They are skipped under another Textual version than the one that
took them (tests/snapshots/textual-version.txt), since Textual's rendering changes between versions.

(pytest-textual-snapshot would do the same but pins syrupy 4.8, which requires pytest < 9.)
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

textual = pytest.importorskip("textual")
pytest.importorskip("pytest_asyncio")

from textual.widgets import Input, RichLog, TextArea

from workbench.tui.app import WorkbenchApp
from workbench.tui.config import TuiConfig

SNAPSHOTS = Path(__file__).parent / "snapshots"
VERSION_FILE = SNAPSHOTS / "textual-version.txt"
UPDATE = os.environ.get("WORKBENCH_UPDATE_SNAPSHOTS") == "1"
# fixed paths: they show on screen (runs dir, zoo paths), so they must not vary between runs
HOME = Path("/tmp/workbench-tui-snapshots/home")
RUNS = Path("/tmp/workbench-tui-snapshots/runs")


def normalize(svg: str) -> str:
    return re.sub(r"\bterminal-\d+-", "terminal-", svg)


@pytest.fixture
def fixed_home(monkeypatch, tmp_path):
    if not UPDATE:
        if not VERSION_FILE.is_file():
            pytest.skip("no snapshots yet: take them with WORKBENCH_UPDATE_SNAPSHOTS=1")
        taken = VERSION_FILE.read_text().strip()
        if taken != textual.__version__:
            pytest.skip(f"snapshots were taken with textual {taken}, this is {textual.__version__}")
    shutil.rmtree(HOME.parent, ignore_errors=True)
    HOME.mkdir(parents=True)
    monkeypatch.setenv("WORKBENCH_HOME", str(HOME))
    monkeypatch.chdir(tmp_path)  # no recipes/ here: only the checkout's examples are listed (collapsed)
    yield
    shutil.rmtree(HOME.parent, ignore_errors=True)


async def screenshot(mode: str) -> str:
    app = WorkbenchApp(TuiConfig(runs_dir=RUNS))
    async with app.run_test(size=(120, 40)) as pilot:
        if mode != "search":
            await app.switch_mode(mode)
        await app.workers.wait_for_complete()
        await pilot.pause()
        for widget in app.screen.query(Input).results():
            widget.cursor_blink = False
        for widget in app.screen.query(TextArea).results():
            widget.cursor_blink = False
        for log in app.screen.query(RichLog).results():
            log.clear()  # its lines carry the time of day
        await pilot.pause()
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()
        return normalize(app.export_screenshot(title="workbench"))


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["search", "models", "recipe", "runs", "export", "quantize", "qsearch"])
async def test_screen_snapshot(mode, fixed_home):
    if mode == "models" and importlib.util.find_spec("workbench.zoo") is None:
        pytest.skip("the Models snapshot shows the zoo's table; this checkout has no workbench.zoo")
    svg = await screenshot(mode)
    path = SNAPSHOTS / f"{mode}.svg"
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg)
        VERSION_FILE.write_text(textual.__version__ + "\n")
        return
    assert path.is_file(), f"{path} missing: take it with WORKBENCH_UPDATE_SNAPSHOTS=1"
    if svg != path.read_text():
        got = Path(os.environ.get("TMPDIR", "/tmp")) / f"workbench-tui-{mode}.svg"
        got.write_text(svg)
        pytest.fail(f"the {mode} screen changed: compare {got} with {path}; if the change is wanted, "
                    f"update with WORKBENCH_UPDATE_SNAPSHOTS=1")
