"""Dotted keys of a config mapping: ``--set a.b=c`` overrides and the flat ``section.key`` view (MLflow params)."""

from __future__ import annotations

import copy
import json
from typing import Any

from orchestrator.errors import UserError
from orchestrator.yaml_io import YamlSyntaxError, parse_yaml


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested mapping as dotted ``a.b`` -> string (lists and mappings as JSON)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value); the value is parsed as YAML (``2`` -> int, ``null`` -> None)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form a.b=value", path="--set")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise UserError(f"override {text!r} has an empty key", path="--set")
    try:
        value = parse_yaml(raw, "--set").tree if raw.strip() else ""
    except YamlSyntaxError:
        value = raw  # not YAML at all: the text itself
    except UserError as err:  # YAML, but rejected (a tag, a duplicate key, an alias bomb)
        raise UserError(f"{err.detail} (from --set)", path="--set", field=".".join(parts)) from None
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``tree`` with each ``a.b=c`` applied (creating sections as needed)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(tree, ".".join(parts), value)
    return tree


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b]... = value`` for ``dotted`` = ``a.b...``, creating (or replacing non-dict) sections."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
