"""What the on-disk readers share: caption cleaning and checks, JSON reading, ids, and paths kept inside a root."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

_PUNCT = re.compile(r"[,.'!?\"()*#:;~\-/]")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 64) -> str:
    """CUSA's ``pre_caption``: lower-case; ``,.'!?"()*#:;~`` and ``-``/``/`` to spaces; at most 64 words."""
    text = _SPACES.sub(" ", _PUNCT.sub(" ", caption.lower())).strip()
    if text.count(" ") < max_words:  # at most max_words words: nothing to cut
        return text
    return " ".join(text.split(" ")[:max_words])


def read_json(path: Path) -> Any:
    """The parsed JSON file ``path``; ``UserError`` naming it when it is absent, not JSON or not UTF-8."""
    if not path.is_file():
        raise UserError("annotation file not found", path=str(path))
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON (line {err.lineno}: {err.msg})", path=str(path)) from None
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text file", path=str(path)) from None


def caption_text(value: Any, path: Path, where: str, clean: bool) -> str:
    """A record's caption, cleaned (``clean``) or stripped; ``UserError`` at ``where`` for non-text or empty."""
    if not isinstance(value, str):
        raise UserError(f"caption is not text ({type(value).__name__})", path=str(path), field=where)
    text = clean_caption(value) if clean else value.strip()
    if not text:
        raise UserError("caption is empty", path=str(path), field=where)
    return text


_PARENT = os.pardir + os.sep


def escapes_root(relative: str) -> bool:
    """Whether ``relative`` leaves the folder it is relative to: absolute, or ``..`` after lexical normalisation.

    Lexical only (``os.path.normpath``, no ``resolve``): a symlink inside the root that points outside is not seen.
    """
    norm = os.path.normpath(relative)
    return os.path.isabs(norm) or norm == os.pardir or norm.startswith(_PARENT)


def is_plain_relative(path: str) -> bool:
    """Whether ``path`` is already a normalised relative path that stays inside its root: no empty, ``.`` or
    ``..`` component, no leading or trailing separator (then ``os.path.normpath(path) == path``, checked in a few
    substring tests instead of a normalisation; other paths take the full route)."""
    return (
        bool(path)
        and path[0] not in "./"
        and path[-1] != "/"
        and "//" not in path
        and "/." not in path
        and ".." not in path
    )


def outside_root(relative: str, root: Path, path: Path, where: str) -> UserError:
    """The error for an image path that leaves the dataset root."""
    return UserError(
        f"image path {relative!r} is outside the dataset root {root} (data.allow_outside_root: true allows it)",
        path=str(path),
        field=where,
    )


def text_id(value: Any, what: str, path: Path, where: str) -> str:
    """An id (``image_id``, ``cocoid``, ``sentid``) as text: an integer or a non-empty string, nothing coerced."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{what} must be an integer or a non-empty string, not {kind}", path=str(path), field=where)
    return str(value)
