"""Every use of a private Ray API (or of a Ray internal module) by the sweep, in one place.

Each was checked against the installed Ray (:data:`CHECKED_AGAINST`); the comment above each says why it is
still needed there. When Ray is upgraded, read these again: what the new Ray does itself goes.

- :func:`abortable_train_run` / :func:`abort_live_train_runs`: stopping a trial that drives a TorchTrainer frees
  its Train workers (``ray.train.v2._internal...ControllerCallback``, the controller's ``abort``);
- :func:`sweep_trainable`: the trainable class whose cleanup does that (``function_trainable.wrap_function``);
- :func:`use_callbacks_on_restore`: a restored sweep uses this driver's callbacks (``Tuner._local_tuner``);
- :func:`trial_error`: a failed trial's error, read where Tune writes it first (``Trial.pickled_error_file``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.trainable.function_trainable import FunctionTrainable, wrap_function

log = logging.getLogger(__name__)

#: The Ray release every workaround below was checked against.
CHECKED_AGAINST = "2.60.0"

# ------------------------------------------------------------- stopping a trial that drives a TorchTrainer
# checked against ray 2.60.0: when Tune stops such a trial (ASHA, an interruption) it ends the trial's actor; the
# Train controller that actor owns dies with it, and the placement group of its workers stays (a non-detached
# group goes once both its creator and the creator's job are gone; the job is the sweep's driver, still running).
# Ray Train 2.60 adds a PlacementGroupCleaner (a detached actor) for this, but it learns that the controller died
# through the state API (``ray.util.state.get_actor``), which needs the dashboard, and ``init_ray`` starts Ray
# without one: the CPUs would stay reserved and later trials wait forever. So the controller publishes its handle
# (a ControllerCallback: the public UserCallback has no hook before the first report), and the trial's cleanup
# aborts it first (``TrainController.abort``): the controller then shuts its workers down and removes the group
# itself.
_LIVE_TRAIN_RUNS: list = []  # per trial process: queues holding the handles of running Train controllers


class PublishController(ControllerCallback):
    """Runs inside the Train controller: sends the controller's own actor handle to the trial."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def after_controller_start(self, train_run_context) -> None:
        import ray

        self.queue.put(ray.get_runtime_context().current_actor)


@contextlib.contextmanager
def abortable_train_run() -> Iterator[PublishController]:
    """A Ray Train callback to pass to the TorchTrainer a trial fits: while the block runs,
    :func:`abort_live_train_runs` (the trial's cleanup) can abort that run."""
    from ray.util.queue import Queue

    controllers = Queue(actor_options={"num_cpus": 0})
    _LIVE_TRAIN_RUNS.append(controllers)
    try:
        yield PublishController(controllers)
    finally:
        if controllers in _LIVE_TRAIN_RUNS:
            _LIVE_TRAIN_RUNS.remove(controllers)
        controllers.shutdown()


def abort_live_train_runs(timeout_s: float = 60.0) -> int:
    """Abort the Train runs this process started and that are still going (each frees its workers)."""
    import ray

    aborted = 0
    for queue in list(_LIVE_TRAIN_RUNS):
        handles = []
        try:
            while not queue.empty():
                handles.append(queue.get_nowait())
        except Exception:  # pragma: no cover - the queue actor may be gone
            pass
        for handle in handles:
            try:
                ray.get(handle.abort.remote(), timeout=timeout_s)
            except Exception:  # the controller exits as it aborts (RayActorError), or was done already
                pass
            aborted += 1
    return aborted


# checked against ray 2.60.0: Tune has no public hook in the trial process for "this trial is being stopped";
# the function trainable's ``cleanup`` is it, and ``wrap_function`` (a DeveloperAPI in an internal module) is
# how Tune builds that class from a function.
def sweep_trainable(fn: Callable[[Any], Any]) -> type[FunctionTrainable]:
    """The Tune trainable class of ``fn`` whose cleanup (Tune stopping the trial) aborts live Train runs first."""
    base = wrap_function(fn)

    def cleanup(self: FunctionTrainable) -> None:
        try:
            abort_live_train_runs()
        finally:
            super(sweep_trial, self).cleanup()

    # built by type(), not a class statement: the base is computed, which a static class statement cannot name
    sweep_trial: type[FunctionTrainable] = type("SweepTrial", (base,), {"cleanup": cleanup})
    return sweep_trial


# ------------------------------------------------------------------------------------ restoring a sweep
# checked against ray 2.60.0: ``Tuner.restore`` takes no run config; the restored one carries the callbacks of
# the first driver (unpickled from tuner.pkl), whose settings (progress lines, verbosity) may not be this
# driver's. The restored ``TunerInternal`` (``Tuner._local_tuner``; ``None`` under Ray Client) holds the run config
# that ``fit`` uses, and Tune does not copy its callbacks.
def use_callbacks_on_restore(tuner, callbacks: list, *, replacing: type, verbose: int) -> None:
    """Make the restored ``tuner`` use ``callbacks`` in place of its restored callbacks of type ``replacing``."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None or not callbacks:
        return
    run_config = local.get_run_config()
    run_config.callbacks = [cb for cb in (run_config.callbacks or []) if not isinstance(cb, replacing)] + callbacks
    run_config.verbose = verbose


# --------------------------------------------------------------------------------------- a trial's error
# checked against ray 2.60.0: ``Trial.handle_error`` writes the pickled error and its text to the trial's local
# folder (``pickled_error_file`` / ``error_file``) and syncs them to the storage later; ``get_pickled_error`` /
# ``get_error`` read the storage copy, which in ``on_trial_error`` may not be there yet.
def trial_error(trial) -> tuple[Any, str | None]:
    """(the trial's pickled error, or None; the text of its error file, or None), local copies first."""
    from ray import cloudpickle

    error = text = None
    try:
        local = trial.pickled_error_file
        if local and os.path.isfile(local):
            with open(local, "rb") as fh:
                error = cloudpickle.load(fh)
        else:
            error = trial.get_pickled_error()
    except Exception:  # pragma: no cover - best effort
        error = None
    try:
        local = trial.error_file
        if local and os.path.isfile(local):
            text = Path(local).read_text(errors="replace")
        else:
            text = trial.get_error() or None
    except Exception:  # pragma: no cover - best effort
        text = None
    return error, text
