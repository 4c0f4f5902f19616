"""Merge actions: merge a recipe, validate it against its models, export a search run's best recipe.

A recipe source is a recipe file or a search run directory (its best-scored candidate, read as
``read_history`` reads the history: a row cut short by a kill is left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit


@dataclass(frozen=True)
class ValidateResult:
    method: str
    output_tensors: int
    layers: int
    mergekit_paths: Path | None = None   # the recipe written with absolute model paths, if asked

    def summary(self) -> str:
        return f"{self.method}, {self.output_tensors} output tensors, {self.layers} layers"


@dataclass(frozen=True)
class RecipeExport:
    out: Path
    recipe_yaml: str
    summary: str          # which candidate of the run it is


def best_row(rows: list[dict]) -> dict | None:
    """The best-scored history row (None when nothing is scored yet)."""
    scored = [r for r in rows if r.get("score") is not None]
    return max(scored, key=lambda r: r["score"]) if scored else None


def best_run_row(run_dir: str | Path) -> dict:
    """The best-scored row of a search run directory; a directory that is no run, or one with
    nothing scored, is a one-line error."""
    from workbench.search.run import read_history

    run_dir = Path(run_dir)
    if not (run_dir / "history.jsonl").is_file():
        raise WorkbenchError(f"{run_dir}: not a search run directory (no history.jsonl)")
    best = best_row(read_history(run_dir))
    if best is None:
        raise WorkbenchError(f"{run_dir}: no candidate has been scored yet")
    return best


def recipe_source(path: str | Path):
    """The recipe a path names: a recipe file, or the best recipe of a search run directory."""
    from workbench.merge.recipe import load_recipe, recipe_from_dict

    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "history.jsonl").is_file():
            raise WorkbenchError(f"{path}: neither a recipe file nor a search run directory (no history.jsonl)")
        return recipe_from_dict(best_run_row(path)["recipe"], source=str(path / "best.yml"))
    return load_recipe(path)


@dataclass(frozen=True)
class MergeLoraResult:
    """`workbench merge --as-lora`: the merge (into a temporary directory, removed) and the adapter."""
    merge: object        # the executor's MergeResult (its out_dir is gone)
    lora: object         # workbench.ops.lora.LoraExtraction

    @property
    def out(self) -> Path:
        return self.lora.out


def merge(recipe, out: str | Path, *, device: str = "cpu", dtype: str | None = None, shard_size: str | int = "2GB",
          seed: int = 0, overwrite: bool = False, allow_nonfinite: bool = False,
          as_lora: str | Path | None = None, rank: int | None = None,
          progress: ProgressFn | None = None):
    """`workbench merge`: ``recipe`` (a Recipe, a recipe file or a run directory) into the model
    directory ``out``, written atomically. Every check (output, shard size, device, recipe, each
    model's files and headers, the memory plan of :func:`workbench.memory_plan.merge_plan`) runs
    before the first tensor. Returns the executor's MergeResult.

    With ``as_lora`` (a model reference) and ``rank``: the merge is written to a temporary
    directory beside ``out``, then extracted as a peft LoRA adapter over ``as_lora``
    (:func:`workbench.ops.lora.extract_lora`); only the adapter is left, at ``out``. Returns a
    :class:`MergeLoraResult`."""
    from workbench.atomic import check_output
    from workbench.merge.executor import check_device, execute_merge, parse_size
    from workbench.memory_plan import merge_plan
    from workbench.merge.plan import plan_merge

    check_output(out, overwrite)
    parse_size(shard_size)
    dev = check_device(device)
    if (as_lora is None) != (rank is None):
        raise WorkbenchError("--as-lora BASE and --rank R go together: the merge as a LoRA adapter over BASE")
    if as_lora is not None:
        return _merge_as_lora(recipe, out, as_lora, rank, device=device, dtype=dtype, shard_size=shard_size,
                              seed=seed, overwrite=overwrite, allow_nonfinite=allow_nonfinite, progress=progress)
    if not hasattr(recipe, "merge_method"):
        recipe = recipe_source(recipe)
    plan = plan_merge(recipe)
    try:
        merge_plan(plan, dev, out_dtype=dtype).check()   # headers only: refused before any tensor is read
        return execute_merge(plan, out, device=device, out_dtype=dtype, shard_size=shard_size, seed=seed,
                             overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                             on_tensor=lambda done, total, name: emit(progress, "merge", done, total, name))
    finally:
        plan.close()


def _merge_as_lora(recipe, out, as_lora, rank, *, device, dtype, shard_size, seed, overwrite, allow_nonfinite,
                   progress) -> MergeLoraResult:
    import shutil
    import tempfile

    from workbench.atomic import _tmp_prefix
    from workbench.ops.lora import _open, extract_lora

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise WorkbenchError(f"--rank: expected a positive integer, got {rank!r}")
    _open(as_lora, "--as-lora").close()   # the base is checked before the merge, too
    target = Path(out).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    # named as atomic outputs' temporaries are, so a later run removes what a kill leaves
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target) + "merge-", dir=target.parent))
    try:
        merged = merge(recipe, tmp / "merged", device=device, dtype=dtype, shard_size=shard_size, seed=seed,
                       allow_nonfinite=allow_nonfinite, progress=progress)
        lora = extract_lora(as_lora, tmp / "merged", rank, out, device=device, overwrite=overwrite,
                            source=f"the merge of {getattr(recipe, 'source', recipe)}", progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeLoraResult(merged, lora)


def validate(recipe, mergekit_paths: str | Path | None = None, overwrite: bool = False) -> ValidateResult:
    """`workbench recipe validate`: plan ``recipe`` (a Recipe or a file) against its models without
    merging; with ``mergekit_paths`` also write it with every model by its absolute path."""
    from workbench.atomic import check_output
    from workbench.merge.plan import plan_merge
    from workbench.merge.recipe import load_recipe, save_recipe, write_resolved_recipe

    if mergekit_paths is not None:
        check_output(mergekit_paths, overwrite, file=True)   # refuse before any work
    path = None if hasattr(recipe, "merge_method") else Path(recipe)
    if path is not None:
        recipe = load_recipe(path)
    plan = plan_merge(recipe)
    try:
        result = ValidateResult(recipe.merge_method, len(plan.tensors), plan.num_layers,
                                None if mergekit_paths is None else Path(mergekit_paths))
    finally:
        plan.close()
    if mergekit_paths is not None and path is not None:
        write_resolved_recipe(path, mergekit_paths, overwrite=overwrite)   # keeps the file's leading comment
    elif mergekit_paths is not None:
        save_recipe(recipe.resolved(), mergekit_paths, overwrite=overwrite,
                    header="# every model by its absolute path (for mergekit-yaml)\n")
    return result


def export_recipe(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> RecipeExport:
    """`workbench recipe export`: the best recipe of a run to ``out``, every model by its absolute
    path (so that `mergekit-yaml` reads it too); an existing ``out`` is refused unless ``overwrite``."""
    from workbench.atomic import check_output
    from workbench.merge.recipe import dump_recipe, recipe_from_dict, save_recipe

    run_dir = Path(run_dir)
    check_output(out, overwrite, file=True)
    best = best_run_row(run_dir)
    recipe = recipe_from_dict(best["recipe"], source=str(run_dir / "best.yml")).resolved()
    summary = f"generation {best['generation']} candidate {best['index']} (search score {best['score']:.4f})"
    save_recipe(recipe, out, overwrite=overwrite, header=f"# best recipe of search run {run_dir}: {summary}\n")
    return RecipeExport(Path(out), dump_recipe(recipe), summary)
