"""``itr sweep SPACE``: a Ray Tune experiment over a search space; each trial runs the same ``train_loop``.

How a trial runs
  - one worker, no GPU (``scaling.num_workers == 1`` and ``resources.gpu == 0``): inline, in the Tune function
    trainable, through a ``TuneSession`` (``ray.tune.report`` + ``ray.tune.Checkpoint`` every epoch,
    ``ray.tune.get_checkpoint`` to resume). The trial reserves ``resources.cpu`` CPUs.
  - several workers or GPUs: the trial function fits a ``TorchTrainer`` (``orchestrator.run_ray._fit_with_ray``, the
    same path as ``itr train``) named ``train-<trial id>`` under ``<sweep>/train``, with Tune's
    ``TuneReportCallback`` forwarding rank 0's reports; the function itself reserves 0.01 CPU and each Train
    worker ``resources.cpu`` CPUs (and one GPU when ``resources.gpu > 0``). A rerun of the same trial resumes the
    Train run from its latest checkpoint.
  One report per epoch, so Tune's ``training_iteration`` is epoch + 1 and ASHA's rungs are epochs.

Tracking (MLflow, written by the driver only, in a Tune callback)
  - one parent run per sweep: the search settings and the space as params (``sweep.*``, ``space.*``), the
    space file, the resolved base config, and at the end ``leaderboard.csv`` and ``plots/*.png``; metric
    ``best/<metric>`` and tags ``itr.best_trial`` / ``itr.best_run_id``.
  - one nested child run per trial (tag ``mlflow.parentRunId``), keyed by the Tune trial id in tag
    ``itr.trial_id``: the trial's resolved config as params, the varied values in tag ``itr.varied``, every
    epoch's metrics at step = epoch. Ends FINISHED; FAILED with the reason in ``itr.failure``; stopped by ASHA:
    **FINISHED** with ``itr.stopped_early=true`` (the trial ended as the scheduler decided -- KILLED is kept for
    interruptions); KILLED when the sweep is interrupted (Ctrl-C, SIGTERM, an error in the driver).

Resume
  The sweep folder ``<base train.output_dir>/sweeps/<name>`` holds Tune's experiment state and
  ``itr_sweep.json`` (the parent run id and a fingerprint of the space); with an object-storage
  ``train.output_dir`` it is a folder in the bucket (:mod:`orchestrator.sweep.state`). Rerunning (``--resume``
  insists on it) restores it with ``Tuner.restore(resume_unfinished=True, resume_errored=True)``: finished
  trials are not rerun, unfinished ones continue from their last checkpoint Tune had snapshotted
  (``TUNE_GLOBAL_CHECKPOINT_S`` is 2 s here), MLflow gets the same parent and the same child per trial id
  (epochs already logged are not logged again).

The package, one job per module
  - :mod:`~orchestrator.sweep.driver`: ``run_sweep`` (resume check, parent run, tuner, fit, leaderboard) and the
    checks it runs before Ray starts;
  - :mod:`~orchestrator.sweep.trial`: a trial's config and resources, the Tune trainable, ``TuneSession``;
  - :mod:`~orchestrator.sweep.tracker`: the MLflow parent run and ``SweepTracker``, the Tune callback that keeps
    the child runs;
  - :mod:`~orchestrator.sweep.state`: the sweep folder, ``itr_sweep.json``, resume and SIGTERM;
  - :mod:`~orchestrator.sweep.ray_compat`: every private Ray API the sweep uses, with the Ray release it was
    checked against.
"""

from __future__ import annotations

from orchestrator.sweep.driver import SweepResult, preflight_space, prepare_shared_features, run_sweep, sweep_dir
from orchestrator.sweep.ray_compat import abort_live_train_runs
from orchestrator.sweep.state import SWEEP_STATE_FILE, read_state, sweep_folder, write_state
from orchestrator.sweep.tracker import SweepTracker
from orchestrator.sweep.trial import (
    TRAIN_CPU_SLIVER,
    TrialFn,
    TuneSession,
    build_trial_config,
    check_fits_cluster,
    effective_params,
    runs_through_train,
)

#: tuner.pkl of a sweep started before the package split names its tracker so (``--resume`` unpickles it)
_make_tracker = SweepTracker

__all__ = [
    "SWEEP_STATE_FILE",
    "TRAIN_CPU_SLIVER",
    "SweepResult",
    "SweepTracker",
    "TrialFn",
    "TuneSession",
    "abort_live_train_runs",
    "build_trial_config",
    "check_fits_cluster",
    "effective_params",
    "preflight_space",
    "prepare_shared_features",
    "read_state",
    "run_sweep",
    "runs_through_train",
    "sweep_dir",
    "sweep_folder",
    "write_state",
]
