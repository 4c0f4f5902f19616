"""Give the merged model a tokenizer, per the recipe's ``tokenizer_source`` and ``chat_template``.

- ``base`` (default): the tokenizer of the base model (or the first model);
- a model reference: that model's tokenizer;
- ``union``: accepted when every model has the same tokenizer (then it is that one); a union
  of different vocabularies needs embedding surgery and is refused with a clear message.

Different vocabulary sizes never reach this point: the planner refuses mismatched embedding
shapes before merging.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from workbench.errors import RecipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")   # any of them: the directory has a tokenizer


def tokenizer_fingerprint(model_dir: Path) -> bytes:
    """The bytes of the files that define a tokenizer's vocabulary (equal bytes: the same tokenizer)."""
    return b"".join((model_dir / f).read_bytes() for f in VOCAB_FILES if (model_dir / f).is_file())


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in VOCAB_FILES)


def vocab_difference(vocab: dict[str, int], reference: dict[str, int]) -> str | None:
    """The first token (in sorted order) whose id differs between two vocabularies (or that one lacks);
    None when they are equal."""
    if vocab == reference:
        return None
    return next(t for t in sorted(vocab.keys() | reference.keys()) if vocab.get(t) != reference.get(t))


def tokenizer_dir(plan) -> Path:
    """The model directory whose tokenizer the output gets."""
    recipe = plan.recipe
    source = recipe.tokenizer_source or "base"
    if source == "base":
        return plan.models[plan.reference_model].path
    if source == "union":
        prints = {tokenizer_fingerprint(m.path) for m in plan.models}
        if len(prints) > 1:
            raise RecipeError(f"{recipe.where(('tokenizer_source',))}: tokenizer_source: union of different "
                              "tokenizers is not supported; the models' tokenizers differ. Use `base` or a model.")
        return plan.models[plan.reference_model].path
    if source not in plan.model_refs:
        raise RecipeError(f"{recipe.where(('tokenizer_source',))}: tokenizer_source {source!r} is not one of "
                          f"the recipe's models ({', '.join(plan.model_refs)}) nor base/union")
    return plan.models[plan.model_refs.index(source)].path


def copy_tokenizer_files(src: Path, out: Path) -> None:
    """The tokenizer's files of ``src`` (those present) into ``out``, as they are."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def write_tokenizer(plan, out: Path) -> None:
    copy_tokenizer_files(tokenizer_dir(plan), out)
    template = plan.recipe.chat_template
    if template and template not in ("auto", "base"):
        if "{%" not in template and "{{" not in template:
            raise RecipeError(f"{plan.recipe.where(('chat_template',))}: chat_template must be `auto`, `base` or "
                              "a Jinja template string")
        (out / "chat_template.jinja").write_text(template)
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg.pop("chat_template", None)  # transformers reads chat_template.jinja
        cfg_path.write_text(json.dumps(cfg, indent=2))
