"""The command palette (ctrl+p): every screen and every action of the workbench, by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

# (palette name, screen mode, action on that screen or None to just go there, help)
COMMANDS: tuple[tuple[str, str, str | None, str], ...] = (
    ("Go to Search", "search", None, "run and watch a merge search (F1)"),
    ("Go to Models", "models", None, "models in the home, the zoo (F2)"),
    ("Go to Recipe", "recipe", None, "edit, validate and merge a recipe (F3)"),
    ("Go to Runs", "runs", None, "past search runs: resume, compare (F4)"),
    ("Go to Export", "export", None, "export a merged model (F5)"),
    ("Go to Quantize", "quantize", None, "quantize, recover and export a compressed model (F6)"),
    ("Go to Quant search", "qsearch", None, "search per-layer formats and ranks under a bits budget (F7)"),
    ("Search: start", "search", "start", "start a new search from the spec (ctrl+r)"),
    ("Search: pause", "search", "pause", "pause after the current candidate (ctrl+t)"),
    ("Search: resume", "search", "resume", "resume the run directory (ctrl+n)"),
    ("Search: stop", "search", "stop", "stop after the current candidate (ctrl+b)"),
    ("Search: save recipe", "search", "save_recipe", "write the incumbent recipe (ctrl+s)"),
    ("Search: build spec", "search", "build_spec", "compose a search spec in a form, open one into it (ctrl+e)"),
    ("Search: first search", "search", "first_search", "the quick search, or the no-zoo one and the zoo's build"),
    ("Models: refresh", "models", "refresh_models", "list the models again (ctrl+r)"),
    ("Models: prepare default model", "models", "prepare_default", "SmolLM2-135M-Instruct into the home (ctrl+g)"),
    ("Models: build zoo", "models", "build_zoo", "train the zoo's missing experts (ctrl+b)"),
    ("Recipe: open", "recipe", "open", "open the recipe path (ctrl+o)"),
    ("Recipe: save", "recipe", "save", "write the editor to the recipe path (ctrl+s)"),
    ("Recipe: validate", "recipe", "validate", "check the recipe against its models (ctrl+g)"),
    ("Recipe: merge", "recipe", "merge", "run the merge (ctrl+r)"),
    ("Runs: refresh", "runs", "refresh_runs", "list the runs again (ctrl+r)"),
    ("Runs: mark for comparison", "runs", "mark", "mark the selected run (space)"),
    ("Runs: compare marked", "runs", "compare", "compare the two marked runs (ctrl+g)"),
    ("Runs: resume selected", "runs", "resume", "resume the selected run on Search (ctrl+n)"),
    ("Export: merged model", "export", "export", "export a merged model directory (ctrl+r)"),
    ("Quantize: run", "quantize", "run_quantize", "quantize, recover if a budget is set, export (ctrl+r)"),
    ("Quant search: start", "qsearch", "start", "start a new quantization search (ctrl+r)"),
    ("Quant search: pause", "qsearch", "pause", "pause after the current generation (ctrl+t)"),
    ("Quant search: resume", "qsearch", "resume", "resume the run directory (ctrl+n)"),
    ("Quant search: stop", "qsearch", "stop", "stop and score the front (ctrl+b)"),
    ("Quant search: build point", "qsearch", "build_point", "quantize, recover, export the selected point (ctrl+g)"),
    ("Quant search: build spec", "qsearch", "build_spec", "compose a quantization search spec in a form (ctrl+e)"),
)


class WorkbenchCommands(Provider):
    def _commands(self) -> list[tuple[str, Callable, str]]:
        app = self.app

        async def run(mode: str, action: str | None) -> None:
            await app.switch_mode(mode)
            if action:
                await app.screen.run_action(action)

        return [(name, partial(run, mode, action), help_text) for name, mode, action, help_text in COMMANDS]

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
