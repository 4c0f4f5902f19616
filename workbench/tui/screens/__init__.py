"""One screen per view; the app switches between them as modes (F1-F7, the tabs, ctrl+p)."""

from workbench.tui.screens.export import ExportScreen
from workbench.tui.screens.models import ModelsScreen
from workbench.tui.screens.quant_search import QuantSearchScreen
from workbench.tui.screens.quantize import QuantizeScreen
from workbench.tui.screens.recipe import RecipeScreen
from workbench.tui.screens.runs import RunsScreen
from workbench.tui.screens.search import SearchScreen

__all__ = ["ExportScreen", "ModelsScreen", "QuantizeScreen", "QuantSearchScreen", "RecipeScreen", "RunsScreen", "SearchScreen"]
