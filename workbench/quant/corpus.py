"""Calibration text for recovery: real text that Python or the OS ships, never held-out text.

Sources (``--corpus`` takes any mix, comma separated):

* ``pydoc``: the Python language reference topics shipped with Python (``pydoc_data.topics``);
* ``licenses``: the license texts in /usr/share/common-licenses, minus the held-out ones;
* a path to a text file (or a directory of ``*.txt`` files).

The held-out perplexity files (`HELDOUT_FILES`, the `heldout` split of the `zoo-perplexity` task)
are refused as calibration text, so calibration and held-out text stay apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.eval.taskfile import OS_LICENSES

HELDOUT_TASK = "zoo-perplexity"
HELDOUT_FILES = ("GPL-3", "MPL-2.0")
# The `search` split of the calibration text: what a quantization search scores candidates on
# (about 10k SmolLM2 tokens), kept out of recovery's calibration text as the held-out files are.
SEARCH_FILES = ("GFDL-1.2", "GFDL-1.3")
LICENSE_SKIP = ("GPL", "LGPL", "GFDL")  # symlinks to versioned files already listed


def _heldout_paths() -> set[Path]:
    """Held-out and search text: never calibration text."""
    return {(Path(OS_LICENSES) / f).resolve() for f in HELDOUT_FILES + SEARCH_FILES}


def license_texts(files: tuple[str, ...]) -> list[tuple[str, str]]:
    """[(name, text)] of license files the OS ships (the search or held-out split)."""
    root = Path(OS_LICENSES)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise WorkbenchError(f"corpus: {', '.join(str(root / f) for f in missing)} not found on this machine")
    return [(f"licenses/{f}", (root / f).read_text(errors="replace")) for f in files]


def corpus_texts(spec: str | list[str]) -> list[tuple[str, str]]:
    """[(source name, text)] for a corpus spec such as ``"pydoc,licenses"`` or ``"notes.txt"``."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    texts: list[tuple[str, str]] = []
    heldout = _heldout_paths()
    for name in (n.strip() for n in names if n.strip()):
        if name == "pydoc":
            from pydoc_data import topics

            texts.append(("pydoc", "\n\n".join(topics.topics[k] for k in sorted(topics.topics))))
        elif name == "licenses":
            root = Path(OS_LICENSES)
            if not root.is_dir():
                raise WorkbenchError(f"corpus: licenses: {root} does not exist on this machine")
            for p in sorted(root.iterdir()):
                if p.is_file() and p.resolve() not in heldout and p.name not in LICENSE_SKIP:
                    texts.append((f"licenses/{p.name}", p.read_text(errors="replace")))
        else:
            path = Path(name).expanduser()
            files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
            if not path.exists() or not files:
                raise WorkbenchError(f"corpus: {name!r} is neither 'pydoc', 'licenses' nor an existing text "
                                     "file or directory of .txt files")
            for f in files:
                if f.resolve() in heldout:
                    raise WorkbenchError(f"corpus: {f} is held-out or search text ({HELDOUT_TASK} heldout split, "
                                         "or the quantization search's split); it cannot be used for calibration")
                texts.append((str(f), f.read_text(errors="replace")))
    if not texts:
        raise WorkbenchError("corpus: no calibration text given")
    return texts


def token_windows(tokenizer, texts: list[tuple[str, str]], seq_len: int, max_tokens: int | None,
                  seed: int = 0) -> torch.Tensor:
    """Cut the texts (each ended by EOS) into [N, seq_len] token windows, shuffled with `seed`,
    keeping at most `max_tokens` tokens spread evenly over the sources."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    windows = []
    for _, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        n = len(ids) // seq_len
        if n:
            windows.append(torch.tensor(ids[: n * seq_len]).view(n, seq_len))
    if not windows:
        raise WorkbenchError(f"corpus: the text is shorter than one window of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    if max_tokens is not None:
        budget = max(1, max_tokens // seq_len)
        # Round-robin over sources so a small budget still sees every kind of text.
        order = [w[torch.randperm(len(w), generator=g)] for w in windows]
        picked, i = [], 0
        while len(picked) < budget and any(i < len(o) for o in order):
            picked += [o[i] for o in order if i < len(o)]
            i += 1
        all_windows = torch.stack(picked[:budget])
    else:
        all_windows = torch.cat(windows)
    return all_windows[torch.randperm(len(all_windows), generator=g)]
