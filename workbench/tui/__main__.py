import sys

from workbench.tui import run_app

sys.exit(run_app())
