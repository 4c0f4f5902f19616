"""Time from `make run` on a fresh clone (and an empty workbench home) to the first live search
generation (issue 18), driven through tmux as a person would do it.

    python tests/bench/first_run_timing.py [--out DIR] [--keep]

1. clone this repository (HEAD) into a temporary directory, with an empty ``WORKBENCH_HOME`` there;
2. start ``make run`` in a detached tmux session: it creates ``.venv``, installs, prepares the
   default model and opens the app, which shows its welcome (no runs in the home yet);
3. press enter once: with no zoo, the app starts the search over the default model's seeded
   variants (KL and perplexity) and offers to build the zoo; the offer is declined (n);
4. wait until the Search screen shows generation 1 complete.

Prints one JSON line: ``make_run_to_welcome_s``, ``key_to_first_generation_s`` and their sum,
``make_run_to_first_generation_s``; the screens go to ``--out``. Not a unit test (minutes, tmux);
run it on a quiet machine. The pip installs read this machine's local package index.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tui_acceptance import HEIGHT, REPO, WIDTH, screen, tmux, wait_for  # noqa: E402  (same folder)

SESSION = "wb-acceptance"   # tui_acceptance's helpers drive this session


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="where the screens go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone and home")
    args = p.parse_args(argv)
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is not installed")
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="wb-first-run-screens-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wb-first-run-"))
    clone, home = work / "workbench", work / "home"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    summary: dict = {"bench": "first_run", "commit": subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    t0 = time.monotonic()
    tmux("new-session", "-d", "-s", SESSION, "-x", str(WIDTH), "-y", str(HEIGHT),
         f"cd {clone} && WORKBENCH_HOME={home} TERM=xterm-256color make run; echo MAKE-RUN-EXITED; sleep 600")
    try:
        wait_for(r"Welcome to the workbench", 1800, "the welcome screen")
        summary["make_run_to_welcome_s"] = round(time.monotonic() - t0, 1)
        (out / "01-welcome.txt").write_text(screen())
        tmux("send-keys", "-t", SESSION, "Enter")
        pressed = time.monotonic()
        try:
            wait_for(r"(?i)build the (default )?zoo", 120, "the offer to build the zoo")
            (out / "02-zoo-offer.txt").write_text(screen())
            tmux("send-keys", "-t", SESSION, "n")
        except SystemExit:
            pass  # no offer shown: the search goes on regardless
        wait_for(r"generation 1/\d+", 1800, "generation 1 to complete")
        summary["key_to_first_generation_s"] = round(time.monotonic() - pressed, 1)
        summary["make_run_to_first_generation_s"] = round(time.monotonic() - t0, 1)
        (out / "03-first-generation.txt").write_text(screen())
        tmux("send-keys", "-t", SESSION, "C-q")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
