"""The README.md model card of a merged model: what was merged, how, and the recipe itself."""

from __future__ import annotations

from pathlib import Path


def write_model_card(plan, out: Path, recipe_yaml: str, seed: int, title: str) -> None:
    method = plan.method
    sources = "\n".join(f"- `{ref}`" + (" (base)" if ref == plan.recipe.base_model else "")
                        for ref in plan.model_refs)
    seed_line = f"\nRandom masks were drawn with seed {seed}.\n" if method.random else ""
    card = f"""---
tags:
- merge
- workbench
---
# {plan.recipe.name or title}

This model was merged with [workbench](https://pypi.org/project/workbench/) using the
**{method.name}** method{f" ({method.reference})" if method.reference else ""}.

## Models merged
{sources}
{seed_line}
## Recipe
The recipe below is also saved as `mergekit_config.yml`, with every model by the absolute path it was
read from; `workbench merge` and `mergekit-yaml` both read it.

```yaml
{recipe_yaml.rstrip()}
```
"""
    (out / "README.md").write_text(card)
