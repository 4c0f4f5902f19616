"""KL divergence to a teacher from cached top-k teacher log-probs: one student forward per window.

Definition, per scored position: let S be the teacher's top-k tokens and "tail" everything else.
Both distributions are coarse-grained to the k+1 outcomes S ∪ {tail} (no renormalization):

    KL = sum_{i in S} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

with p the teacher's and q the student's full-vocabulary softmax, and the tail masses computed
exactly as log-sum-exp over the complement of S. It is a lower bound on the full KL (coarse-graining
never increases KL), equals it when k is the vocabulary size, and still penalizes a student that
moves mass out of the teacher's top-k. The task's ``kl`` is its mean over positions.

Teacher outputs are computed once per (reference model files, token windows, k) and stored under
``$WORKBENCH_HOME/eval-cache/kl/<sha256>.safetensors``, and kept in memory after the first use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.eval.requests import Prepared
from workbench.eval.scoring import score_requests

CACHE_VERSION = "kl-v1"
_MEMORY: dict[str, dict[str, torch.Tensor]] = {}
_FILE_HASHES: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.absolute()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def model_files_hash(model_dir: Path) -> str:
    """SHA-256 over the config and every safetensors file of a model directory (by content)."""
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.name == "config.json" or p.name.endswith(".safetensors"))
    if not any(p.name.endswith(".safetensors") for p in files):
        raise WorkbenchError(f"{model_dir}: no .safetensors weights (only safetensors are read)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_sha256(p)}\0".encode())
    return h.hexdigest()


def cache_key(ref_hash: str, prepared: Prepared, top_k: int) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}\0{ref_hash}\0{top_k}\0".encode())
    for u in prepared.units:
        for r in u.requests:
            h.update(json.dumps([r.context, r.continuation]).encode())
    return h.hexdigest()


def cache_dir() -> Path:
    from workbench.home import workbench_home

    return workbench_home() / "eval-cache" / "kl"


def topk_reducer(k: int):
    """Engine reducer: per position, the top-k log-probs, their token ids and the log tail mass."""

    def reduce(logp: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, owners) -> torch.Tensor:
        logp = logp[rows]
        vals, idx = logp.topk(min(k, logp.shape[1]), dim=1)
        tail = logp.scatter(1, idx, float("-inf")).logsumexp(1, keepdim=True)
        return torch.cat([vals.double(), idx.double(), tail.double()], 1)

    return reduce


def teacher_placement(model_device: torch.device, dtype: str | None = None) -> tuple[torch.device | None, str]:
    """Where and in which dtype the kl teacher runs beside a model on ``model_device``: on the CPU
    (None) in float32, whatever is asked, so CPU results stay exactly ``workbench eval``'s; beside a
    GPU model on its device, in ``dtype`` (a search's ``eval_dtype``; float32 by default)."""
    if model_device.type == "cpu":
        return None, "float32"
    return model_device, dtype or "float32"


def teacher_topk(task, prepared: Prepared, tokenizer, batch_size: int = 16, progress=None,
                 device: torch.device | None = None, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """``{"logprobs" [P, k], "indices" [P, k], "tail" [P], "vocab" []}`` for the split's positions.

    P runs over every continuation token of every window in order. From memory, else from the disk
    cache, else computed with the reference model (float32 on the CPU unless ``device``/``dtype``
    say otherwise: those outputs are cached apart, keyed by device type and dtype) and stored.
    """
    ref = task.resolve_reference()
    kind = (device or torch.device("cpu")).type
    where = "" if kind == "cpu" and dtype == "float32" else f"\0{kind}\0{dtype}"   # float32 on the CPU: eval's
    key = cache_key(model_files_hash(ref) + where, prepared, task.top_k)
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        _MEMORY[key] = load_file(path)
        return _MEMORY[key]
    from workbench.models.loader import load_model

    teacher, _ = load_model(ref, dtype=dtype)
    if device is not None:
        teacher.to(device)
    reqs = [(r.context, r.continuation) for u in prepared.units for r in u.requests]
    out = torch.cat(score_requests(teacher, reqs, batch_size=batch_size, reducer=topk_reducer(task.top_k),
                                   progress=progress))
    k = (out.shape[1] - 1) // 2
    data = {"logprobs": out[:, :k].float().contiguous(), "indices": out[:, k:2 * k].int().contiguous(),
            "tail": out[:, 2 * k].float().contiguous(),
            "vocab": torch.tensor(teacher.get_output_embeddings().weight.shape[0])}
    del teacher
    from safetensors.torch import save

    from workbench.atomic import atomic_file

    with atomic_file(path, "wb") as f:
        f.write(save(data))
    _MEMORY[key] = data
    return data


def kl_per_position(t_logp: torch.Tensor, t_tail: torch.Tensor, s_logp_topk: torch.Tensor,
                    s_tail: torch.Tensor) -> torch.Tensor:
    """The top-k + tail KL(teacher || student) per row (float64)."""
    t_logp, t_tail = t_logp.double(), t_tail.double()
    s_logp_topk, s_tail = s_logp_topk.double(), s_tail.double()
    body = (t_logp.exp() * (t_logp - s_logp_topk)).sum(1)
    p_tail = t_tail.exp()
    tail = torch.where(p_tail > 0, p_tail * (t_tail - s_tail), torch.zeros_like(p_tail))
    return body + tail


def kl_reducer(teacher: dict[str, torch.Tensor], offsets: list[int]):
    """Engine reducer: the KL at each scored position against the teacher's cached top-k."""
    t_logp, t_idx, t_tail = teacher["logprobs"], teacher["indices"].long(), teacher["tail"]

    def reduce(logp: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, owners) -> torch.Tensor:
        logp = logp[rows]   # windows score each position once, so this is a plain copy at most
        if logp.shape[1] != int(teacher["vocab"]):
            raise WorkbenchError(f"kl: the student's vocabulary ({logp.shape[1]}) differs from the "
                                 f"reference's ({int(teacher['vocab'])})")
        flat = torch.tensor([offsets[r] + t for r, t in owners])
        idx = t_idx[flat].to(logp.device)
        s_top = logp.gather(1, idx)
        s_tail = logp.scatter(1, idx, float("-inf")).logsumexp(1)
        return kl_per_position(t_logp[flat], t_tail[flat], s_top.cpu(), s_tail.cpu())[:, None]

    return reduce
