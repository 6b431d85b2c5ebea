"""Buffered sending: a ``RunLogger`` queues a run's ops and sends them from a background thread, riding out
tracking-server outages (retry with backoff, then a local copy that :func:`replay_unsent` sends later)."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.tracking import ops
from orchestrator.tracking.ops import Op
from orchestrator.tracking.target import TrackingTarget, client

log = logging.getLogger(__name__)

#: How long the end of a run waits for the tracking store to take what is still queued; env
#: ``ITR_MLFLOW_FLUSH_TIMEOUT_S`` overrides it. Whatever is still unsent then is written to a local file.
DEFAULT_FLUSH_TIMEOUT_S = 300.0
#: The name of a local copy of unsent ops starts so: ``mlflow-unsent-<run id>-<pid>.json``.
UNSENT_PREFIX = "mlflow-unsent-"


def flush_timeout_s() -> float:
    """``ITR_MLFLOW_FLUSH_TIMEOUT_S`` (seconds) or :data:`DEFAULT_FLUSH_TIMEOUT_S`."""
    try:
        return max(0.0, float(os.environ.get("ITR_MLFLOW_FLUSH_TIMEOUT_S", DEFAULT_FLUSH_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_FLUSH_TIMEOUT_S


class RunLogger:
    """Everything logged to one MLflow run during training, never blocking it and never lost.

    Calls (``log_metrics``, ``log_params``, ``set_tag``, ``log_text``, ``log_artifacts``, ``end_run``) queue ops
    (:mod:`orchestrator.tracking.ops`) that one background thread sends in order. When the store is unreachable
    (server down, network, locked database) the op stays at the head of the queue and is retried with
    exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``) -- inside each attempt MLflow's own HTTP
    retries run too (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with backoff factor 2: about 4 minutes). An
    op the store rejects (a 4xx such as an invalid value) is dropped with a warning. ``close`` waits at most
    ``timeout_s`` for the queue to drain, then writes what is left to ``<spill_dir>/mlflow-unsent-<run id>.json``
    (replayable with :func:`replay_unsent`) and warns naming the file.

    Callable as a metric sink: ``logger(metrics, step)``. Picklable (the queue and thread are not carried).
    """

    def __init__(
        self,
        target: TrackingTarget,
        run_id: str,
        *,
        spill_dir: Path | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.target = target
        self.run_id = run_id
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._setup()

    def _setup(self) -> None:
        self._ops: collections.deque[Op] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self.last_error: str | None = None
        self.dropped: list[Op] = []
        self.sent = 0
        self._staging: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("target", "run_id", "spill_dir", "backoff_s", "max_backoff_s")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # -- what callers queue
    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue one step's metrics (numeric values; ``checkpoint/*`` keys skipped), stamped now unless given."""
        self._put(ops.metrics_op(metrics, step, timestamp_ms))

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(ops.params_op(params))

    def set_tag(self, key: str, value: str) -> None:
        self._put(ops.tag_op(key, value))

    def log_text(self, name: str, text: str, artifact_path: str | None = None) -> None:
        self._put(ops.text_op(name, text, artifact_path))

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Queue files: each is copied now to a staging folder (the caller may delete its own at once)."""
        for p in paths:
            if self._staging is None:
                if self.spill_dir is not None:
                    self.spill_dir.mkdir(parents=True, exist_ok=True)
                self._staging = Path(tempfile.mkdtemp(prefix=".mlflow-staging-", dir=self.spill_dir))
            dest = Path(tempfile.mkdtemp(dir=self._staging)) / Path(p).name
            shutil.copy2(p, dest)
            self._put(ops.artifact_op(dest, artifact_path, staged=True))

    def end_run(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Queue the run's end (FINISHED, FAILED or KILLED) with ``reason`` as the ``itr.failure`` tag."""
        self._put(ops.end_op(status, reason))

    def adopt(self, path: Path) -> int:
        """Queue the ops another process left unsent in ``path`` (a file :meth:`close` wrote), then delete it."""
        queued = json.loads(Path(path).read_text(encoding="utf-8"))["ops"]
        for op in queued:
            self._put(op)
        Path(path).unlink()
        return len(queued)

    # -- state
    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._ops)

    def flush(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for every queued op to be sent; True when the queue is empty."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._ops:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush for at most ``timeout_s`` (default :func:`flush_timeout_s`); write what is left to a local file.

        Returns True when everything reached the store. The logger stays usable (a later call queues again)."""
        if self.flush(flush_timeout_s() if timeout_s is None else timeout_s):
            return True
        with self._cond:
            left = list(self._ops)
            self._ops.clear()
        where = self._spill(left)
        log.warning(
            "MLflow at %s did not take %s for run %s (last error: %s); a local copy is in %s "
            "(orchestrator.tracking.replay_unsent replays it)",
            self.target.uri,
            ops.describe_ops(left),
            self.run_id,
            self.last_error,
            where,
        )
        return False

    def _spill(self, left: list[Op]) -> Path:
        base = self.spill_dir if self.spill_dir is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{UNSENT_PREFIX}{self.run_id}-{os.getpid()}.json"
        doc = {
            "run_id": self.run_id,
            "tracking_uri": self.target.uri,
            "experiment": self.target.experiment,
            "last_error": self.last_error,
            "ops": left,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        tmp.replace(path)
        return path

    # -- the sender
    def _put(self, op: Op) -> None:
        with self._cond:
            self._ops.append(op)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"mlflow-{self.run_id[:8]}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        c = client(self.target)
        delay = self.backoff_s
        while True:
            with self._cond:
                while not self._ops:
                    self._cond.wait()
                op = self._ops[0]
            try:
                ops.send_op(c, self.run_id, op)
            except Exception as err:  # noqa: BLE001 - any failure of the store: retry or drop, never raise
                self.last_error = f"{err.__class__.__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                if ops.is_permanent_error(err):
                    log.warning(
                        "MLflow rejected %s for run %s, dropped: %s",
                        ops.describe_ops([op]),
                        self.run_id,
                        self.last_error,
                    )
                    self._done(op, dropped=True)
                    continue
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning(
                        "MLflow at %s unreachable (%s); buffering and retrying", self.target.uri, self.last_error
                    )
                time.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)
                continue
            if self._failing_since is not None:
                log.warning(
                    "MLflow at %s reachable again after %.0f s; sending %d buffered call(s)",
                    self.target.uri,
                    time.monotonic() - self._failing_since,
                    self.pending,
                )
                self._failing_since = None
            delay = self.backoff_s
            self._done(op)

    def _done(self, op: Op, dropped: bool = False) -> None:
        with self._cond:
            if self._ops and self._ops[0] is op:
                self._ops.popleft()
            if dropped:
                self.dropped.append(op)
            else:
                self.sent += 1
            self._cond.notify_all()
        if op.get("staged") and not dropped:
            staged = Path(op["path"])
            with contextlib.suppress(OSError):
                staged.unlink()
                staged.parent.rmdir()
                staged.parent.parent.rmdir()  # the staging folder, once its last file went


def replay_unsent(path: Path, tracking_uri: str | None = None) -> int:
    """Send the ops a :class:`RunLogger` left in ``path`` (to ``tracking_uri`` or the one recorded there).

    Synchronous, in order; raises on the first failure (rerun it later). Deletes the file when all went through."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    target = TrackingTarget(
        uri=tracking_uri or doc["tracking_uri"], artifact_root=None, experiment=doc.get("experiment") or ""
    )
    ops.send(target, doc["run_id"], *doc["ops"])
    Path(path).unlink()
    return len(doc["ops"])
