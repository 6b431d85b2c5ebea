"""Where the training loop runs: a ``Session`` gives it its rank, device, checkpoints and a ``report`` callable.

``LocalSession`` runs in-process (tests, benchmarks, ``scaling.backend=local``); the Ray Train session lives
in ``orchestrator.run`` so that this module (and the loop) never import Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE, publish_dir
from orchestrator.interrupts import deferred

log = logging.getLogger(__name__)
#: Called with every report's metrics and its epoch (``tracking.RunLogger`` is one).
MetricsCallback = Callable[[dict[str, float], int], None]


class Session(Protocol):
    """Everything the training loop reads from where it runs (``LocalSession``, ``orchestrator.run``'s
    ``RayTrainSession``, ``orchestrator.sweep.trial.TuneSession``)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def progress(self) -> bool:
        """Show a per-step progress bar (on rank 0)."""
        ...

    @property
    def saves_steps(self) -> bool:
        """The session keeps step checkpoints: the loop calls :meth:`save_step` every
        ``train.checkpoint_every_steps`` steps (otherwise it warns once that the setting is not honoured)."""
        ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def latest_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None: ...

    def save_step(self, checkpoint_dir: Path, epoch: int, step: int) -> None:
        """A mid-epoch checkpoint: ``step`` steps of ``epoch`` done (only called when :attr:`saves_steps`)."""
        ...


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LocalSession:
    """One process. Checkpoints go to ``run_dir/checkpoints/epoch_NNNN``; the latest and the best are kept, the
    best one without its ``state.pt`` (optimiser state) once it is not the latest. Step checkpoints
    (:meth:`save_step`) go to ``checkpoints/step_EEEE_SSSSSSSS`` (epoch, steps done); only the newest is kept,
    and none once a later epoch checkpoint exists.

    ``best_metric``/``best_mode`` pick the best; ``sinks`` receive every report's metrics (e.g. MLflow).
    """

    rank = 0
    world_size = 1
    saves_steps = True

    def __init__(
        self,
        run_dir: Path,
        *,
        best_metric: str = "val/rsum",
        best_mode: str = "max",
        sinks: Sequence[MetricsCallback] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.sinks = list(sinks or [])
        self.device = device or default_device()
        self.history: list[dict[str, float]] = []
        self.progress = sys.stderr.isatty()  # a per-step progress bar on a terminal

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def _checkpoints(self) -> list[Path]:
        """The epoch checkpoint folders (with or without their training state), oldest first."""
        if not self.ckpt_root.is_dir():
            return []
        return sorted(
            p
            for p in self.ckpt_root.glob("epoch_*")
            if (p / TRAINING_STATE_FILE).is_file() or (p / MODEL_FILE).is_file()
        )

    def _step_checkpoints(self) -> list[Path]:
        if not self.ckpt_root.is_dir():
            return []
        return sorted(p for p in self.ckpt_root.glob("step_*_*") if (p / TRAINING_STATE_FILE).is_file())

    def latest_checkpoint(self) -> Path | None:
        """The folder a resume starts from: the newest (by training position) with a training state."""
        found = [p for p in self._checkpoints() if (p / TRAINING_STATE_FILE).is_file()] + self._step_checkpoints()
        return max(found, key=_position, default=None)

    def save_step(self, checkpoint_dir: Path, epoch: int, step: int) -> None:
        """Publish a step checkpoint (``step`` steps of ``epoch`` done) and drop the older ones; no metrics."""
        dest = self.ckpt_root / f"step_{epoch:04d}_{step:08d}"
        with deferred():
            publish_dir(checkpoint_dir, dest)
            for old in self._step_checkpoints():
                if old != dest:
                    shutil.rmtree(old, ignore_errors=True)

    def best_checkpoint(self) -> Path | None:
        marker = self.ckpt_root / "best.json"
        if not marker.is_file():
            return None
        path = self.ckpt_root / json.loads(marker.read_text())["checkpoint"]
        return path if path.is_dir() else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None:
        """Publish the checkpoint, then hand the metrics to the sinks, as one step that SIGTERM / Ctrl-C wait for:
        an epoch reaches MLflow exactly when its checkpoint is on disk, so a resumed run (which starts after the
        latest checkpoint) neither repeats nor skips an epoch's metrics. A checkpoint that cannot be written
        fails the run before its metrics are logged."""
        self.history.append(dict(metrics))
        with deferred():  # the folder, the best marker, the pruning and the metrics are consistent
            if checkpoint_dir is not None:
                self._publish(metrics, checkpoint_dir, epoch)
            for sink in self.sinks:
                sink(metrics, epoch)

    def _publish(self, metrics: dict[str, float], checkpoint_dir: Path, epoch: int) -> None:
        dest = self.ckpt_root / f"epoch_{epoch:04d}"
        publish_dir(checkpoint_dir, dest)  # atomic; a full disk is a one-line UserError, nothing partial left
        score = metrics.get(self.best_metric)
        best = self._best_score()
        if score is not None and is_better(score, best, self.best_mode):
            marker = self.ckpt_root / "best.json"
            tmp_marker = marker.with_suffix(".json.tmp")
            tmp_marker.write_text(json.dumps({"checkpoint": dest.name, "metric": self.best_metric, "value": score}))
            tmp_marker.replace(marker)
        best_dir = self.best_checkpoint()
        for old in self._checkpoints():
            if old == best_dir and old != dest:  # the best needs only its weights and config
                (old / TRAINING_STATE_FILE).unlink(missing_ok=True)
            elif old not in (dest, best_dir):
                shutil.rmtree(old, ignore_errors=True)
        for old in self._step_checkpoints():  # this epoch checkpoint supersedes them
            shutil.rmtree(old, ignore_errors=True)

    def _best_score(self) -> float | None:
        marker = self.ckpt_root / "best.json"
        if not marker.is_file():
            return None
        return float(json.loads(marker.read_text())["value"])


def is_better(score: float, best: float | None, mode: str) -> bool:
    """Whether ``score`` beats ``best`` (None: nothing yet) for a metric to maximise (``mode`` ``max``) or
    minimise (``min``): the run's best score and the session's best checkpoint use this one rule."""
    return best is None or (score > best if mode == "max" else score < best)


def _position(folder: Path) -> tuple[int, int]:
    """(epoch, steps done) a checkpoint folder resumes at: ``epoch_N`` -> (N + 1, 0), ``step_E_S`` -> (E, S)."""
    parts = folder.name.split("_")
    if parts[0] == "step":
        return int(parts[1]), int(parts[2])
    return int(parts[1]) + 1, 0
