"""The GPU check (issue 16): every CUDA path of the workbench, one JSON line per figure.

Steps, each through the command line a user runs (``python -m workbench.cli ...`` under
``tests/gpu/peak.py``, which adds the process's peak CUDA memory), each with its own time limit:

    env        torch, CUDA, the device
    models     a SmolLM2-shaped model (SmolLM2-135M-Instruct's config and tokenizer, random weights:
               the real ones are over what a device call carries) and a 1B-scale Llama (hidden 2048,
               16 layers, 1.07B parameters), each with two seeded variants, bfloat16 safetensors
    merge      TIES over the three 1B-scale models on the device; DARE-TIES on the SmolLM2-shaped
               ones on the device and on CPU: the same tensors (masks drawn device-independently)
    search     the variants' quick search with 2 processes workers; a 3x(1B-scale) search locally:
               candidates per minute
    quantize   2-bit (recipes/2bit.yml) on the device
    recover    1 minute on the device, 1 minute on CPU: steps per second of each
    eval       zoo-perplexity on the device and on CPU: the same perplexity
    triton     tests/test_kernels.py's CUDA tests (Triton kernels against the torch reference)
    decode     greedy tokens per second, batch 1: the 2-bit model (Triton kernels) vs the float one

``--device cpu --small`` runs the same steps on CPU with tiny shapes (a dry run of the plumbing).
Total under 8 minutes on one H200 (each step's limit below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEAK = Path(__file__).with_name("peak.py")


def emit(step: str, **fields) -> None:
    print(json.dumps({"gpu": step, **fields}), flush=True)


def cli(step: str, args: list[str], limit: float, **extra) -> dict:
    """Run ``workbench ARGS`` (with the peak-memory wrapper); emit and return its figures."""
    peak_file = Path(tempfile.mktemp(suffix=".json"))
    env = {**os.environ, "WORKBENCH_GPU_PEAK": str(peak_file)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(PEAK), *args], capture_output=True, text=True, timeout=limit, env=env)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-600:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-300:]
    out = {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), **extra}
    if peak_file.is_file():
        out.update(json.loads(peak_file.read_text()))
        peak_file.unlink()
    if rc != 0:
        out["tail"] = tail
    emit(step, **out)
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_models(work: Path, device: str, small: bool) -> dict[str, list[Path]]:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    src = ROOT / ".gpu" / "smollm2"
    if not src.is_dir():
        from workbench.models.default_model import prepare_default

        src = Path(prepare_default())
    smol_cfg = AutoConfig.from_pretrained(src)
    big_cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=smol_cfg.vocab_size, max_position_embeddings=2048,
                          tie_word_embeddings=True, bos_token_id=smol_cfg.bos_token_id,
                          eos_token_id=smol_cfg.eos_token_id)
    if small:
        smol_cfg.num_hidden_layers, big_cfg.num_hidden_layers = 2, 2
        big_cfg.hidden_size, big_cfg.intermediate_size, big_cfg.num_attention_heads = 256, 512, 4
        big_cfg.num_key_value_heads = 2
    out = {}
    for name, cfg in (("smol", smol_cfg), ("big", big_cfg)):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        base = {k: v.detach() for k, v in model.state_dict().items()}
        dirs = []
        for i in range(3):   # the base and two variants: base + 0.02 * N(0, 1) * |w|.mean()
            g = torch.Generator(device=device).manual_seed(100 + i)
            tensors = {k: (v if i == 0 else v + 0.02 * v.float().abs().mean() *
                           torch.randn(v.shape, generator=g, device=device)).to(torch.bfloat16).cpu().contiguous()
                       for k, v in base.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
            d = work / f"{name}-{i}"
            d.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
            cfg.save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                if (src / f).is_file():
                    shutil.copy(src / f, d / f)
            dirs.append(d)
        emit("models", model=name, parameters=sum(v.numel() for k, v in base.items() if k != "lm_head.weight"),
             dirs=[str(d) for d in dirs])
        del model, base
    return out | {"smol": [work / f"smol-{i}" for i in range(3)], "big": [work / f"big-{i}" for i in range(3)]}


def recipe(path: Path, method: str, models: list[Path], params: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(models[0]),
                                    "models": [{"model": str(m), "parameters": params} for m in models[1:]],
                                    "dtype": "bfloat16"}))
    return path


def max_abs_diff(a: Path, b: Path) -> float | None:
    from safetensors.torch import load_file

    try:
        x, y = load_file(str(next(a.glob("*.safetensors")))), load_file(str(next(b.glob("*.safetensors"))))
    except (StopIteration, OSError):
        return None
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def search_rate(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "history.jsonl").is_file() else []
    return {"candidates": len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a dry run of the steps)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--recover-minutes", type=float, default=None, help="each recovery's budget (default 1; 0.2 --small)")
    args = ap.parse_args()
    import torch

    dev = args.device
    emit("env", torch=torch.__version__, cuda=torch.cuda.is_available(),
         device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", requested=dev)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        emit("env", error="no CUDA device here: nothing ran (use --device cpu --small for a dry run)")
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="wb-gpu-"))
    os.environ.setdefault("WORKBENCH_HOME", str(work / "home"))
    t0 = time.perf_counter()
    models = build_models(work, dev, args.small)
    emit("models", seconds=round(time.perf_counter() - t0, 1))
    smol, big = models["smol"], models["big"]

    cli("merge", ["merge", str(recipe(work / "ties-big.yml", "ties", big, {"weight": 0.5, "density": 0.5})),
                  str(work / "merged-big"), "--device", dev], 150, models="3x1B-scale", method="ties")
    dare = recipe(work / "dare-smol.yml", "dare_ties", smol, {"weight": 0.5, "density": 0.5})
    cli("merge", ["merge", str(dare), str(work / "dare-dev"), "--device", dev, "--seed", "7"], 90,
        models="3xSmolLM2-shaped", method="dare_ties", where=dev)
    cli("merge", ["merge", str(dare), str(work / "dare-cpu"), "--device", "cpu", "--seed", "7"], 90,
        models="3xSmolLM2-shaped", method="dare_ties", where="cpu")
    emit("merge", dare_max_abs_diff_device_vs_cpu=max_abs_diff(work / "dare-dev", work / "dare-cpu"))

    import yaml

    from workbench.ops.variants import variant_spec_dict

    for name, srcs, backend, limit in (("smol", smol, "processes", 120), ("big", big, "local", 150)):
        spec = variant_spec_dict([str(p) for p in srcs[1:]], str(srcs[0]), seed=0)
        spec["name"] = f"gpu-{name}"
        spec["budget"] = {"generations": 2, "population": 4, "max_minutes": 1.5}
        spec["limit"] = 16
        path = work / f"search-{name}.yml"
        path.write_text(yaml.safe_dump(spec))
        run = work / f"search-{name}"
        r = cli("search", ["search", str(path), "--out", str(run), "--device", dev, "--backend", backend,
                           "--workers", "2", "--no-progress", "--no-report"], limit, models=f"3x{name}", backend=backend)
        n = search_rate(run)["candidates"]
        emit("search", models=f"3x{name}", backend=backend, candidates=n,
             candidates_per_minute=round(60 * n / max(r["seconds"], 1e-9), 2))

    qdir = work / "smol-2bit"
    q = cli("quantize", ["quantize", str(smol[0]), "--config", str(ROOT / "recipes" / "2bit.yml"), "--out", str(qdir),
                         "--device", dev, "--no-eval", "--json", str(work / "quant.json")], 120)
    q.update(read_json(work / "quant.json"))
    minutes = args.recover_minutes or (0.2 if args.small else 1.0)
    for label, where in (("device", dev), ("cpu", "cpu")):
        cli("recover", ["recover", str(qdir), "--teacher", str(smol[0]), "--out", str(work / f"recovered-{label}"),
                        "--device", where, "--time-budget", str(minutes), "--no-eval",
                        "--json", str(work / f"rec-{label}.json")], 150, where=where)
        rec = read_json(work / f"rec-{label}.json")
        steps, secs = rec.get("steps"), rec.get("seconds")
        emit("recover", where=where, steps=steps, seconds=secs,
             steps_per_second=round(steps / secs, 3) if steps and secs else None)

    ppl = {}
    for label, where in (("device", dev), ("cpu", "cpu")):
        cli("eval", ["eval", str(smol[0]), "zoo-perplexity", "--split", "heldout", "--device", where, "--no-progress",
                     "--json", str(work / f"eval-{label}.json")], 90, where=where)
        ppl[label] = read_json(work / f"eval-{label}.json").get("zoo-perplexity", {}).get("ppl")
    emit("eval", ppl=ppl, same=None if None in ppl.values() else abs(ppl["device"] - ppl["cpu"]) <= 1e-3 * ppl["cpu"])

    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--override-ini", "addopts=",
                        str(ROOT / "tests" / "test_kernels.py"), "-k", "cuda or triton"],
                       capture_output=True, text=True, timeout=120)
    emit("triton", rc=p.returncode, seconds=round(time.perf_counter() - t, 1), summary=p.stdout.strip()[-300:])

    decode(qdir, smol[0], dev)
    emit("done", seconds=round(time.perf_counter() - t0, 1))
    return 0


def decode(qdir: Path, float_dir: Path, dev: str, tokens: int = 64) -> None:
    import torch

    from workbench.models.loader import load_model

    for label, ref in (("2-bit", qdir), ("float", float_dir)):
        try:
            model, tok = load_model(str(ref), dtype="bfloat16")
            model = model.to(dev)
            ids = tok("The license grants", return_tensors="pt").input_ids.to(dev)
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=4, do_sample=False)   # warm-up (Triton compiles)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
            emit("decode", model=label, tokens_per_second=round(tokens / (time.perf_counter() - t), 1))
        except Exception as e:  # noqa: BLE001 - a figure that cannot be taken is reported, the rest go on
            emit("decode", model=label, error=f"{type(e).__name__}: {e}"[:300])


if __name__ == "__main__":
    sys.exit(main())
