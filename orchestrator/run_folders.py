"""Run folders of ``itr train``: a new unique one for every run, or one stable folder per ``train.run_key``.

- Without a key: ``<base>-<6 hex>``, created exclusively (:func:`new_run_folder`), so two runs of one config
  started in the same second never share a folder.
- With ``train.run_key`` (:func:`claim_keyed_folder`): ``<root>/<run_key>``, which the next attempt of the same
  command (a Kubernetes Job or RayJob retry after preemption) resumes from its latest checkpoint. The folder
  records the config hash of the run that created it (``itr_run.json``); another config, a finished run, or a
  second process at the same time (an exclusive ``flock`` on ``.itr.lock``, held for the run's lifetime) is
  refused with a one-line ``UserError`` naming the folder, before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: The record of a keyed run folder: its key, the config hash it was created for, and whether it finished.
RUN_FILE = "itr_run.json"
#: The lock file of a keyed run folder (``flock``-ed by the process that runs in it; holds its pid).
LOCK_FILE = ".itr.lock"
FIELD = "train.run_key"


def new_run_folder(root: Path, base: str) -> tuple[str, Path]:
    """A run name ``<base>-<6 hex>`` and its folder under ``root``, created here and only here (exclusive mkdir,
    retried on a clash), so two runs of one config started in the same second never share a folder."""
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        name = f"{base}-{secrets.token_hex(3)}"
        try:
            (root / name).mkdir()
        except FileExistsError:
            continue
        return name, root / name
    raise RuntimeError(f"no free run folder name {base}-<hex> in {root}")  # pragma: no cover - 100 clashes


@dataclass
class KeyedFolder:
    """A claimed ``<root>/<run_key>`` folder: ``resumed`` when an earlier attempt created it. Holds the lock
    until :meth:`release` (or the process ends)."""

    name: str
    path: Path
    resumed: bool
    lock_fd: int | None

    def mark_finished(self, run_id: str | None) -> None:
        """Record that the run finished, so a rerun of the same command is refused instead of training nothing."""
        record = read_record(self.path) or {}
        record.update(status="finished", mlflow_run_id=run_id)
        _write_record(self.path, record)

    def release(self) -> None:
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)
            self.lock_fd = None


def read_record(folder: Path) -> dict | None:
    """The folder's ``itr_run.json`` (``None`` when there is none)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(
            f"unreadable run record ({err.__class__.__name__}); remove the folder to start over",
            path=str(path),
            field=FIELD,
        ) from None
    if not isinstance(record, dict):
        raise UserError("not a run record of itr train; remove the folder to start over", path=str(path), field=FIELD)
    return record


def _write_record(folder: Path, record: dict) -> None:
    path = Path(folder) / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _lock(folder: Path) -> int:
    """An exclusive, non-blocking ``flock`` on ``folder/.itr.lock`` (its fd); ``UserError`` if another holds it."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(
            f"in use by another itr train (pid {holder}); two runs never share a folder: wait for it "
            f"to end or set another {FIELD}",
            path=str(folder),
            field=FIELD,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim_keyed_folder(root: Path, key: str, config_hash: str, *, resume: bool) -> KeyedFolder:
    """Lock ``root/key`` (created if missing) for this process and check that this run may use it.

    Refused (``UserError`` naming the folder, field ``train.run_key``; nothing written): another process holds it;
    it holds a run of another config hash; it holds a finished run; it holds a run and ``resume`` is false; it
    holds files but no run record (not made by a keyed run). A new folder gets its record at once."""
    folder = Path(root) / key
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder)
    try:
        record = read_record(folder)
        if record is None:
            strays = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
            if strays:
                raise UserError(
                    f"holds files but no {RUN_FILE} ({', '.join(strays[:3])}); it is no keyed run of "
                    f"itr train: remove it or set another {FIELD}",
                    path=str(folder),
                    field=FIELD,
                )
            _write_record(folder, {"run_key": key, "config_hash": config_hash, "status": "running"})
            log.info("run folder %s (run key %s)", folder, key)
            return KeyedFolder(key, folder, resumed=False, lock_fd=fd)
        stored = record.get("config_hash")
        if stored != config_hash:
            raise UserError(
                f"holds a run of another config (config hash {stored}, this config's is {config_hash}); "
                f"a resumed run must keep its config: set another {FIELD}, or remove the folder to "
                "start over",
                path=str(folder),
                field=FIELD,
            )
        if record.get("status") == "finished":
            raise UserError(
                f"holds a finished run (MLflow run {record.get('mlflow_run_id') or '-'}); nothing to "
                f"resume: set another {FIELD} to train again",
                path=str(folder),
                field=FIELD,
            )
        if not resume:
            raise UserError(
                f"holds an earlier attempt of this run and train.resume is false: remove the folder or "
                f"set another {FIELD}",
                path=str(folder),
                field=FIELD,
            )
        log.info("resuming the run in %s (run key %s)", folder, key)
        return KeyedFolder(key, folder, resumed=True, lock_fd=fd)
    except BaseException:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise
