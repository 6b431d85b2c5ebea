"""Checkpoint files: written atomically (temp file, then rename), read with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from orchestrator.errors import UserError

TRAINING_STATE_FILE = "state.pt"
#: In each evaluated checkpoint: the val split's per-query ranks (``orchestrator.results.query_ranks``).
QUERY_RANKS_FILE = "query_ranks.npz"
MODEL_FILE = "model.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename: a reader never sees a partial file.

    Any OS error (disk full, permission, read-only file system) raises a ``UserError`` naming ``path``; the temp
    file is removed and an existing ``path`` is left as it was."""
    atomic_write(path, lambda fh: torch.save(obj, fh), what="checkpoint")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, what: str = "file") -> None:
    """``write(fh)`` into a temp file beside ``path``, fsync, then rename (any file format: npz, JSON, ...).

    Any OS error raises a ``UserError`` naming ``path`` ("cannot write <what> (reason)"); on every failure the temp
    file is removed and an existing ``path`` is left as it was."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except Exception as err:
        os_error = os_error_in(err)
        if os_error is None:
            raise
        raise UserError(f"cannot write {what} ({os_error.strerror or os_error})", path=str(path)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def publish_dir(src: Path, dest: Path) -> None:
    """Copy the checkpoint folder ``src`` to ``dest`` atomically: into ``.<name>.tmp`` beside it, then rename.

    An existing ``dest`` is replaced only once the copy is complete. Any OS error (disk full, permission) raises a
    ``UserError`` naming ``dest``, with the partial copy removed and an existing ``dest`` left as it was."""
    src, dest = Path(src), Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp"
    old = dest.parent / f".{dest.name}.old"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
        _fsync_dir(dest.parent)
    except OSError as err:  # shutil.Error (copytree's list of failures) is an OSError too
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            old.rename(dest)
        raise UserError(f"cannot write checkpoint ({_reason(err)})", path=str(dest)) from None


def _reason(err: OSError) -> str:
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        why = str(err.args[0][0][-1])  # "[Errno 28] No space left on device: 'a' -> 'b'"
        return why.split(": ", 1)[0].split("] ", 1)[-1]
    return err.strerror or str(err)


def os_error_in(err: BaseException) -> OSError | None:
    """``err`` or the OS error behind it: on a full disk ``torch.save`` raises a RuntimeError ("unexpected pos")
    whose context is the ENOSPC ``OSError``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict from ``path`` (``torch.load(weights_only=True)``); UserError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint file not found", path=str(path))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserError(f"not a readable checkpoint ({err.__class__.__name__})", path=str(path)) from None
    if not isinstance(obj, dict):
        raise UserError("not a checkpoint of this project (expected a dict)", path=str(path))
    return obj


def model_file(checkpoint: Path) -> Path:
    """``checkpoint`` itself if it is a file, else its ``model.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint / MODEL_FILE if checkpoint.is_dir() else checkpoint
