"""Checks of a search space against the experiment config's model, beyond substituting values one at a time.

* ``type_mismatch``: a distribution's kind against the type of the field it varies (from the pydantic
  annotation of the dotted path): ``uniform`` / ``loguniform`` sample fractional numbers, so they fit float
  fields only; ``randint`` fits int (and float) fields; grid / choice values are each validated by the field.
* ``joint_points``: the values whose every combination is validated against the cross-field rules (pydantic
  model validators such as ``min_lr <= lr``): every grid / choice value and both bounds of each range, i.e. the
  corners of the box of the continuous dimensions -- exact for rules monotone in each field.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel

from orchestrator.config import ExperimentConfig

#: combinations of grid values and range bounds validated at most; a larger space is refused
MAX_COMBINATIONS = 100_000

_NUMERIC = {"int", "float"}
_DESCRIBE = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "choice": "one of fixed names",
    "text": "text or a path",
    "sequence": "a list",
    "section": "a section",
    "mapping": "a mapping",
    "mixed": "values of several types",
}


def _kind(tp: Any) -> str:
    """The value kind of an annotation: int, float, bool, choice, text, sequence, section, mapping or mixed."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _kind(typing.get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        kinds = {_kind(a) for a in typing.get_args(tp) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else "mixed"
    if origin is Literal:
        return "choice"
    if origin in (tuple, list, set, frozenset):
        return "sequence"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str or (isinstance(tp, type) and issubclass(tp, Path)):
        return "text"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return "mixed"


def _models(tp: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (a discriminated union: each member)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _models(typing.get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [m for a in typing.get_args(tp) for m in _models(a)]
    return [tp] if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def field_kinds(dotted: str, families: list[str | None]) -> dict[str, str]:
    """Kind of the field at ``dotted`` per loss family it exists in (``{"": kind}`` outside ``loss``); {} when
    no model has that path (the value checks then report the unknown path)."""
    out: dict[str, str] = {}
    parts = dotted.split(".")
    for family in families if parts[0] == "loss" else [None]:
        models: list[type[BaseModel]] = [ExperimentConfig]
        kind: str | None = None
        for i, part in enumerate(parts):
            fields = [m.model_fields[part] for m in models if part in m.model_fields]
            if not fields:
                kind = None
                break
            annotation = fields[0].annotation
            kind = _kind(annotation)
            if i == len(parts) - 1:
                break
            if kind == "mapping":  # tracking.tags.<name>: any key, a text value
                kind = "text" if i == len(parts) - 2 else None
                break
            models = _models(annotation)
            if i == 0 and part == "loss" and family is not None:
                models = [m for m in models if m.model_fields["family"].default == family]
            if not models:
                kind = None
                break
        if kind is not None:
            out[family or ""] = kind
    return out


def type_mismatch(dotted: str, dist_kind: str, families: list[str | None]) -> str | None:
    """Why a ``dist_kind`` distribution cannot vary the field at ``dotted``, or None when it can."""
    if dist_kind in ("grid", "choice"):
        return None  # each value is validated by the field itself
    for family, kind in field_kinds(dotted, families).items():
        of = f" (loss family {family})" if family else ""
        if dist_kind in ("uniform", "loguniform") and kind != "float":
            if kind == "int":
                return (
                    f"{dist_kind} samples fractional numbers, but the field takes an integer{of}; "
                    f"use randint or an integer grid"
                )
            return f"{dist_kind} samples numbers, but the field takes {_DESCRIBE[kind]}{of}; use grid or choice"
        if dist_kind == "randint" and kind not in _NUMERIC:
            return f"randint samples integers, but the field takes {_DESCRIBE[kind]}{of}; use grid or choice"
    return None


def joint_points(kind: str, args: Any) -> list[Any]:
    """The values of one distribution that enter the joint check: all grid/choice values, or both bounds."""
    if kind in ("grid", "choice"):
        return list(args)
    lo, hi = args
    return [lo] if lo == hi else [lo, hi]


def count_combinations(points: list[list[Any]]) -> int:
    return math.prod(len(p) for p in points)
