"""The search over per-unit options under a bits budget: plain functions over cost arrays.

A configuration is one option index per unit (a layer, a block or a projection type). `costs[u, o]`
is the bytes unit `u` stores as option `o`; a configuration fits a budget when its bytes are at most
`budget_bytes`. Two optimizers, compared side by side at equal evaluations in `tests/bench`:

* ``levelswitch``: EvoPress's (1 + lambda) algorithm. Each offspring changes 1-3 units (the min of
  two uniform draws, as EvoPress does) to another option and, when that breaks the budget, moves
  randomly chosen other units one level down until it fits again and then other units one level up
  while they fit (our options differ in size, so a budget-preserving switch cannot be exact as with
  EvoPress's equal-size levels; this keeps every offspring close to the budget). Multi-step
  selection scores every offspring on the first stage's windows, the best few on more, and the best
  of the last stage replaces the parent when it beats it on the same windows.
* ``cma``: pycma over one continuous gene per unit in [0, options), rounded down to an option (pycma's
  `integer_variables` keeps their step size from vanishing), repaired and filled to the budget the
  same way.

Every random draw comes from a generator seeded by (seed, target, generation), so a resumed run
draws what the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Config = tuple[int, ...]
Score = Callable[[list[Config], int], list[float]]  # (configs, windows) -> fitness each (lower is better)


def config_bytes(costs: np.ndarray, config: Config) -> int:
    return int(costs[np.arange(len(config)), list(config)].sum())


def generation_rng(seed: int, target: int, generation: int) -> np.random.Generator:
    return np.random.default_rng([seed, target, generation])


def uniform_configs(costs: np.ndarray, budget_bytes: float) -> list[Config]:
    """Every configuration that gives all units one option, among those within the budget."""
    units, options = costs.shape
    return [(o,) * units for o in range(options) if config_bytes(costs, (o,) * units) <= budget_bytes]


def cheapest(costs: np.ndarray) -> Config:
    return tuple(int(o) for o in costs.argmin(1))


def levels_mask(costs: np.ndarray, errors: np.ndarray | None) -> np.ndarray:
    """[units, options] True where an option is a level of its unit: no other option of the unit
    costs no more and has a lower error (all options without `errors`). The moves go along these
    chains, as EvoPress's levels (more bits, less error); the fitness still judges every config end
    to end (per-layer errors do not add up to the model's, which is why the search exists)."""
    if errors is None:
        return np.ones(costs.shape, dtype=bool)
    mask = np.zeros(costs.shape, dtype=bool)
    for u in range(costs.shape[0]):
        for o in range(costs.shape[1]):
            beaten = (costs[u] <= costs[u, o]) & (errors[u] < errors[u, o])
            mask[u, o] = not beaten.any()
    return mask


def repair(config: list[int], costs: np.ndarray, budget_bytes: float, rng: np.random.Generator,
           keep: set[int] = frozenset(), levels: np.ndarray | None = None) -> Config | None:
    """Move random units (not in `keep` while others can move) one level down until the config fits;
    None when even that cannot make it fit."""
    config = list(config)
    rows = np.arange(len(config))
    levels = np.ones(costs.shape, dtype=bool) if levels is None else levels
    while costs[rows, config].sum() > budget_bytes:
        movable = [u for u in rows if (levels[u] & (costs[u] < costs[u, config[u]])).any()]
        if not movable:
            return None
        free = [u for u in movable if u not in keep] or movable
        u = free[rng.integers(len(free))]
        # One level down: the dearest cheaper levels (a random one among equal costs), so a repair
        # takes back no more bits than it must.
        cheaper = np.flatnonzero(levels[u] & (costs[u] < costs[u, config[u]]))
        nearest = cheaper[costs[u, cheaper] == costs[u, cheaper].max()]
        config[u] = int(nearest[rng.integers(len(nearest))])
    return tuple(config)


def fill(config: Config, costs: np.ndarray, budget_bytes: float, rng: np.random.Generator,
         keep: set[int] = frozenset(), levels: np.ndarray | None = None) -> Config:
    """Move random units (not in `keep`) one level up while that still fits: an offspring uses the
    budget as EvoPress's exact level switches do (a target between two uniform levels would
    otherwise leave most of its bits unused for many generations)."""
    config = list(config)
    rows = np.arange(len(config))
    levels = np.ones(costs.shape, dtype=bool) if levels is None else levels
    while True:
        slack = budget_bytes - costs[rows, config].sum()
        up = {}
        for u in rows:
            if u in keep:
                continue
            dearer = np.flatnonzero(levels[u] & (costs[u] > costs[u, config[u]])
                                    & (costs[u] - costs[u, config[u]] <= slack))
            if len(dearer):
                up[u] = dearer[costs[u, dearer] == costs[u, dearer].min()]
        if not up:
            return tuple(config)
        u = list(up)[rng.integers(len(up))]
        config[u] = int(up[u][rng.integers(len(up[u]))])


def level_switch(parent: Config, costs: np.ndarray, budget_bytes: float, rng: np.random.Generator,
                 levels: np.ndarray | None = None) -> Config:
    """One offspring: 1-3 units switched to another of their levels, repaired to fit the budget,
    then filled up to it (other units one level up while they fit)."""
    units, options = costs.shape
    levels = np.ones(costs.shape, dtype=bool) if levels is None else levels
    n = int(min(rng.integers(1, 4), rng.integers(1, 4)))
    for _ in range(100):
        child, changed = list(parent), set()
        for u in rng.choice(units, size=min(n, units), replace=False):
            others = [o for o in np.flatnonzero(levels[u]) if o != child[u]]
            if not others:
                continue
            child[u] = int(others[rng.integers(len(others))])
            changed.add(int(u))
        fixed = repair(child, costs, budget_bytes, rng, keep=changed, levels=levels)
        if fixed is not None:
            fixed = fill(fixed, costs, budget_bytes, rng, keep=changed, levels=levels)
            if fixed != parent:
                return fixed
    return parent


def select(offspring: list[Config], stages: list[tuple[int, int]], score: Score) -> tuple[Config, float]:
    """Multi-step selection: stage (windows, keep) scores the survivors on `windows`, keeps the best
    `keep`; returns the last stage's best and its fitness on the last stage's windows."""
    alive = list(dict.fromkeys(offspring))  # a repeated offspring is scored once
    for windows, keep in stages:
        fitness = score(alive, windows)
        order = np.argsort(fitness, kind="stable")[:keep]
        alive, best = [alive[i] for i in order], float(fitness[order[0]])
    return alive[0], best


def levelswitch_generation(parent: Config, parent_fitness: float, costs: np.ndarray, budget_bytes: float,
                           offspring: int, stages: list[tuple[int, int]], score: Score,
                           rng: np.random.Generator, levels: np.ndarray | None = None) -> tuple[Config, float]:
    """One (1 + lambda) generation: the new parent and its fitness on the last stage's windows."""
    children = [level_switch(parent, costs, budget_bytes, rng, levels) for _ in range(offspring)]
    best, fitness = select(children, stages, score)
    return (best, fitness) if fitness < parent_fitness else (parent, parent_fitness)


def cma_genes_to_config(x: np.ndarray, options: int) -> list[int]:
    return [int(v) for v in np.clip(np.floor(x), 0, options - 1)]


def make_cma(start: Config, options: int, offspring: int, seed: int):
    """A pycma ES over one gene per unit, started at `start` (the centre of each option's interval)."""
    import cma

    units = len(start)
    x0 = [o + 0.5 for o in start]
    opts = {"bounds": [0, options - 1e-9], "popsize": offspring, "seed": seed + 1, "verbose": -9,
            "verb_log": 0, "verb_disp": 0, "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9,
            "tolstagnation": 10**9, "integer_variables": list(range(units)), "maxiter": 10**9}
    return cma.CMAEvolutionStrategy(x0, max(0.5, options / 4), opts)


def cma_generation(es, costs: np.ndarray, budget_bytes: float, windows: int, score: Score,
                   rng: np.random.Generator, tells: list[float] | None = None,
                   levels: np.ndarray | None = None) -> tuple[list[Config], list[float]]:
    """One pycma generation: ask, round and repair to the budget, score on `windows`, tell. With
    `tells` (a resume replaying history), those fitnesses are told instead of scoring."""
    xs = es.ask()
    configs = [fill(repair(cma_genes_to_config(x, costs.shape[1]), costs, budget_bytes, rng, levels=levels)
                    or cheapest(costs), costs, budget_bytes, rng, levels=levels) for x in xs]
    fitness = list(tells) if tells is not None else list(score(configs, windows))
    es.tell(xs, fitness)
    return configs, fitness
