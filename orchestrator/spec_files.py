"""What the three kinds of spec file share -- experiment configs (``orchestrator.config``), search spaces
(``orchestrator.search_space``) and recipes (``orchestrator.recipe``) -- on top of the one YAML reader
(:mod:`orchestrator.yaml_io`):

* :class:`StrictModel`: the pydantic base of every spec model (an unknown key is an error, never ignored);
* :data:`NAME_PATTERN` / :func:`is_name`: what a name that becomes a folder or a tag may be;
* :func:`read_spec_file`: a file read by the shared reader, with :meth:`SpecFile.where` (``file:line`` of a key)
  and :meth:`SpecFile.fail` (a ``UserError`` there);
* :func:`first_error`: the first error of a pydantic ``ValidationError`` as a location without pydantic's
  internal steps and a plain message, with the count of the others (each kind of file words its message
  around it).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.errors import UserError
from orchestrator.yaml_io import LineMap, YamlDoc, read_yaml_file

__all__ = [
    "NAME_PATTERN",
    "FirstError",
    "SpecFile",
    "StrictModel",
    "first_error",
    "is_name",
    "located",
    "read_spec_file",
]

#: a name that becomes a folder, a run key or a tag: letters, digits, '.', '_' and '-', starting with a letter or
#: digit (so never hidden, never ``..``)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

#: location steps pydantic adds for validators and callable discriminators (not keys of the file)
_INTERNAL_STEPS = ("function-", "tagged-")


class StrictModel(BaseModel):
    """Base of the spec-file models: a key the model does not declare is an error (a typo never passes)."""

    model_config = ConfigDict(extra="forbid")


def is_name(text: str, max_length: int | None = None) -> bool:
    """Whether ``text`` matches :data:`NAME_PATTERN` (and is at most ``max_length`` characters)."""
    return NAME_PATTERN.fullmatch(text) is not None and (max_length is None or len(text) <= max_length)


def located(shown: str | Path, lines: LineMap | None, key_path: tuple[Any, ...]) -> str:
    """``shown:line`` of the deepest key of ``key_path`` found by ``lines``, else ``shown``."""
    line = lines.line(key_path) if lines is not None and key_path else None
    return f"{shown}:{line}" if line else str(shown)


@dataclass(frozen=True)
class SpecFile:
    """A spec file read by the shared reader: ``shown`` is its path as given (messages name it so)."""

    shown: str
    doc: YamlDoc

    @property
    def tree(self) -> dict[str, Any]:
        return self.doc.tree

    @property
    def lines(self) -> LineMap:
        return self.doc.lines

    @property
    def text(self) -> str:
        return self.doc.text

    def where(self, *key_path: Any) -> str:
        """``file:line`` of a key of the file (the deepest of ``key_path`` found), else the file."""
        return located(self.shown, self.lines, key_path)

    def fail(self, message: str, key_path: tuple[Any, ...] | list[Any] = (), field: str | None = None) -> UserError:
        """A ``UserError`` at the line of ``key_path`` (to raise)."""
        return UserError(message, path=self.where(*key_path), field=field)


def read_spec_file(path: str | Path, what: str) -> SpecFile:
    """The mapping at ``path`` (:func:`orchestrator.yaml_io.read_yaml_file`; ``what`` names a missing file)."""
    return SpecFile(str(path), read_yaml_file(path, what=what))


@dataclass(frozen=True)
class FirstError:
    """The first error of a ``ValidationError``.

    ``loc``: the keys leading to it (ints for list items), without pydantic's validator steps and the tags of the
    discriminated unions given to :func:`first_error`. ``message``: pydantic's, without its ``Value error, ``
    prefix; ``unknown key`` for a key the model does not declare. ``cause``: the exception a validator raised
    (``ctx["error"]``), if any. ``more``: how many errors follow it."""

    loc: tuple[Any, ...]
    message: str
    type: str
    input: Any
    has_input: bool
    cause: BaseException | None
    more: int

    @property
    def dotted(self) -> str:
        return ".".join(str(p) for p in self.loc)

    def counted(self, message: str) -> str:
        """``message`` with `` (+N more)`` when other errors follow."""
        return message + (f" (+{self.more} more)" if self.more else "")


def first_error(
    err: ValidationError,
    union_tags: Mapping[str, Collection[str]] | None = None,
    missing: str | None = "required key missing",
) -> FirstError:
    """The first error of ``err``. ``union_tags``: field name -> the tags of its discriminated union (pydantic puts
    the tag right after the field in the location: ``loss.infonce.margin`` is reported as ``loss.margin``).
    ``missing``: the message for a required key that is absent (None: pydantic's own)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc: list[Any] = []
    for step in first["loc"]:
        if isinstance(step, str) and step.startswith(_INTERNAL_STEPS):
            continue
        if union_tags and loc and isinstance(step, str) and step in union_tags.get(str(loc[-1]), ()):
            continue
        loc.append(step)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing" and missing is not None:
        message = missing
    return FirstError(
        loc=tuple(loc),
        message=message,
        type=first["type"],
        input=first.get("input"),
        has_input="input" in first,
        cause=(first.get("ctx") or {}).get("error"),
        more=len(errors) - 1,
    )
