"""``run_sweep``: the driver of ``itr sweep`` (see :mod:`orchestrator.sweep`), and the checks it runs first."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import leaderboard, storage, tracking
from orchestrator.config import ExperimentConfig
from orchestrator.errors import UserError
from orchestrator.search_space import SearchSpace
from orchestrator.spec_files import is_name
from orchestrator.sweep import ray_compat
from orchestrator.sweep.state import (
    ResumePoint,
    SigtermAsInterrupt,
    SweepFolder,
    find_resume_point,
    record_state,
    sweep_folder,
    tune_storage_path,
)
from orchestrator.sweep.tracker import (
    Leaderboard,
    SweepTracker,
    check_recorded_store,
    open_parent_run,
    parent_ends_on_error,
    publish_leaderboard,
)
from orchestrator.sweep.trial import (
    TrialFn,
    TrialResources,
    TrialSettings,
    any_train_trials,
    check_fits_cluster,
    run_trial,
    trial_name,
)

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """A finished sweep: its folder, MLflow parent run, leaderboard (``table``, ``records``) and plots."""

    name: str
    path: SweepFolder  # a local folder, or a URI in object storage
    parent_run_id: str | None
    tracking_uri: str | None
    table: list[dict[str, Any]]
    records: list[leaderboard.TrialRecord]
    plots: list[Path | str]
    resumed: bool
    wall_s: float = 0.0
    settings: list[dict[str, Any]] = field(default_factory=list)  # one row per setting, over its seeds
    paired: list[dict[str, Any]] = field(default_factory=list)  # each setting vs the space's baseline

    @property
    def best(self) -> dict[str, Any] | None:
        return self.table[0] if self.table else None


def run_sweep(
    space: SearchSpace,
    *,
    resume: bool = False,
    name: str | None = None,
    trial_fn: TrialFn | None = None,
    verbose: int = 0,
    progress: bool = True,
    plots: bool = True,
) -> SweepResult:
    """Run (or continue) the sweep of ``space``; returns its leaderboard. Raises KeyboardInterrupt when interrupted
    (after ending every MLflow run it opened as KILLED), ``UserError`` when ``resume`` finds nothing to resume.

    ``trial_fn(cfg, session)`` replaces ``train_loop`` (benchmarks, tests); it must be picklable.
    """
    from orchestrator.run import init_ray

    t0 = time.perf_counter()
    name = name or space.name
    if not is_name(name):
        raise UserError(f"sweep name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    path = sweep_dir(space, name)
    _configure_tune()
    point = find_resume_point(path, space, name, resume=resume)
    target = tracking.resolve_target(space.base_config.tracking) if space.base_config.tracking.enabled else None
    check_recorded_store(target, space, name, point)
    preflight_space(space, target.uri if target is not None else None)
    init_ray()
    check_fits_cluster(space)
    if trial_fn is None:
        prepare_shared_features(space.base_config)

    parent, tracker = None, None
    if target is not None:
        parent, fresh = open_parent_run(target, space, name, path, point)
        res = space.spec.resources
        tracker = SweepTracker(
            target, parent, name, space.base_tree, space.varied, res.cpu, res.gpu, space.metric, progress, fresh
        )
    record_state(path, space, name, parent, target)
    if target is not None:
        log.info(
            "sweep %r: %d trial(s), %s; MLflow parent run %s in %s",
            name,
            space.num_trials,
            "resuming" if point.restorable else "starting",
            parent,
            target.uri,
        )

    with parent_ends_on_error(target, parent, "sweep driver failed", resumable=True), SigtermAsInterrupt():
        tuner = build_tuner(space, name, path, point, trial_fn, [tracker] if tracker else [], verbose)
        tuner.fit()
        if tracker is not None and tracker.interrupted:
            raise KeyboardInterrupt("sweep interrupted")

    board = Leaderboard([], [], [])
    if target is not None and parent is not None:
        with parent_ends_on_error(target, parent, "leaderboard", resumable=False):
            board = publish_leaderboard(target, parent, space, path, plots=plots)
    return SweepResult(
        name=name,
        path=path,
        parent_run_id=parent,
        tracking_uri=target.uri if target else None,
        table=board.table,
        records=board.records,
        plots=board.plots,
        settings=board.settings,
        paired=board.paired,
        resumed=point.restorable,
        wall_s=time.perf_counter() - t0,
    )


def sweep_dir(space: SearchSpace, name: str | None = None) -> SweepFolder:
    """``<train.output_dir>/sweeps/<name>``: where Tune's experiment state and the sweep's state file live (a URI
    for an object-storage ``train.output_dir``, :func:`orchestrator.sweep.state.sweep_folder`)."""
    return sweep_folder(space.base_config.train.output_dir, name or space.name)


def _configure_tune() -> None:
    """Tune's settings for a sweep, through the environment variables Tune reads."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot often: a resume starts closer
    # ...on purpose: Tune's "snapshotting has been triggered multiple times" warning would repeat every few seconds
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # metric names are checked by load_space;
    # an epoch without evaluation (train.eval_every > 1) simply has no val/ value, which ASHA skips.


