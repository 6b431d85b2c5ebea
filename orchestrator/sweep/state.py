"""Where ``itr sweep`` keeps a sweep: the sweep folder (a local path or a folder in object storage) and its state.

``<train.output_dir>/sweeps/<name>`` holds Tune's experiment state, ``itr_sweep.json`` (the MLflow parent run id
and the space's fingerprint: :func:`read_state` / :func:`write_state`), ``train/`` (the Ray Train runs of trials
that drive a TorchTrainer) and ``leaderboard/`` (``leaderboard.csv``, ``plots/*.png``). :func:`find_resume_point`
says whether a rerun continues a sweep there; :class:`SigtermAsInterrupt` makes SIGTERM leave it resumable.

With an object-storage ``train.output_dir`` (``s3://``, ``gs://``, any pyarrow URI) the sweep folder is a URI
(a ``str``; a local one is a ``Path``): Tune's ``RunConfig(storage_path=...)`` and ``Tuner.restore`` take it and
keep the experiment state there, the state file goes through pyarrow (:mod:`orchestrator.storage`), and the
leaderboard is written to a local temp folder, logged to MLflow from there and uploaded
(:func:`leaderboard_folder`). Nothing of the sweep then needs a shared POSIX volume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from orchestrator import storage
from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.search_space import SearchSpace
    from orchestrator.tracking import TrackingTarget

log = logging.getLogger(__name__)

#: The sweep's own state file (the MLflow parent run id, the space's fingerprint), beside Tune's experiment state.
SWEEP_STATE_FILE = "itr_sweep.json"

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
    text = storage.read_text(storage.join(folder, SWEEP_STATE_FILE))
    if text is None:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError:
        return None
    return state if isinstance(state, dict) else None


def write_state(folder: SweepFolder, state: dict[str, Any]) -> None:
    """Write the sweep's ``itr_sweep.json`` whole (a reader sees the old file or the new one)."""
    storage.write_text(storage.join(folder, SWEEP_STATE_FILE), json.dumps(state, indent=2, sort_keys=True))


@dataclass(frozen=True)
class ResumePoint:
    """Where a sweep starts: ``state`` (an earlier driver's ``itr_sweep.json``, or None) and ``restorable``
    (Tune's experiment state is there: ``Tuner.restore`` continues it)."""

    state: dict[str, Any] | None
    restorable: bool

    @property
    def parent_run_id(self) -> str | None:
        return (self.state or {}).get("parent_run_id") or None


def find_resume_point(folder: SweepFolder, space: SearchSpace, name: str, *, resume: bool) -> ResumePoint:
    """What the sweep folder holds of an earlier run of this sweep. ``UserError`` when ``resume`` insists and there
    is nothing, or when the space or its base config changed since the sweep started."""
    from ray import tune

    state = read_state(folder)
    restorable = tune.Tuner.can_restore(str(folder))
    if resume and not restorable and state is None:
        raise UserError(f"nothing to resume: no sweep at {folder}", path=str(space.path))
    if state is not None and state.get("fingerprint") != space.fingerprint():
        raise UserError(
            f"the space or its base config changed since sweep {name!r} started ({folder}); "
            f"resume it unchanged, or start a new one with --name",
            path=str(space.path),
        )
    return ResumePoint(state, restorable)


def record_state(
    folder: SweepFolder, space: SearchSpace, name: str, parent_run_id: str | None, target: TrackingTarget | None
) -> None:
    """Write ``itr_sweep.json``: the sweep's name, MLflow parent run and store, and the space's fingerprint."""
    write_state(
        folder,
        {
            "name": name,
            "parent_run_id": parent_run_id,
            "tracking_uri": target.uri if target else None,
            "experiment": target.experiment if target else None,
            "fingerprint": space.fingerprint(),
            "space_file": str(space.path),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


class SigtermAsInterrupt:
    """SIGTERM on the driver: the first one asks Tune to stop (as Ctrl-C does: state saved, trials stopped), a
    second one raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self) -> None:
        #: the SIGTERM handler this one replaced (``signal.signal``'s return: a callable, SIG_DFL/SIG_IGN, or None)
        self.previous: Callable[[int, FrameType | None], Any] | int | None = None
        self.count = 0

    def __enter__(self) -> SigtermAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            log.warning("SIGTERM: stopping the sweep (state is saved; itr sweep --resume continues it)")
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


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
