"""One screen per view; the app switches between them as modes (F1-F6, the tabs, ctrl+p)."""

from workbench.tui.screens.export import ExportScreen
from workbench.tui.screens.models import ModelsScreen
from workbench.tui.screens.quantize import QuantizeScreen
from workbench.tui.screens.recipe import RecipeScreen
from workbench.tui.screens.runs import RunsScreen
from workbench.tui.screens.search import SearchScreen

__all__ = ["ExportScreen", "ModelsScreen", "QuantizeScreen", "RecipeScreen", "RunsScreen", "SearchScreen"]
