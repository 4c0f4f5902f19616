"""Acceptance of the terminal workbench as a person would try it (issue 5), driven through tmux.

    python tests/bench/tui_acceptance.py [--out DIR] [--keep]

1. clone this repository (HEAD) into a temporary directory: a fresh clone;
2. start ``make run`` there inside a detached tmux session (160x48), which creates ``.venv``,
   installs, prepares the default model and opens the app on its Search screen;
3. press Start (ctrl+r) on the default spec (``recipes/zoo-quick-search.yml``: the zoo must be
   built in the workbench home, ``workbench zoo build``), and capture the screen while the search
   runs, after each generation, until two generations are complete;
4. press Save recipe (ctrl+s): the incumbent goes to ``recipes/zoo-quick-best.yml`` in the clone;
5. quit (ctrl+q), then merge the saved recipe with ``workbench merge`` and load the result with
   transformers.

The screens (plain text, as ``tmux capture-pane`` gives them) and a ``summary.json`` go to
``--out`` (default ``tui-acceptance/`` here). The workbench home is the caller's
(``WORKBENCH_HOME`` or ``~/.cache/workbench``), so models and the zoo are not rebuilt. Exit
status 0 when every step passed. Not a unit test: it takes minutes and needs tmux.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SESSION = "wb-acceptance"
WIDTH, HEIGHT = 160, 48


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-t", SESSION)


def wait_for(pattern: str, timeout_s: float, what: str) -> re.Match:
    """Poll the pane until ``pattern`` shows; fail with the last screen after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = screen()
        m = re.search(pattern, text)
        if m:
            return m
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}; last screen:\n{text}")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("tui-acceptance"))
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    p.add_argument("--setup-timeout", type=float, default=1200, help="seconds for make run to open the app")
    args = p.parse_args(argv)
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is not installed")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wb-accept-"))
    clone = work / "workbench"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    summary: dict = {"clone": str(clone), "commit": subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    env = f"WORKBENCH_HOME={os.environ['WORKBENCH_HOME']} " if os.environ.get("WORKBENCH_HOME") else ""
    t0 = time.monotonic()
    tmux("new-session", "-d", "-s", SESSION, "-x", str(WIDTH), "-y", str(HEIGHT),
         f"cd {clone} && {env}TERM=xterm-256color make run; echo MAKE-RUN-EXITED; sleep 600")
    try:
        wait_for(r"idle · generation 0/", args.setup_timeout, "the Search screen")
        summary["setup_to_app_s"] = round(time.monotonic() - t0, 1)
        if "recipes/zoo-quick-search" not in screen():
            raise SystemExit("the default spec is not selected: build the zoo first (workbench zoo build)\n"
                             + screen())
        (out / "01-search-idle.txt").write_text(screen())

        tmux("send-keys", "-t", SESSION, "C-r")   # Start
        started = time.monotonic()
        shots = []
        for gen in (1, 2):
            wait_for(rf"generation {gen}/\d+", 900, f"generation {gen} to complete")
            time.sleep(1.0)
            name = f"{2 + gen:02d}-search-running-gen{gen}.txt"
            (out / name).write_text(screen())
            shots.append(name)
        summary["two_generations_s"] = round(time.monotonic() - started, 1)

        tmux("send-keys", "-t", SESSION, "C-s")   # Save recipe
        wait_for(r"incumbent recipe saved", 60, "the saved-recipe message")
        (out / "05-recipe-saved.txt").write_text(screen())
        tmux("send-keys", "-t", SESSION, "C-q")   # Quit
        wait_for(r"MAKE-RUN-EXITED", 120, "the app to quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)

    recipe = clone / "recipes" / "zoo-quick-best.yml"
    if not recipe.is_file():
        raise SystemExit(f"no saved recipe at {recipe}")
    shutil.copy(recipe, out / "zoo-quick-best.yml")
    merged = work / "merged"
    t1 = time.monotonic()
    subprocess.run([str(clone / ".venv/bin/workbench"), "merge", str(recipe), str(merged), "--no-progress"],
                   check=True, cwd=clone)
    summary["merge_s"] = round(time.monotonic() - t1, 1)
    check = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
             "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
             "ids = t('What is 12 + 30?', return_tensors='pt').input_ids; "
             "print(m(ids).logits.shape[-1] == m.config.vocab_size and bool(torch.isfinite(m(ids).logits).all()))")
    ok = subprocess.run([str(clone / ".venv/bin/python"), "-c", check, str(merged)], capture_output=True,
                        text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.strip().endswith("True")
    summary.update(screens=shots, merged=str(merged), merged_loads=ok)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"bench": "tui-acceptance", **summary}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
