"""workbench.tui: the terminal UI (Textual). ``workbench`` or ``workbench tui`` opens it."""


def run_app() -> int:
    from workbench.tui.app import run_app as _run

    return _run()
