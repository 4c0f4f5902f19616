"""A quantization search run: the database, the loop over generations and targets, the front.

Run directory (the merge search's conventions)::

    spec.yml         the spec as run (JSON, with its seed)
    database.json    where the layer database lives, its build time and size
    history.jsonl    one row per scored configuration: generation, target, kind (uniform | offspring
                     | cma), windows, config (an option index per unit), bits (total, base, adapter),
                     fitness (mean KL to the float model over the first `windows` search windows)
    checkpoint.json  after each complete generation: the parents and their fitness, counters
    pareto.json      at the end: the non-dominated points (total bits vs search fitness) with their
                     held-out KL and perplexity, the uniform configs beside them, and per target the
                     searched config against the best uniform one at no more total bits
    point-K.yml      the quantization config of front point K (`workbench quantize MODEL --config`)

Resuming reads the checkpoint, drops history rows of later generations (a kill -9 mid-generation
leaves no duplicates) and goes on; draws are seeded per (seed, target, generation) and scores are
deterministic, so the history equals an uninterrupted run's. Nothing here is pickled.

Fitness windows: the calibration text's `search` split (`workbench.quant.corpus.SEARCH_FILES`),
apart from recovery's calibration text and from the held-out text the report uses.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.atomic import atomic_file, remove_stale_temporaries_in
from workbench.errors import WorkbenchError
from workbench.eval.lm_eval_tasks import check_spec_lm_eval
from workbench.faults import fault_point
from workbench.quant.search import evolve
from workbench.quant.search.database import LayerDatabase, layer_units, option_config
from workbench.quant.search.spec import QuantSearchSpec, load_quant_search_spec, quant_search_spec_from_dict
from workbench.search.run import read_history as read_rows  # the same run-directory convention

TOP_K = 64  # teacher log-probs kept per position; the rest is one tail bucket (recovery's coarse KL)
FRONT_MAX = 12  # front points scored held-out (evenly spread over bits when there are more)


@dataclass
class GenerationDone:
    generation: int
    targets: list[dict]  # [{"target", "fitness", "bpw"}] the parents after this generation
    evaluations: int
    elapsed: float
    rate: float  # first-stage candidates scored per minute


def window_kls(model, windows: torch.Tensor, cache: dict[str, torch.Tensor], batch_size: int = 4) -> list[float]:
    """KL of the model to the cached teacher, one mean per window, on the model's device."""
    from workbench.quant.recover import kl_loss

    param = next(model.parameters(), None)
    device = windows.device if param is None else param.device
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            logits = model(windows[i:i + batch_size].to(device), use_cache=False).logits
            for j in range(len(logits)):
                part = {k: v[i + j:i + j + 1].to(device) for k, v in cache.items()}
                out.append(kl_loss(logits[j:j + 1], part).item())
    return out


def heldout_windows(tokenizer, spec: QuantSearchSpec) -> torch.Tensor:
    """The held-out text's windows a run's front (and its recovered points) are measured on."""
    from workbench.quant.corpus import HELDOUT_FILES, license_texts, token_windows

    return token_windows(tokenizer, license_texts(HELDOUT_FILES), spec.seq_len, spec.heldout_windows * spec.seq_len,
                         seed=spec.seed)


def unique_rows(rows: list[dict], windows: int) -> dict[tuple, dict]:
    """The first row of each config scored on `windows` windows (the last stage's: comparable)."""
    unique: dict[tuple, dict] = {}
    for r in rows:
        if r["windows"] == windows:
            unique.setdefault(tuple(r["config"]), r)
    return unique


