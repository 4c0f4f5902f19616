"""The row of tabs at the top of every screen: one per app mode, click or F1-F7 to switch."""

from __future__ import annotations

from textual.widgets import Tab, Tabs

SCREENS = (("search", "Search", "f1"), ("models", "Models", "f2"), ("recipe", "Recipe", "f3"),
           ("runs", "Runs", "f4"), ("export", "Export", "f5"),
           ("quantize", "Quantize", "f6"), ("qsearch", "Quant search", "f7"))


class NavBar(Tabs):
    DEFAULT_CSS = """
    NavBar { dock: top; }
    """

    def __init__(self, active: str) -> None:
        super().__init__(*(Tab(f"{label} [dim]{key}[/]", id=mode) for mode, label, key in SCREENS), active=active)
        self.can_focus = False

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        event.stop()
        mode = event.tab.id if event.tab is not None else None
        if mode and mode != self.app.current_mode:
            self.app.switch_mode(mode)
