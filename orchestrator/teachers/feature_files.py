"""Precomputed teacher-feature files: reading the ``.npz (ids, features)`` layout, and converting the CUSA
authors' pickled ``.npy`` dicts into it (``itr convert-features``).

Feature files are data, so nothing here unpickles with the full :mod:`pickle`: an ``.npz`` is read with
``allow_pickle=False``, and a pickled ``.npy`` is refused by the ``file:`` teacher (its header is read,
never its payload) with a pointer to :func:`convert_features`, which reads it through
:class:`~orchestrator.teachers.safe_pickle.RestrictedUnpickler` (numpy arrays, dicts, lists, str, int).
"""

from __future__ import annotations

import logging
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import UserError
from orchestrator.teachers.cache import check_finite
from orchestrator.teachers.safe_pickle import RefusedPickle, load_npy_restricted, npy_holds_pickle

log = logging.getLogger(__name__)

FIELD = "teachers.image"


def convert_hint(path: Path) -> str:
    """The command that converts the pickled ``.npy`` at ``path`` into an ``.npz``."""
    return f"itr convert-features {path} {path.with_suffix('.npz')}"


def read_features_file(path: Path, field: str = FIELD) -> tuple[list[str], np.ndarray]:
    """(ids as str (N,), float32 features (N, D), all finite) of an ``.npz (ids, features)``.

    A ``.npy`` is refused: a numeric one holds no ids, a pickled one would run code from the file to load
    (the message says how to convert it). ``UserError`` naming ``path`` and ``field`` for anything wrong.
    """
    path = Path(path)
    try:
        if path.suffix == ".npy":
            if npy_holds_pickle(path):
                raise UserError(
                    "this .npy holds a pickle, which is not loaded (unpickling can run code from the "
                    f"file); convert it once with: {convert_hint(path)}",
                    path=str(path),
                    field=field,
                )
            raise UserError(
                "a .npy of plain numbers holds no image ids; save an .npz with arrays 'ids' (N,) and 'features' (N, D)",
                path=str(path),
                field=field,
            )
        if path.suffix != ".npz":
            raise UserError(
                "teacher features must be an .npz with arrays 'ids' and 'features' (a pickled .npy "
                "dict: convert it with itr convert-features IN.npy OUT.npz)",
                path=str(path),
                field=field,
            )
        with np.load(path, allow_pickle=False) as z:
            if "ids" not in z.files or "features" not in z.files:
                raise UserError(
                    f"an .npz of teacher features needs arrays 'ids' and 'features' (found {sorted(z.files)})",
                    path=str(path),
                    field=field,
                )
            ids = [str(i) for i in z["ids"].tolist()]
            feats = np.asarray(z["features"], dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(
            f"cannot read teacher features ({err.__class__.__name__}: {err})", path=str(path), field=field
        ) from None
    if feats.ndim != 2 or feats.shape[0] != len(ids):
        raise UserError(
            f"'features' must be (N, D) with N = len(ids) = {len(ids)}, got {feats.shape}", path=str(path), field=field
        )
    if not ids:
        raise UserError("no features in the file", path=str(path), field=field)
    check_finite(feats, path=path, field=field, hint="fix the file")
    return ids, feats


def table_to_features(table: Any, path: Path, field: str | None = None) -> tuple[list[str], np.ndarray]:
    """(ids as str, float32 (N, D)) of a CUSA-style dict ``{image_id: array (1, D) or (D,)}``."""
    if not isinstance(table, dict):
        what = f"a {table.shape} {table.dtype} array" if isinstance(table, np.ndarray) else f"a {type(table).__name__}"
        raise UserError(
            f"a pickled .npy of teacher features must hold a dict {{image_id: array}}; this one holds {what}",
            path=str(path),
            field=field,
        )
    ids, rows, dim = [], [], None
    for key, value in table.items():
        if not isinstance(key, (str, int, np.integer, np.str_)) or isinstance(key, bool):
            raise UserError(f"key {key!r} is not an image id (str or int)", path=str(path), field=field)
        if not isinstance(value, np.ndarray) or value.dtype.hasobject or value.dtype.kind not in "fiu":
            raise UserError(f"entry {key!r} is not a numeric array", path=str(path), field=field)
        arr = value.astype(np.float32)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise UserError(
                f"entry {key!r} has shape {value.shape}, expected (1, D) or (D,)", path=str(path), field=field
            )
        if dim is None:
            dim = arr.shape[0]
        elif arr.shape[0] != dim:
            raise UserError(
                f"entry {key!r} has dimension {arr.shape[0]}, the first entry {dim}", path=str(path), field=field
            )
        ids.append(str(key))
        rows.append(arr)
    if not rows:
        raise UserError("no features in the file", path=str(path), field=field)
    return ids, np.stack(rows)


def read_pickled_table(path: Path) -> tuple[list[str], np.ndarray]:
    """(ids, float32 (N, D)) of a pickled ``.npy`` dict, read with the restricted unpickler (never runs code)."""
    path = Path(path)
    try:
        obj = load_npy_restricted(path)
    except RefusedPickle as err:
        raise UserError(f"{err}; nothing from the file was run", path=str(path)) from None
    except FileNotFoundError:
        raise UserError("file not found", path=str(path)) from None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError, AttributeError) as err:
        raise UserError(f"cannot read this .npy ({err.__class__.__name__}: {err})", path=str(path)) from None
    ids, feats = table_to_features(obj, path)
    check_finite(feats, path=path, hint="nothing was written")
    return ids, feats


def convert_features(src: Path, dst: Path) -> tuple[int, int]:
    """Convert the pickled ``.npy`` dict ``src`` into ``dst`` (``.npz`` with ``ids`` str (N,) and ``features``
    float32 (N, D), values unchanged), written atomically. Returns (N, D).

    ``UserError`` when ``dst`` is ``src``, does not end in ``.npz``, or its folder is missing / not writable.
    """
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    if dst.suffix != ".npz":
        raise UserError("the output must end in .npz", path=str(dst))
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise UserError("the output is the input file; name another file", path=str(dst))
    if not src.is_file():
        raise UserError("file not found", path=str(src))
    ids, feats = read_pickled_table(src)
    if not dst.parent.is_dir():
        raise UserError("the output folder does not exist", path=str(dst))
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.asarray(ids, dtype=str), features=feats)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except OSError as err:
        raise UserError(
            f"cannot write the output ({err.__class__.__name__}: {err.strerror or err})", path=str(dst)
        ) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a partial file otherwise
    log.debug("converted %d teacher features (D=%d) from %s to %s", len(ids), feats.shape[1], src, dst)
    return len(ids), int(feats.shape[1])


__all__ = ["convert_features", "convert_hint", "read_features_file", "read_pickled_table", "table_to_features"]
