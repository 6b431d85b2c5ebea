"""Where ``itr sweep`` keeps a sweep: the sweep folder, a local path or a folder in object storage.

``<train.output_dir>/sweeps/<name>`` holds Tune's experiment state, ``itr_sweep.json`` (the MLflow parent run id
and the space's fingerprint: :func:`read_state` / :func:`write_state`), ``train/`` (the Ray Train runs of trials
that drive a TorchTrainer) and ``leaderboard/`` (``leaderboard.csv``, ``plots/*.png``).

With an object-storage ``train.output_dir`` (``s3://``, ``gs://``, any pyarrow URI) the sweep folder is a URI
(a ``str``; a local one is a ``Path``): Tune's ``RunConfig(storage_path=...)`` and ``Tuner.restore`` take it and
keep the experiment state there, the state file goes through pyarrow (:mod:`orchestrator.storage`), and the
leaderboard is written to a local temp folder, logged to MLflow from there and uploaded
(:func:`leaderboard_folder`). Nothing of the sweep then needs a shared POSIX volume.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import storage

#: The sweep's own state file, beside Tune's experiment state.
STATE_FILE = "itr_sweep.json"

SweepFolder = Path | str


def sweep_folder(output_dir: Path | str, name: str) -> SweepFolder:
    """``<output_dir>/sweeps/<name>``: a URI when ``output_dir`` is one (its query string kept at the end), else an
    absolute local path."""
    if storage.is_uri(output_dir):
        return storage.join(output_dir, "sweeps", name)
    return Path(output_dir).expanduser().resolve() / "sweeps" / name


def tune_storage_path(folder: SweepFolder) -> str:
    """Tune's ``RunConfig.storage_path`` for the sweep folder ``folder`` (its parent; Tune adds the name)."""
    if not storage.is_uri(folder):
        return str(Path(folder).parent)
    head, sep, query = str(folder).partition("?")
    return head.rstrip("/").rsplit("/", 1)[0] + sep + query


def read_state(folder: SweepFolder) -> dict[str, Any] | None:
    """The sweep's ``itr_sweep.json``, or ``None`` when there is none (or it is not JSON)."""
    text = storage.read_text(storage.join(folder, STATE_FILE))
    if text is None:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        return None
    return state if isinstance(state, dict) else None


def write_state(folder: SweepFolder, state: dict[str, Any]) -> None:
    """Write the sweep's ``itr_sweep.json`` whole (a reader sees the old file or the new one)."""
    storage.write_text(storage.join(folder, STATE_FILE), json.dumps(state, indent=2, sort_keys=True))


@dataclass
class LeaderboardFolder:
    """Where the leaderboard is drawn: ``local`` (a folder on this machine), published as ``published``."""

    local: Path
    dest: SweepFolder

    def published(self, files: list[Path]) -> list[Path | str]:
        """Where ``files`` (under ``local``) are once the block ended: the same paths, or their URIs."""
        if not storage.is_uri(self.dest):
            return list(files)
        return [storage.join(self.dest, Path(f).relative_to(self.local).as_posix()) for f in files]


@contextlib.contextmanager
def leaderboard_folder(folder: SweepFolder) -> Iterator[LeaderboardFolder]:
    """``<sweep>/leaderboard`` to write into: the folder itself for a local sweep; for one in object storage a
    local temp folder whose files are uploaded to ``<sweep>/leaderboard`` when the block ends without an error
    (then removed)."""
    dest = storage.join(folder, "leaderboard")
    if not storage.is_uri(folder):
        yield LeaderboardFolder(Path(dest), Path(dest))
        return
    with tempfile.TemporaryDirectory(prefix="itr-leaderboard-") as tmp:
        board = LeaderboardFolder(Path(tmp), dest)
        yield board
        files = sorted(p for p in board.local.rglob("*") if p.is_file())
        storage.upload_files(files, board.local, dest)
