"""What runs inside the Ray Train controller for ``itr train``: MLflow logging of each committed report, and an
immediate stop on worker errors that a restart from the last checkpoint cannot fix.

Why the controller: it outlives its workers. Ray Train calls ``after_report`` only once a report (and its
checkpoint) is committed, and a worker group that dies is restarted from the latest committed checkpoint -- so
logging there gives each epoch exactly once in MLflow, whatever worker is killed when. Logging on a worker
instead would lose the epochs still queued when it dies, and could log an epoch twice when it dies between its
report and the controller's commit.

Step checkpoints (``train.checkpoint_every_steps``) are reports too, made by every rank at the same step and
marked :data:`STEP_REPORT`: MLflow (``after_report``) and Tune (:func:`epoch_reports_to_tune`) skip them, and
their score is below every epoch's, so with :func:`checkpoint_config` Ray keeps the best epoch checkpoint and the
latest checkpoint, step or epoch -- the one a restarted worker group resumes from (``ray.train.get_checkpoint``).

Why stop at once: Ray Train V2 retries every worker error up to ``FailureConfig.max_failures``; a non-finite loss
or a full disk would only repeat. A worker raises :class:`FatalWorkerError` for those; ``after_exception`` re-raises
it, which Ray treats as a controller error and does not retry.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

from ray.train import CheckpointConfig, UserCallback

from orchestrator import tracking
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: The metric Ray Train's checkpoint order reads (``orchestrator.run_ray._score``: the selection metric, or -/+1e30
#: for an epoch that was not evaluated).
SCORE = "checkpoint/score"
#: Marks a mid-epoch report: a step checkpoint, no epoch's metrics.
STEP_REPORT = "checkpoint/step_report"
#: A step checkpoint's score in mode max (negated for min): below an unevaluated epoch's -1e30.
_STEP_SCORE = -1e31


def checkpoint_config(best_mode: str) -> CheckpointConfig:
    """Ray Train's retention for ``itr`` runs: the best checkpoint by :data:`SCORE`, and the latest one.

    Ray 2.60 (``train/v2/_internal/execution/checkpoint/checkpoint_manager.py``) sorts the registered checkpoints
    by score (ties: report order) and deletes all but the top ``num_to_keep`` -- except the latest reported, which
    it never deletes. With ``num_to_keep=1`` that leaves the best epoch and, when it is another one, the latest
    (a step checkpoint scores below every epoch, so it is kept only while it is the latest)."""
    return CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE, checkpoint_score_order=best_mode)


def step_report(epoch: int, step: int, best_mode: str) -> dict[str, float]:
    """The metrics of a step checkpoint's report (``step`` steps of ``epoch`` done): the marker and the position,
    no ``epoch`` key (what MLflow and Tune read as a finished epoch), and a score no epoch checkpoint is below."""
    return {
        STEP_REPORT: 1.0,
        "checkpoint/epoch": float(epoch),
        "checkpoint/step": float(step),
        SCORE: _STEP_SCORE if best_mode == "max" else -_STEP_SCORE,
    }


def is_step_report(metrics: dict[str, Any] | None) -> bool:
    """Whether a report's (rank 0's) metrics are a step checkpoint's rather than an epoch's."""
    return bool(metrics and metrics.get(STEP_REPORT))


def epoch_reports_to_tune() -> UserCallback:
    """Tune's ``TuneReportCallback`` (a sweep trial that drives a TorchTrainer) without the step reports: Tune
    counts each forwarded report as a training iteration (ASHA's rungs) and the sweep logs it as an epoch.
    Made inside the trial (the callback needs its Tune session)."""
    return _epoch_reports_class()()


def _epoch_reports_class() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and is_step_report(metrics[0]):
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochReportsToTune


@runtime_checkable
class _StepError(Protocol):
    """An error that names where training failed (``orchestrator.epoch.NonFiniteLossError``)."""

    epoch: int
    step: int
    terms: list[str]


class FatalWorkerError(RuntimeError):
    """A worker error a restart cannot fix: ``kind`` (the original class name), ``message``, and the ``fields``
    needed to rebuild it on the driver (:meth:`rebuild`). Picklable, unlike some of the errors it carries."""

    def __init__(self, kind: str, message: str, fields: dict[str, Any] | None = None) -> None:
        self.kind, self.message, self.fields = kind, message, dict(fields or {})
        super().__init__(f"{kind}: {message}")

    def __reduce__(self):
        return (type(self), (self.kind, self.message, self.fields))

    @classmethod
    def wrap(cls, err: BaseException) -> FatalWorkerError:
        fields: dict[str, Any] = {}
        if isinstance(err, UserError):
            fields = {"detail": err.detail, "path": err.path, "field": err.field}
        elif isinstance(err, _StepError):  # has epoch, step and terms: NonFiniteLossError
            fields = {"epoch": err.epoch, "step": err.step, "terms": list(err.terms)}
        return cls(err.__class__.__name__, str(err), fields)

    def rebuild(self) -> Exception:
        """The original error as the driver should raise it (a ``UserError`` keeps exit code 2)."""
        if self.kind == "UserError" or "detail" in self.fields:
            return UserError(
                self.fields.get("detail", self.message), path=self.fields.get("path"), field=self.fields.get("field")
            )
        if self.kind == "NonFiniteLossError":
            from orchestrator.train_loop import NonFiniteLossError

            return NonFiniteLossError(self.fields["epoch"], self.fields["step"], self.fields["terms"])
        return self


def fatal_error_of(err: BaseException) -> FatalWorkerError | None:
    """The :class:`FatalWorkerError` behind a failed ``TorchTrainer.fit`` (Ray wraps it in a ``ControllerError``)."""
    from orchestrator.errors import find_in_chain

    return find_in_chain(err, FatalWorkerError, links=("controller_failure", "cause"))


class TrainControllerHooks(UserCallback):
    """A Ray Train ``UserCallback`` (it runs in the controller process).

    - ``after_report``: queues rank 0's metrics at step = epoch on a :class:`tracking.RunLogger` (when ``target``
      and ``run_id`` are given; a step checkpoint's report is skipped); after the last epoch (``last_epoch``)
      waits for them to reach the store (bounded; what is left goes to ``<spill_dir>/mlflow-unsent-*.json``,
      which the driver sends on).
    - ``after_exception``: a :class:`FatalWorkerError` from any rank is re-raised (no retry); other errors are
      counted, and when they exceed ``max_failures`` (the run is about to end) the queue is flushed too.
    """

    def __init__(
        self,
        target: tracking.TrackingTarget | None,
        run_id: str | None,
        *,
        spill_dir: str,
        last_epoch: int,
        max_failures: int,
    ) -> None:
        self.target = target
        self.run_id = run_id
        self.spill_dir = spill_dir
        self.last_epoch = last_epoch
        self.max_failures = max_failures
        self._failures = 0
        self._logger: tracking.RunLogger | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_logger"] = None
        return state

    @property
    def logger(self) -> tracking.RunLogger | None:
        if self._logger is None and self.target is not None and self.run_id:
            from pathlib import Path

            self._logger = tracking.RunLogger(self.target, self.run_id, spill_dir=Path(self.spill_dir))
        return self._logger

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        logger = self.logger
        if logger is None or not metrics:
            return
        rank0 = metrics[0]
        if is_step_report(rank0):  # a step checkpoint: committed, but no epoch to log
            return
        step = int(rank0["epoch"]) if "epoch" in rank0 else None
        if step is None:
            return
        logger.log_metrics(rank0, step)
        if step >= self.last_epoch:
            logger.close()

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        fatal = [
            worker_exceptions[r]
            for r in sorted(worker_exceptions)
            if isinstance(worker_exceptions[r], FatalWorkerError)
        ]
        if not fatal:
            self._failures += 1
            log.warning(
                "worker error %d of %d allowed: %s",
                self._failures,
                self.max_failures,
                "; ".join(f"rank {r}: {e.__class__.__name__}" for r, e in sorted(worker_exceptions.items())),
            )
        if (fatal or self._failures > self.max_failures) and self.logger is not None:
            self.logger.close()
        if fatal:
            raise fatal[0]
