"""Checkpoint files: written atomically (temp file, then rename), read with ``weights_only=True``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename: a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise UserError(f"cannot write checkpoint ({err.strerror or err})", path=str(path)) from None
        raise


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
