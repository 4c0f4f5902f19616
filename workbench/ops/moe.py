"""The mixture-of-experts action: `workbench moe CONFIG OUT`, as `mergekit-moe CONFIG OUT` (see
:mod:`workbench.merge.moe` for the config, the gate vectors and the output layouts)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit

GATE_DTYPES = ("bfloat16", "float32", "float16")


@dataclass(frozen=True)
class MoeResult:
    out_dir: Path
    architecture: str          # MixtralForCausalLM or Qwen2MoeForCausalLM
    num_experts: int
    experts_per_token: int
    gate_mode: str
    seed: int | None           # the seed random gates (or expert noise) were drawn with; None if none was used
    num_tensors: int
    num_shards: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return (f"{self.architecture}: {self.num_experts} experts, {self.experts_per_token} per token, "
                f"{self.gate_mode} gates{seed}")


def load_config(config):
    """A MoeConfig as it is, or read from a file."""
    from workbench.merge.moe import MoeConfig, load_moe_config

    return config if isinstance(config, MoeConfig) else load_moe_config(config)


def moe(config, out: str | Path, *, device: str = "cpu", gate_dtype: str = "bfloat16", seed: int = 0,
        shard_size: str | int = "2GB", overwrite: bool = False, allow_all_same: bool = False,
        progress: ProgressFn | None = None) -> MoeResult:
    """`workbench moe`: build the mixture of experts ``config`` (a MoeConfig or a YAML file) describes
    into the model directory ``out``, written atomically. Every check (output, shard size, device,
    gate dtype, config, each model's files, headers, shapes and tokenizer) runs before the gate
    vectors are computed. ``gate_dtype`` is the dtype the base model runs in for hidden-state gates
    (mergekit's is bfloat16); ``seed`` draws random gates and expert noise. Progress: stage "gate
    prompts" per prompt, stage "moe" per tensor written."""
    from workbench.atomic import check_output
    from workbench.merge.executor import check_device, parse_size, peak_rss_bytes
    from workbench.merge.moe import RANDOM_MODES, compute_gates, gate_warnings, plan_moe, write_moe

    start = time.perf_counter()
    check_output(out, overwrite)
    size = parse_size(shard_size)
    check_device(device)
    if gate_dtype not in GATE_DTYPES:
        raise WorkbenchError(f"--gate-dtype: expected one of {', '.join(GATE_DTYPES)}, got {gate_dtype!r}")
    cfg = load_config(config)
    plan = plan_moe(cfg, allow_all_same=allow_all_same)
    try:
        gates = compute_gates(plan, device=device, gate_dtype=gate_dtype, seed=seed,
                              on_prompts=lambda done, total, what: emit(progress, "gate prompts", done, total, what))
        warnings = gate_warnings(gates, len(cfg.experts))
        nbytes, shards = write_moe(plan, gates, out, shard_size=size, seed=seed, overwrite=overwrite,
                                   on_tensor=lambda done, total, name: emit(progress, "moe", done, total, name))
    finally:
        plan.close()
    used_seed = (cfg.gate_mode in RANDOM_MODES
                 or any(e.noise_scale for e in cfg.experts + (cfg.shared_experts or [])))
    return MoeResult(Path(out), plan.architecture, len(cfg.experts), cfg.experts_per_token, cfg.gate_mode,
                     seed if used_seed else None, len(plan.jobs), shards, nbytes, time.perf_counter() - start,
                     peak_rss_bytes(), warnings)
