"""The default model's seeded variants, and a merge search over them that needs no zoo.

``ensure_default_variants`` prepares SmolLM2-135M-Instruct and writes its two variants beside it in
``$WORKBENCH_HOME/models/`` (``SmolLM2-135M-Instruct-variant-a`` and ``-variant-b``: the model plus a
random sparse task vector drawn from seeds ``seed`` and ``seed + 1``), once: later calls find them.
``variant_search_spec`` writes a short TIES search over them, scored by the built-in tasks
``zoo-kl`` (KL to the default model) and ``zoo-perplexity``, so a first search runs at once on a
fresh machine while the zoo's experts are still training.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit

VARIANTS = ("variant-a", "variant-b")  # the names `workbench demo` uses too
SPEC_NAME = "smollm2-variants-quick"


def ensure_default_variants(seed: int = 1, progress: ProgressFn | None = None) -> list[Path]:
    """The default model's variant directories, made when missing (deterministic from ``seed``)."""
    from workbench.models.default_model import prepare_default
    from workbench.models.variants import ensure_variants

    emit(progress, "default model", text="preparing SmolLM2-135M-Instruct")
    base = prepare_default(progress=progress)
    paths = []
    for i, name in enumerate(VARIANTS):
        path = base.with_name(f"{base.name}-{name}")
        made = path / "variant.json"
        if made.is_file() and json.loads(made.read_text()).get("seed") != seed + i:
            raise WorkbenchError(f"{path}: made from seed {json.loads(made.read_text()).get('seed')}, not "
                                 f"{seed + i}; remove it to make it again")
        emit(progress, "variants", i, len(VARIANTS), f"{path.name}" + ("" if made.is_file() else ": making it"))
        paths += ensure_variants(base, [name], first_seed=seed + i)
    emit(progress, "variants", len(VARIANTS), len(VARIANTS), "ready")
    return paths


def variant_spec_dict(names: list[str], base: str, seed: int = 0) -> dict:
    return {
        "name": SPEC_NAME, "base_model": base, "models": list(names), "merge_method": "ties",
        "evolve": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}, "granularity": "global",
        "fixed": {"normalize": True},
        "objective": [{"task": "zoo-kl", "weight": 1.0}, {"task": "zoo-perplexity", "weight": 1.0}],
        "budget": {"generations": 4, "population": 6, "max_minutes": 5}, "seed": seed,
    }


def variant_search_spec(out: str | Path | None = None, seed: int = 1, progress: ProgressFn | None = None) -> Path:
    """Make the variants (when missing) and write the search spec over them to ``out`` (default
    ``$WORKBENCH_HOME/recipes/smollm2-variants-quick-search.yml``); returns its path."""
    import yaml

    from workbench.atomic import atomic_file
    from workbench.home import DEFAULT_MODEL_NAME, workbench_home

    paths = ensure_default_variants(seed, progress)
    path = Path(out) if out is not None else workbench_home() / "recipes" / f"{SPEC_NAME}-search.yml"
    text = ("# A search over the default model's seeded variants (no zoo needed), written by the workbench.\n"
            + yaml.safe_dump(variant_spec_dict([p.name for p in paths], DEFAULT_MODEL_NAME), sort_keys=False,
                             default_flow_style=None))
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(text)
    return path
