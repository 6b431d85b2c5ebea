"""``itr train``: one experiment through Ray Train (``TorchTrainer``, DDP) or in-process, tracked in one MLflow run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import preflight, tracking
from orchestrator import storage as storage_uri
from orchestrator.config import ExperimentConfig
from orchestrator.data.image_cache import prepare_image_cache
from orchestrator.interrupts import interruption_in
from orchestrator.models.tower_cache import prepare_tower_features
from orchestrator.run_folders import KeyedFolder, claim_keyed_folder, new_run_folder
from orchestrator.run_ray import (  # re-exported: the Ray Train side lives in orchestrator.run_ray
    RayTrainSession,
    _fit_with_ray,
    init_ray,
    quiet_worker_logs,
    ray_storage,
    ray_worker,
    spill_folder,
    use_gpu,
)
from orchestrator.session import LocalSession
from orchestrator.system_metrics import system_metrics
from orchestrator.train_loop import train_loop

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict[str, float]
    run_id: str | None
    tracking_uri: str | None
    best_checkpoint: str | None
    run_dir: str
    extra: dict[str, Any] = field(default_factory=dict)


def prepare_teacher_features(cfg: ExperimentConfig, roles=("train", "val", "test")) -> dict[str, Any]:
    """Extract (or find cached) teacher features for each split ``role`` on the driver, before any worker starts.

    Returns ``{role: SplitTeacherFeatures}``; a role whose split does not exist in the data is skipped.
    """
    from orchestrator.data.splits import load_split
    from orchestrator.errors import UserError
    from orchestrator.teachers import extract_split, load_teachers

    teachers = load_teachers(cfg.teachers)
    out = {}
    for role in roles:
        try:
            index = load_split(cfg.data, role)
        except UserError as err:
            if role == "train":
                raise
            log.info("teachers: skipping split %s (%s)", role, err)
            continue
        feats = extract_split(cfg.teachers, index, progress=True, teachers=teachers)
        for side, stats in feats.stats.items():
            log.info(
                "teachers: %s %s: %d items, %d computed, %d reused (%.1f s)",
                index.name,
                side,
                stats.total,
                stats.computed,
                stats.reused,
                stats.seconds,
            )
        out[role] = feats
    return out


def _adopt_unsent(logger: tracking.RunLogger, run_dir: Path) -> None:
    """Queue on ``logger`` what the Train controller could not send to MLflow (``run_dir/mlflow-unsent-*.json``)."""
    for path in sorted(run_dir.glob(f"{tracking.UNSENT_PREFIX}{logger.run_id}-*.json")):
        log.info("sending on %d tracking call(s) the Train controller left in %s", logger.adopt(path), path)


def _run_folder(cfg: ExperimentConfig, root: Path) -> tuple[str, Path, KeyedFolder | None]:
    """(run name, run folder, the claimed keyed folder or ``None``): ``root/<train.run_key>`` when a key is set
    (:func:`orchestrator.run_folders.claim_keyed_folder`: locked, checked against this config), else a new
    ``<run_name or family>-<time>-<hash6>-<6 hex>``."""
    if cfg.train.run_key:
        keyed = claim_keyed_folder(root, cfg.train.run_key, cfg.config_hash(), resume=cfg.train.resume)
        return keyed.name, keyed.path, keyed
    name, path = new_run_folder(root, _run_base(cfg))
    return name, path, None


def _run_base(cfg: ExperimentConfig) -> str:
    return f"{cfg.tracking.run_name or cfg.loss.family}-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.config_hash()[:6]}"


def _new_run_name(cfg: ExperimentConfig) -> str:
    """A fresh run name for object storage (``<base>-<6 hex>``, as :func:`new_run_folder`, without a folder)."""
    import secrets

    return f"{_run_base(cfg)}-{secrets.token_hex(3)}"


def _open_tracked_run(
    target: tracking.TrackingTarget,
    cfg: ExperimentConfig,
    name: str,
    run_dir: Path,
    keyed: KeyedFolder | None,
    *,
    config_source: str | None,
    parent_run_id: str | None,
) -> tuple[str, bool]:
    """(MLflow run id, whether it is an earlier attempt's run reopened). A resumed keyed folder continues the run
    tagged with its key and folder (KILLED -> RUNNING); any other run starts a new one."""
    if keyed is not None and keyed.resumed:
        run_id = tracking.find_keyed_run(target, keyed.name, str(run_dir))
        if run_id is not None:
            tracking.reopen_run(target, run_id)
            return run_id, True
    tags = {"itr.config_source": config_source or "<defaults>"}
    if keyed is not None:
        tags.update({"itr.run_key": keyed.name, "itr.run_dir": str(run_dir)})
    run_id = tracking.start_run(
        target,
        cfg,
        run_name=(cfg.tracking.run_name or name) if keyed else name,
        parent_run_id=parent_run_id,
        extra_tags=tags,
    )
    return run_id, False


def run_experiment(
    cfg: ExperimentConfig, *, config_source: str | None = None, parent_run_id: str | None = None
) -> RunResult:
    """Train ``cfg`` end to end and record it in one MLflow run (FINISHED, FAILED with the reason, or KILLED when
    interrupted: Ctrl-C, SIGTERM).

    Before the run exists: every check that can fail (:func:`orchestrator.preflight.check_experiment`: tracking
    store, output folder, data), then teacher and locked-tower features, so bad input leaves no MLflow run and
    no run folder. The run folder is new for every call (:func:`new_run_folder`), unless ``train.run_key`` names
    it: then a rerun resumes the run in it from its latest checkpoint, in the same MLflow run (:func:`_run_folder`,
    locked until this call returns)."""
    target = tracking.resolve_target(cfg.tracking) if cfg.tracking.enabled else None
    preflight.check_experiment(cfg, target.uri if target else None, source=config_source)
    if cfg.uses_teachers:
        prepare_teacher_features(cfg, roles=("train",))
    prepare_tower_features(cfg)  # locked towers' outputs, computed once (no-op unless a tower is locked)
    prepare_image_cache(cfg, roles=("train", *cfg.eval.splits))  # each image decoded once ever (data.image_cache)
    local = cfg.scaling.backend == "local"
    if storage_uri.is_uri(cfg.train.output_dir):  # no local run folder: a name, and a local spill folder
        name = _new_run_name(cfg)
        planned_dir, keyed = spill_folder(ray_storage(cfg), name), None
    else:
        root = Path(cfg.train.output_dir).expanduser().resolve() if local else Path(ray_storage(cfg))
        name, planned_dir, keyed = _run_folder(cfg, root)
    try:
        result = _train_in_folder(
            cfg, target, name, planned_dir, keyed, config_source=config_source, parent_run_id=parent_run_id
        )
        if keyed is not None:
            keyed.mark_finished(result.run_id)
        return result
    finally:
        if keyed is not None:
            keyed.release()


def _train_in_folder(
    cfg: ExperimentConfig,
    target: tracking.TrackingTarget | None,
    name: str,
    planned_dir: Path,
    keyed: KeyedFolder | None,
    *,
    config_source: str | None,
    parent_run_id: str | None,
) -> RunResult:
    """The run itself, in ``planned_dir``: open (or reopen) its MLflow run, train, end the run."""
    run_id = None
    local = cfg.scaling.backend == "local"
    logger: tracking.RunLogger | None = None  # buffered: a tracking outage never fails or stalls the run
    if target is not None:
        run_id, reopened = _open_tracked_run(
            target, cfg, name, planned_dir, keyed, config_source=config_source, parent_run_id=parent_run_id
        )
        logger = tracking.RunLogger(target, run_id, spill_dir=planned_dir)
        if not reopened:
            logger.log_text("config.yaml", cfg.to_yaml())
        log.info(
            "MLflow run %s in %s (experiment %r)%s",
            run_id,
            target.uri,
            target.experiment,
            ", continued" if reopened else "",
        )
    try:
        if cfg.data.noise.caption_shuffle > 0:  # which captions were re-paired: the run folder (local), MLflow
            from orchestrator.data.noise import record_noise_mask

            record_noise_mask(cfg.data, logger.log_artifacts if logger else None, planned_dir if local else None)
        if local:
            run_dir = planned_dir
            sinks = [logger] if logger is not None else []
            session = LocalSession(
                run_dir, best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode, sinks=sinks
            )
            with system_metrics(
                target.uri if target else None,
                run_id,
                enabled=cfg.tracking.system_metrics,
                interval_s=cfg.tracking.system_metrics_interval_s,
            ):
                metrics = train_loop(cfg, session)
            best_dir = session.best_checkpoint() or session.latest_checkpoint()
            best = str(best_dir) if best_dir else None
            run_dir_s = str(run_dir)
        else:
            metrics, best, run_dir_s = _fit_with_ray(cfg, name, target, run_id)
    except BaseException as err:
        interrupted = interruption_in(err)  # Ctrl-C / SIGTERM, also when a library wrapped it (torch.save)
        if logger is not None:
            _adopt_unsent(logger, planned_dir)
            cause = interrupted if interrupted is not None else err
            status = "KILLED" if interrupted is not None else "FAILED"
            logger.end_run(status, reason=f"{cause.__class__.__name__}: {cause}")
            logger.close(min(10.0, tracking.flush_timeout_s()) if status == "KILLED" else None)  # Ctrl-C: brief
        if interrupted is not None and interrupted is not err:
            raise interrupted from None
        raise
    if logger is not None:
        _adopt_unsent(logger, planned_dir)
        logger.log_text("final_metrics.json", tracking.final_metrics_json(metrics))
        from orchestrator.evaluation.reports import publish_run_reports  # best effort: a failure only warns

        publish_run_reports(cfg, best, lambda files: logger.log_artifacts(files, "reports"))
        if best:
            logger.set_tag("itr.best_checkpoint", best)
        logger.set_tag("itr.run_dir", run_dir_s)
        logger.end_run("FINISHED")
        logger.close()
    return RunResult(
        metrics=metrics,
        run_id=run_id,
        tracking_uri=target.uri if target else None,
        best_checkpoint=best,
        run_dir=run_dir_s,
    )


__all__ = [
    "RayTrainSession",
    "RunResult",
    "init_ray",
    "prepare_teacher_features",
    "quiet_worker_logs",
    "ray_storage",
    "ray_worker",
    "run_experiment",
    "spill_folder",
    "use_gpu",
]