def build_tuner(
    space: SearchSpace,
    name: str,
    path: SweepFolder,
    point: ResumePoint,
    trial_fn: TrialFn | None,
    callbacks: list,
    verbose: int,
):
    """The ``tune.Tuner`` of the sweep: restored from ``path`` when Tune has state there, else a new one."""
    from ray import tune

    res = space.spec.resources
    settings = TrialSettings(space.base_tree, res.cpu, res.gpu, storage.join(path, "train"), trial_fn)
    trainable = tune.with_resources(
        ray_compat.sweep_trainable(tune.with_parameters(run_trial, settings=settings)),
        TrialResources(space.base_tree, res.cpu, res.gpu),
    )
    if point.restorable:
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        ray_compat.use_callbacks_on_restore(tuner, callbacks, replacing=SweepTracker, verbose=verbose)
        return tuner
    scheduler = None
    sched = space.spec.scheduler
    if sched.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=space.max_t(),
            grace_period=sched.grace_period,
            reduction_factor=sched.reduction_factor,
            stop_last_trials=False,
        )  # a trial at max_t ends by itself
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            scheduler=scheduler,
            num_samples=space.spec.num_samples,
            max_concurrent_trials=space.spec.max_concurrent_trials,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            reuse_actors=not any_train_trials(space),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=tune_storage_path(path),
            callbacks=callbacks,
            verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=space.spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def prepare_shared_features(cfg: ExperimentConfig) -> None:
    """Fill the caches every trial reads — teacher features, locked-tower outputs and decoded images of the base
    config — once, on the driver, so concurrent trials do not all compute them at the start."""
    from orchestrator.data.image_cache import prepare_image_cache
    from orchestrator.models.tower_cache import prepare_tower_features
    from orchestrator.run import prepare_teacher_features

    if cfg.teachers.image is not None or cfg.teachers.text is not None:
        prepare_teacher_features(cfg, roles=("train",))
    prepare_tower_features(cfg)
    prepare_image_cache(cfg, roles=("train", *cfg.eval.splits))


def preflight_space(space: SearchSpace, tracking_uri: str | None) -> None:
    """What would fail in every trial fails once here, before Ray starts or a parent run exists: the tracking
    store, ``train.output_dir``, the data (images verified, train/eval leakage) and ``model.pretrained`` of the
    base config, and the data and weights of each trial config that differs from it there."""
    from orchestrator import preflight
    from orchestrator.models.student import check_pretrained

    base = space.base_config
    checked = base
    if storage.is_uri(base.train.output_dir):  # a sweep folder in object storage: only Ray writes there (Tune,
        # and Ray Train for trials that drive a TorchTrainer), whatever the base's backend; the bucket must answer
        checked = base.model_copy(update={"scaling": base.scaling.model_copy(update={"backend": "ray"})})
    preflight.check_experiment(checked, tracking_uri, source=space.base_source)
    seen = {(base.data.model_dump_json(), base.model.pretrained)}
    for cfg in space.trial_configs:
        key = (cfg.data.model_dump_json(), cfg.model.pretrained)
        if key not in seen:
            seen.add(key)
            preflight.check_data(cfg)
            check_pretrained(cfg.model)