def pareto_rows(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both total bits and fitness, by increasing bits."""
    points, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["bpw"], r["fitness"])):
        if r["fitness"] < best:
            points.append(r)
            best = r["fitness"]
    return points


class QuantSearch:
    """Set up with `QuantSearch(spec, run_dir)`, then `.start()` or `.resume()`, then `.run()`.

    `device` (cpu, cuda, cuda:N, auto, or a torch.device): where the layer database is solved and
    candidates are scored (the float model, the student and the teacher caches live there); the
    database files and the run directory are the same on every device but for float rounding."""

    def __init__(self, spec: QuantSearchSpec, run_dir: str | Path, db_root: Path | None = None,
                 progress: Callable[[str, int, int], None] | None = None, device: torch.device | str = "cpu"):
        from workbench.devices import resolve_device
        from workbench.models.loader import load_model, model_kind, resolve_model
        from workbench.quant.corpus import SEARCH_FILES, license_texts, token_windows
        from workbench.quant.recover import teacher_topk

        self.spec, self.run_dir = spec, Path(run_dir)
        self.device = resolve_device(device)
        source = resolve_model(spec.model)
        if model_kind(source) != "float":
            raise WorkbenchError(f"{source}: a {model_kind(source)} model; a quantization search needs a float model")
        self.source = source
        self.model, self.tokenizer = load_model(source)
        self.model.eval().requires_grad_(False)
        self.db = LayerDatabase(self.model, source, spec, db_root, self.device)
        self.units = layer_units(self.db.names, spec.granularity)
        if spec.optimizer == "cma" and len(self.units) < 2:
            raise WorkbenchError(f"{spec.source}: optimizer: cma needs at least 2 genes; granularity "
                                 f"{spec.granularity} gives {len(self.units)} here (use levelswitch)")
        self.weights = sum(self.db.weights[n].numel() for n in self.db.names)
        n_opt = len(self.db.options)
        per_layer = {n: [self.db.stored_bytes(n, o) for o in range(n_opt)] for n in self.db.names}
        self.base_costs = np.array([[sum(per_layer[n][o][0] for n in u) for o in range(n_opt)] for u in self.units])
        self.adapter_costs = np.array([[sum(per_layer[n][o][1] for n in u) for o in range(n_opt)] for u in self.units])
        self.costs = self.base_costs + self.adapter_costs
        smallest = self.bits(evolve.cheapest(self.costs))["bpw"]
        for t in spec.targets:
            if t < smallest:
                raise WorkbenchError(f"{spec.source}: targets: {t} bits per weight is below the smallest config "
                                     f"these options give ({smallest:.3f}, adapters counted)")
        g = spec.seed
        self.search_windows = token_windows(self.tokenizer, license_texts(SEARCH_FILES), spec.seq_len,
                                            spec.windows * spec.seq_len, seed=g)
        if spec.fitness == "kl" and len(self.search_windows) < spec.windows:
            raise WorkbenchError(f"{spec.source}: stages: the search text gives {len(self.search_windows)} windows "
                                 f"of {spec.seq_len} tokens, fewer than the last stage's {spec.windows}")
        self.task = None
        if spec.fitness != "kl":
            from workbench.eval.taskfile import check_search_objective, load_task

            self.task = load_task(spec.fitness, spec.lm_eval)
            check_search_objective(self.task, "search")
        self.heldout_windows = heldout_windows(self.tokenizer, spec)
        self.db_report = self.db.build(progress)
        t0 = time.perf_counter()
        names, err = self.db.relative_errors()
        index = {n: i for i, n in enumerate(names)}
        unit_err = np.array([[sum(float(err[index[n], o]) for n in u) / sum(float(err[index[n], -1]) for n in u)
                              for o in range(n_opt)] for u in self.units])
        self.levels = evolve.levels_mask(self.costs, unit_err)
        self.db_report["levels_seconds"] = time.perf_counter() - t0
        self.db_report["levels_per_unit"] = float(self.levels.sum(1).mean())
        self.model.to(self.device)   # the database keeps its CPU views of the float weights
        self.search_cache = teacher_topk(self.model, self.search_windows, TOP_K, 4)
        self.heldout_cache = teacher_topk(self.model, self.heldout_windows, TOP_K, 4)
        self.student = copy.deepcopy(self.model)
        self._kls: dict[tuple, list[float]] = {}  # config -> per-window KL so far (a prefix of the windows)
        self.state: dict = {}
        self._context: dict = {}
        self._rows_since: list[dict] = []
        self._on_score: Callable[[dict], None] | None = None

    # -- bits and scores ----------------------------------------------------------------------------
    def bits(self, config: evolve.Config) -> dict:
        base = evolve.config_bytes(self.base_costs, config)
        adapter = evolve.config_bytes(self.adapter_costs, config)
        return {"bpw": 8 * (base + adapter) / self.weights, "base_bpw": 8 * base / self.weights,
                "adapter_bpw": 8 * adapter / self.weights}

    def budget_bytes(self, target: float) -> float:
        return target * self.weights / 8

    def choice(self, config: evolve.Config) -> dict[str, int]:
        return {n: o for unit, o in zip(self.units, config) for n in unit}

    def assemble(self, config: evolve.Config) -> torch.nn.Module:
        self.db.assemble(self.student, self.choice(config))
        return self.student

    def score(self, configs: list[evolve.Config], windows: int) -> list[float]:
        """Mean KL over the first `windows` search windows, per config (lower is better); one history
        row each."""
        out = []
        for config in configs:
            t0 = time.perf_counter()
            if self.task is not None:
                fitness = self._task_fitness(config, windows)
            else:
                have = self._kls.setdefault(tuple(config), [])
                if len(have) < windows:
                    self.assemble(config)
                    have += window_kls(self.student, self.search_windows[len(have):windows],
                                       {k: v[len(have):windows] for k, v in self.search_cache.items()})
                fitness = float(np.mean(have[:windows]))
            out.append(fitness)
            row = {**self._context, "windows": windows, "config": list(config), **self.bits(config),
                   "fitness": fitness, "seconds": time.perf_counter() - t0}
            self._rows_since.append(row)
            self.state["evaluations"] += 1
            if self._on_score:
                self._on_score(row)
        self._flush()
        return out

    def _task_fitness(self, config: evolve.Config, items: int) -> float:
        """1 - the task's continuous score over its first `items` search items (lower is better):
        with a task fitness, a stage's `windows` count task items."""
        from workbench.eval.evaluator import evaluate

        key = (tuple(config), items)
        if key not in self._kls:
            with torch.no_grad():
                (result,) = evaluate(self.assemble(config), self.tokenizer, self.task, split="search",
                                     limit=items).values()
            self._kls[key] = [1.0 - float(result.score)]
        return self._kls[key][0]

    def _flush(self) -> None:
        from workbench.search.run import write_jsonl_rows

        write_jsonl_rows(self.run_dir / "history.jsonl", self._rows_since)
        self._rows_since = []

    # -- run directory ----------------------------------------------------------------------------
    def start(self, again: bool = False) -> QuantSearch:
        """A new run in an empty (or new) directory; ``again``: in a run directory killed before its
        first checkpoint (its rows are dropped: the run starts at generation 0)."""
        if self.run_dir.is_dir():
            remove_stale_temporaries_in(self.run_dir)   # left by a kill -9: not the user's
        if again:
            (self.run_dir / "history.jsonl").unlink(missing_ok=True)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise WorkbenchError(f"{self.run_dir} is not empty; resume it with --resume or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.run_dir / "spec.yml") as f:
            f.write(json.dumps(self.spec.to_dict(), indent=2) + "\n")
        with atomic_file(self.run_dir / "database.json") as f:
            f.write(json.dumps(self.db_report, indent=2) + "\n")
        self.state = {"generation": 0, "evaluations": 0, "elapsed": 0.0, "parents": None, "stop_reason": None}
        return self

    def resume(self) -> QuantSearch:
        path = self.run_dir / "checkpoint.json"
        if not path.is_file():
            if not (self.run_dir / "spec.yml").is_file():
                raise WorkbenchError(f"{self.run_dir}: no checkpoint.json (nothing to resume; start it anew)")
            return self.start(again=True)  # killed before generation 0 was checkpointed: start over
        self.state = json.loads(path.read_text())
        remove_stale_temporaries_in(self.run_dir)   # left by a kill -9: not the user's
        rows = [r for r in read_rows(self.run_dir) if r["generation"] < self.state["generation"]]
        with atomic_file(self.run_dir / "history.jsonl") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return self

    def checkpoint(self) -> None:
        with atomic_file(self.run_dir / "checkpoint.json") as f:
            f.write(json.dumps(self.state) + "\n")
        fault_point("quant-search:checkpoint")

    # -- the loop ---------------------------------------------------------------------------------
    def _stages(self) -> list[tuple[int, int]]:
        return [(s.windows, s.keep) for s in self.spec.stages]

    def _first_parents(self) -> list[dict]:
        """Generation 0: every uniform config within some target, on the last stage's windows; each
        target starts from the best of those within it (or the cheapest config when none fits)."""
        self._context = {"generation": 0, "target": None, "kind": "uniform"}
        top = max(self.spec.targets)
        uniform = evolve.uniform_configs(self.costs, self.budget_bytes(top))
        fitness = dict(zip(uniform, self.score(uniform, self.spec.windows)))
        parents = []
        for t in self.spec.targets:
            fits = [c for c in uniform if evolve.config_bytes(self.costs, c) <= self.budget_bytes(t)]
            if fits:
                best = min(fits, key=lambda c: fitness[c])
                parents.append({"target": t, "config": list(best), "fitness": fitness[best]})
            else:
                start = evolve.cheapest(self.costs)
                self._context = {"generation": 0, "target": t, "kind": "start"}
                parents.append({"target": t, "config": list(start), "fitness": self.score([start], self.spec.windows)[0]})
        return parents

    def budget_left(self) -> str | None:
        s = self.state
        if s["generation"] > self.spec.generations:
            return "generations"
        if self.spec.max_minutes is not None and s["elapsed"] >= 60 * self.spec.max_minutes:
            return "max_minutes"
        return None

    def run(self, on_generation: Callable[[GenerationDone], None] | None = None,
            on_score: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
        """Generations until the budget ends or `should_stop()` says so after one (generation 0 scores
        the uniform configs); the front is `front()`'s."""
        self._on_score = on_score
        es: dict = {}
        while True:
            reason = self.budget_left()
            if reason:
                self.state["stop_reason"] = reason
                break
            t0 = time.perf_counter()
            g = self.state["generation"]
            if g == 0:
                self.state["parents"] = self._first_parents()
                self.state["starts"] = [list(p["config"]) for p in self.state["parents"]]
            else:
                if self.spec.optimizer == "cma" and not es:
                    es = self._cma_replay()
                for ti, parent in enumerate(self.state["parents"]):
                    self._context = {"generation": g, "target": parent["target"], "kind": self.spec.optimizer}
                    self._generation(ti, parent, g, es)
            self.state["elapsed"] += time.perf_counter() - t0
            self.state["generation"] = g + 1
            self.checkpoint()
            if on_generation:
                first = max(1, len(self.state["parents"]) * (self.spec.offspring if g else 0))
                on_generation(GenerationDone(g, [{"target": p["target"], "fitness": p["fitness"],
                                                  **self.bits(tuple(p["config"]))} for p in self.state["parents"]],
                                             self.state["evaluations"], self.state["elapsed"],
                                             60 * first / max(1e-9, time.perf_counter() - t0)))
            if should_stop and should_stop() and not self.budget_left():
                self.state["stop_reason"] = "stopped"  # after the generation in progress: it is checkpointed
                break
        return self.state

    def _generation(self, ti: int, parent: dict, g: int, es: dict) -> None:
        rng = evolve.generation_rng(self.spec.seed, ti, g)
        budget = self.budget_bytes(parent["target"])
        if self.spec.optimizer == "levelswitch":
            best, fitness = evolve.levelswitch_generation(tuple(parent["config"]), parent["fitness"], self.costs,
                                                          budget, self.spec.offspring, self._stages(), self.score, rng,
                                                          self.levels)
        else:
            configs, fits = evolve.cma_generation(es[ti], self.costs, budget, self.spec.windows, self.score, rng,
                                                  levels=self.levels)
            i = int(np.argmin(fits))
            best, fitness = (configs[i], fits[i]) if fits[i] < parent["fitness"] else (tuple(parent["config"]),
                                                                                         parent["fitness"])
        parent.update(config=list(best), fitness=float(fitness))

    def _cma_replay(self) -> dict:
        """pycma ESs per target, started at the generation-0 parents and advanced through the
        checkpointed generations by telling them the fitnesses history recorded (no pickled state;
        the draws repeat exactly)."""
        history = read_rows(self.run_dir)
        es = {ti: evolve.make_cma(tuple(start), len(self.db.options), self.spec.offspring, self.spec.seed + ti)
              for ti, start in enumerate(self.state["starts"])}
        # In the run's order (generation by generation, target by target): pycma draws from numpy's
        # global RNG, so the order of asks is what makes a replay draw what the run drew.
        for g in range(1, self.state["generation"]):
            for ti, t in enumerate(self.spec.targets):
                tells = [r["fitness"] for r in history if r["generation"] == g and r["target"] == t]
                evolve.cma_generation(es[ti], self.costs, self.budget_bytes(t), self.spec.windows,
                                      self.score, evolve.generation_rng(self.spec.seed, ti, g), tells=tells,
                                      levels=self.levels)
        return es

    # -- the front ----------------------------------------------------------------------------------
    def heldout(self, config: evolve.Config) -> dict:
        from workbench.eval.evaluator import heldout_perplexity

        model = self.assemble(config)
        kl = float(np.mean(window_kls(model, self.heldout_windows, self.heldout_cache)))
        return {"heldout_kl": kl, "heldout_ppl": heldout_perplexity(model, self.tokenizer, self.spec.heldout_task)}

    def front(self, progress: Callable[[str, int, int], None] | None = None) -> dict:
        """pareto.json and point-K.yml: the non-dominated configs scored on the last stage's windows
        (uniform ones included), each held-out; and per target, searched vs best uniform."""
        unique = unique_rows(read_rows(self.run_dir), self.spec.windows)
        points = pareto_rows(list(unique.values()))
        if len(points) > FRONT_MAX:
            keep = sorted({round(i * (len(points) - 1) / (FRONT_MAX - 1)) for i in range(FRONT_MAX)})
            points = [points[i] for i in keep]
        uniform = [r for r in unique.values() if r["kind"] == "uniform"]
        todo = {tuple(r["config"]) for r in points + uniform}
        for p in self.state["parents"] or []:
            todo.add(tuple(p["config"]))
        held = {}
        for i, c in enumerate(sorted(todo)):
            held[c] = self.heldout(c)
            if progress:
                progress("held-out", i + 1, len(todo))
        options = self.db.options

        def entry(r: dict) -> dict:
            c = tuple(r["config"])
            labels = [options[o].label for o in c]
            return {"config": list(c), "bpw": r["bpw"], "base_bpw": r["base_bpw"], "adapter_bpw": r["adapter_bpw"],
                    "fitness": r["fitness"], **held[c], "kind": r["kind"],
                    "mix": {lab: labels.count(lab) for lab in sorted(set(labels))}}

        front = [entry(r) for r in points]
        for k, p in enumerate(front):
            path = self.run_dir / f"point-{k}.yml"
            p["yml"] = path.name
            self._write_yaml(path, option_config(self.spec, self.choice(tuple(p["config"]))),
                             f"# front point {k} of {self.run_dir}: {p['bpw']:.3f} bits per weight (adapters in), "
                             f"{p['base_bpw']:.3f} base; search KL {p['fitness']:.4f}, held-out perplexity "
                             f"{p['heldout_ppl']:.2f}\n#   workbench quantize {self.spec.model} --config {path}\n")
        uniform_entries = sorted((entry(r) for r in uniform), key=lambda e: e["bpw"])
        for e in uniform_entries:
            e["label"] = options[e["config"][0]].label
            e["yml"] = f"uniform-{e['label'].replace(' ', '-')}.yml"
            self._write_yaml(self.run_dir / e["yml"], option_config(self.spec, self.choice(tuple(e["config"]))),
                             f"# uniform config {e['label']}: {e['bpw']:.3f} bits per weight (adapters in)\n")
        self.write_target_configs()
        targets = []
        for p in self.state["parents"] or []:
            c = tuple(p["config"])
            searched = entry({**unique.get(c, {}), "config": c, **self.bits(c), "fitness": p["fitness"],
                              "kind": unique.get(c, {}).get("kind", "search")})
            searched["yml"] = f"best-{p['target']:g}.yml"
            fits = [e for e in uniform_entries if e["bpw"] <= p["target"] + 1e-12]
            base = min(fits, key=lambda e: e["heldout_ppl"]) if fits else None
            targets.append({"target": p["target"], "searched": searched, "best_uniform": base,
                            "ppl_ratio": searched["heldout_ppl"] / base["heldout_ppl"] if base else None})
        result = {"model": str(self.source), "heldout_task": self.spec.heldout_task, "weights": self.weights, "front": front, "uniform": uniform_entries,
                  "targets": targets, "generations": self.state["generation"], "evaluations": self.state["evaluations"],
                  "elapsed": self.state["elapsed"], "stop_reason": self.state["stop_reason"],
                  "options": [o.label for o in options], "units": len(self.units), "seed": self.spec.seed,
                  "database": self.db_report}
        with atomic_file(self.run_dir / "pareto.json") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        return result

    def write_target_configs(self) -> None:
        for p in self.state["parents"] or []:
            self._write_yaml(self.run_dir / f"best-{p['target']:g}.yml",
                             option_config(self.spec, self.choice(tuple(p["config"]))),
                             f"# searched config for {p['target']:g} bits per weight (adapters in): "
                             f"{self.bits(tuple(p['config']))['bpw']:.3f}\n")

    @staticmethod
    def _write_yaml(path: Path, data: dict, header: str) -> None:
        import yaml

        with atomic_file(path) as f:
            f.write(header + yaml.safe_dump(data, sort_keys=False, width=200))


def open_quant_search(spec_path: str | Path | None, run_dir: str | Path, resume: bool = False,
                      overwrite: bool = False, db_root: Path | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      device: torch.device | str = "cpu") -> QuantSearch:
    """A new run of the spec file (checked before anything loads) or a resumed one (its spec.yml),
    on `device` (checked first)."""
    from workbench.devices import resolve_device

    device = resolve_device(device)
    run_dir = Path(run_dir)
    if resume:
        path = run_dir / "spec.yml"
        if not path.is_file():
            raise WorkbenchError(f"{run_dir}: not a search run directory (no spec.yml)")
        spec = quant_search_spec_from_dict(json.loads(path.read_text()), str(path))
        return QuantSearch(spec, run_dir, db_root, progress, device).resume()
    spec = load_quant_search_spec(spec_path)
    check_spec_lm_eval(spec)   # lm_eval:NAME tasks load (seconds) before the model does
    if run_dir.is_dir():
        remove_stale_temporaries_in(run_dir)   # left by a kill -9: not the user's
    if run_dir.exists() and any(run_dir.iterdir()):
        raise WorkbenchError(f"{run_dir} is not empty; resume it with --resume or choose another --out")
    return QuantSearch(spec, run_dir, db_root, progress, device).start()


def read_front(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "pareto.json"
    if not path.is_file():
        raise WorkbenchError(f"{run_dir}: no pareto.json (the search has not finished; resume it with --resume)")
    return json.loads(path.read_text())

