"""Load YAML files into pydantic models with errors that name the file, the field path and the line.

Used by the job spec and by simulator scenarios: one place that turns a YAML mistake into a message
a user can act on ("jobs/x.yaml:14: partners.1.workers: min (3) is greater than max (2)").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file (or a value in it) is wrong. The message names file, field and line."""


def _line_index(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each field path (tuple of keys/indices) of a composed YAML tree to its 1-based line."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            lines.update(_line_index(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, (*path, i)))
    return lines


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    """Line of the deepest existing prefix of `loc` (a missing key points at its parent)."""
    for cut in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:cut])
        if key in lines:
            return lines[key]
    return None


def format_location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def format_validation_error(err: ValidationError, source: str, lines: dict[tuple, int],
                            docs: str = "docs/configuration.md") -> str:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = _nearest_line(lines, loc)
        where = f"{source}:{line}" if line else source
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; see {docs})"
        out.append(f"{where}: {format_location(loc)}: {msg}")
    return "\n".join(out)


def read_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file; return (data, line index). Bad syntax: ConfigError with the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return data, (_line_index(node) if node is not None else {})


def load_model(model: type[M], path: str | Path, context: dict | None = None,
               docs: str = "docs/configuration.md") -> M:
    """Read `path`, validate it as `model`; all mistakes are reported in one ConfigError."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), lines, docs)) from None
