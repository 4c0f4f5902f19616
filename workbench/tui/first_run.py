"""A fresh machine's first search, from one keystroke.

When the default zoo is built, the first search is ``recipes/zoo-quick-search.yml``. When it is not,
the app offers to build it (``ops.zoo.build``, about 11 minutes here, progress shown) and starts the
quick search when it is done; meanwhile it runs a search that needs no zoo: the default model's
seeded variants, scored by KL and perplexity (``ops.variants.variant_search_spec``).

Every step is a field of :class:`FirstRun`, so a test gives tiny ones (a builder that trains a tiny
model, a spec over tiny models) without touching the app's internals. The welcome screen is shown
on a first start (a home with no runs and no ``.welcome-seen``) and never again once dismissed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.progress import ProgressFn

WELCOME_MARK = ".welcome-seen"


def build_default_zoo(progress: ProgressFn) -> Any:
    from workbench.ops.zoo import build

    return build(progress=progress)


def default_zoo_built() -> bool:
    try:
        from workbench.zoo.build import EXPERTS, is_built
    except ImportError:  # a checkout without the zoo
        return False
    return all(is_built(name) for name in EXPERTS)


def quick_zoo_spec() -> Path | None:
    from workbench.tui.jobs import example_specs

    return next((p for p in example_specs() if p.name == "zoo-quick-search.yml"), None)


def no_zoo_spec(progress: ProgressFn) -> Path:
    from workbench.ops.variants import variant_search_spec

    return variant_search_spec(progress=progress)


@dataclass
class FirstRun:
    """What the first keystroke starts. ``build_zoo(progress)`` builds the zoo; ``zoo_built()`` says
    whether it is; ``zoo_spec()`` is the quick search over it; ``no_zoo_spec(progress)`` makes what a
    search without the zoo needs and returns its spec; ``welcome`` shows the welcome on a first start."""

    build_zoo: Callable[[ProgressFn], Any] = build_default_zoo
    zoo_built: Callable[[], bool] = default_zoo_built
    zoo_spec: Callable[[], Path | None] = quick_zoo_spec
    no_zoo_spec: Callable[[ProgressFn], Path] = no_zoo_spec
    welcome: bool = True


def should_welcome(home: Path, runs_dir: Path) -> bool:
    """A first start: the welcome was never dismissed here and the home has no runs yet."""
    if (Path(home) / WELCOME_MARK).exists():
        return False
    runs = Path(runs_dir)
    return not (runs.is_dir() and any((d / "spec.yml").is_file() for d in runs.iterdir()))


def mark_welcomed(home: Path) -> None:
    path = Path(home) / WELCOME_MARK
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


# (keys, what they do) as the welcome lists them
KEYS = (
    ("enter", "start a live search now (this screen; later: ctrl+r on Search with no spec given)"),
    ("F1 .. F7", "Search, Models, Recipe, Runs, Export, Quantize, Quant search"),
    ("ctrl+r", "start the search of the spec shown (Search, Quant search)"),
    ("ctrl+e", "build a search spec in a form, or open the one shown into it"),
    ("ctrl+t / ctrl+n / ctrl+b", "pause / resume / stop the search"),
    ("ctrl+s", "save the incumbent recipe (mergekit YAML)"),
    ("s", "sort the candidates by the column under the cursor"),
    ("ctrl+p", "every action by name (the command palette)"),
    ("ctrl+q", "quit"),
    ("escape", "close this welcome; it is not shown again"),
)
