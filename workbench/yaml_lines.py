"""YAML read with the line of every field, so that validation errors can say ``file:line: field``.

Shared by the merge recipe, the search spec and the quantization config.
"""

from __future__ import annotations

from typing import Any

import yaml


def line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each field path of a composed YAML document to its 1-based line number."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            out[key] = k.start_mark.line + 1
            line_map(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            line_map(v, (*path, i), out)
    return out


def parse_with_lines(text: str, source: str, error: type[Exception]) -> tuple[Any, dict[tuple, int]]:
    """(data, {field path: line}); invalid YAML raises `error` naming ``source:line``."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise error(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    return data, (line_map(node) if node is not None else {})


def field_location(source: str, lines: dict[tuple, int], path: tuple) -> str:
    """``source:line`` of a field path such as ('models', 1, 'parameters'), or of its nearest parent."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return f"{source}:{lines[path[:n]]}"
    return source
