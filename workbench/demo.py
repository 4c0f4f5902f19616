"""`workbench demo` (what `make run` starts until the terminal UI lands): a real merge on the
default model, end to end, with the result answering a question."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workbench.home import DEFAULT_MODEL_NAME, workbench_home

DEMO_RECIPE = f"""\
name: demo-ties
merge_method: ties
base_model: {DEFAULT_MODEL_NAME}
models:
  - model: {DEFAULT_MODEL_NAME}-variant-a
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {DEFAULT_MODEL_NAME}-variant-b
    parameters: {{weight: 0.4, density: 0.5}}
parameters:
  normalize: true
dtype: float32
"""
QUESTION = "What is the capital of France?"


def run_demo() -> int:
    from workbench.merge.executor import execute_merge
    from workbench.merge.plan import plan_merge
    from workbench.merge.recipe import parse_recipe
    from workbench.ops.variants import ensure_default_variants

    console = Console(stderr=True)
    with console.status("making two variants of the default model (once)..."):
        ensure_default_variants()
    out = workbench_home() / "merges" / "demo-ties"
    plan = plan_merge(parse_recipe(DEMO_RECIPE, source="<demo recipe>"))
    try:
        with Progress(TextColumn("[bold]merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("", total=len(plan.jobs))
            result = execute_merge(plan, out, overwrite=True,
                                   on_tensor=lambda done, total, name: progress.update(task, completed=done))
    finally:
        plan.close()
    console.print(f"[green]merged[/green] {result.num_tensors} tensors in {result.seconds:.1f} s, "
                  f"peak memory {result.peak_rss_bytes / 1e6:.0f} MB")
    console.print(f"recipe:\n{DEMO_RECIPE}")
    answer = ask(out, QUESTION)
    console.print(f"[bold]{QUESTION}[/bold] -> {answer}")
    print(out)
    return 0


def ask(model_dir, question: str, max_new_tokens: int = 24) -> str:
    """Greedy chat answer of a model directory to one question."""
    import torch
    from workbench.models.loader import load_model

    model, tok = load_model(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
