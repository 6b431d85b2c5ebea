"""The Ray Train side of ``itr train`` (:mod:`orchestrator.run`): the worker's session and entry point, and the
``TorchTrainer`` fit that runs them, with Ray connected or started on demand.

Ray is imported inside the functions only, so importing this module never starts or needs a cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator import storage as storage_uri
from orchestrator import tracking
from orchestrator.checkpoint import os_error_in
from orchestrator.config import ExperimentConfig
from orchestrator.errors import UserError
from orchestrator.interrupts import keep_python_handlers
from orchestrator.ray_logs import filter_worker_logs
from orchestrator.system_metrics import system_metrics
from orchestrator.train_loop import train_loop


def _score(metrics: dict[str, float], cfg: ExperimentConfig) -> float:
    """This checkpoint's own value of the selection metric (worst possible when it was not evaluated)."""
    value = metrics.get(cfg.train.best_metric)
    if value is None:
        return -1e30 if cfg.train.best_mode == "max" else 1e30
    return float(value)


class RayTrainSession:
    """A ``Session`` inside a Ray Train worker: rank/device from Ray, DDP via ``prepare_model``, checkpoints and
    metrics via ``ray.train.report``. MLflow gets the metrics from the Train controller once it committed the
    report (``orchestrator.ray_train_hooks``), so a killed and restarted worker never loses or repeats an epoch."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.progress = False  # no per-step bar from workers (the driver's log shows each epoch)
        self.saves_steps = True
        self.device = ray.train.torch.get_device()
        self.cfg = cfg
        self._restored = tempfile.mkdtemp(prefix="itr-restore-")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return Path(ckpt.to_directory(self._restored))

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None:
        payload = {k: float(v) for k, v in metrics.items()}
        payload["checkpoint/score"] = _score(metrics, self.cfg)
        self._report(payload, checkpoint_dir)

    def save_step(self, checkpoint_dir: Path | None, epoch: int, step: int) -> None:
        """A step checkpoint (``step`` steps of ``epoch`` done), reported by every rank at the same step: rank 0's
        folder holds the checkpoint, another rank's its own state (Ray puts every rank's files in one checkpoint
        folder). Marked so that MLflow and Tune skip it and it is never the best (``ray_train_hooks.step_report``);
        Ray keeps it while it is the latest, which is what a restarted worker group resumes from."""
        from orchestrator.ray_train_hooks import step_report

        self._report(step_report(epoch, step, self.cfg.train.best_mode), checkpoint_dir)

    def _report(self, payload: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        try:
            ray.train.report(payload, checkpoint=checkpoint)
        except Exception as err:  # copying the checkpoint to the run's storage failed: disk full, permissions
            os_error = os_error_in(err)
            if os_error is None:
                raise
            raise UserError(
                f"cannot write checkpoint ({os_error.strerror or os_error})",
                path=str(os_error.filename2 or os_error.filename or self._run_folder()),
            ) from None

    def _run_folder(self) -> str:
        """This run's folder in the Ray Train storage (where its checkpoints go)."""
        import ray.train

        try:
            return ray.train.get_context().get_storage().experiment_fs_path
        except Exception:  # a DeveloperAPI: fall back to the storage root
            return ray_storage(self.cfg)


def quiet_worker_logs() -> None:
    """Our progress at INFO; open_clip's and Ray Train's per-report chatter only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: rebuild the config, then run the plain loop.

    A non-finite loss or val embeddings, or bad input (``UserError``, e.g. a checkpoint that cannot be written)
    is raised as a ``FatalWorkerError``, which stops the run without the retries a restart could not help."""
    import ray.train

    from orchestrator.evaluation.embed import NonFiniteEmbeddingsError
    from orchestrator.ray_train_hooks import FatalWorkerError
    from orchestrator.train_loop import NonFiniteLossError

    quiet_worker_logs()
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    target = loop_config.get("target") or {}
    several_nodes = ctx.get_local_world_size() < ctx.get_world_size()
    try:  # system metrics from the first worker of each node (one series per node)
        with system_metrics(
            target.get("uri"),
            loop_config.get("run_id"),
            interval_s=cfg.tracking.system_metrics_interval_s,
            enabled=cfg.tracking.system_metrics and ctx.get_local_rank() == 0,
            node_id=f"node{ctx.get_node_rank()}" if several_nodes else None,
        ):
            train_loop(cfg, RayTrainSession(cfg))
    except (NonFiniteLossError, NonFiniteEmbeddingsError, UserError) as err:
        raise FatalWorkerError.wrap(err) from None


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray sized to this machine (dashboard off)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with keep_python_handlers(signal.SIGTERM):  # ours (SIGTERM -> KILLED), not Ray's sys.exit(1); its atexit stays
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
    filter_worker_logs()


def use_gpu(cfg: ExperimentConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return torch.cuda.is_available()
    return bool(cfg.scaling.use_gpu)


def ray_storage(cfg: ExperimentConfig) -> str:
    """Where ``itr train`` keeps its Ray Train runs: ``<train.output_dir>/ray`` (absolute, or a storage URI)."""
    if storage_uri.is_uri(cfg.train.output_dir):
        return storage_uri.join(cfg.train.output_dir, "ray")
    return (Path(cfg.train.output_dir).expanduser().resolve() / "ray").as_posix()


def spill_folder(storage: str, name: str) -> Path:
    """Where MLflow calls that could not be sent wait for the driver: the run folder, or for object storage a
    local folder (``<tmp>/itr-unsent/<name>``: the spill files are plain local JSON)."""
    if storage_uri.is_uri(storage):
        return Path(tempfile.gettempdir()) / "itr-unsent" / name
    return Path(storage) / name


def _fit_with_ray(
    cfg: ExperimentConfig,
    name: str,
    target: tracking.TrackingTarget | None,
    run_id: str | None,
    *,
    callbacks: list | None = None,
    storage_path: str | None = None,
) -> tuple[dict[str, float], str | None, str]:
    """Fit ``cfg`` in a ``TorchTrainer`` named ``name`` (a rerun with the same name and storage resumes it).

    ``callbacks``: Ray Train callbacks (a sweep passes Tune's ``TuneReportCallback``); ``storage_path``: where the
    run folder goes (default ``<train.output_dir>/ray``).

    Fault tolerance: a dead worker (any error but the fatal ones) restarts the worker group from the latest
    checkpoint, up to ``scaling.max_failures`` times; a non-finite loss or a ``UserError`` in a worker fails the
    run at once and is raised here as the original error. With ``run_id``, each committed report is logged to
    MLflow by the Train controller (``orchestrator.ray_train_hooks.TrainControllerHooks``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_train_hooks import TrainControllerHooks, checkpoint_config, fatal_error_of, is_step_report

    init_ray()
    gpu = use_gpu(cfg)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    storage = storage_path or ray_storage(cfg)
    hooks = TrainControllerHooks(
        target if run_id else None,
        run_id,
        spill_dir=str(spill_folder(storage, name)),
        last_epoch=cfg.train.epochs - 1,
        max_failures=cfg.scaling.max_failures,
    )
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "run_id": run_id,
        "target": None if target is None else target.__dict__,
    }
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            # ray.train.RunConfig is Train V2's at run time (callbacks: UserCallback); its stub is V1's (Callback)
            callbacks=[hooks, *(callbacks or [])],  # type: ignore[list-item]
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=checkpoint_config(cfg.train.best_mode),  # the best epoch and the latest checkpoint
        ),
    )
    try:
        with keep_python_handlers(signal.SIGINT, signal.SIGTERM):
            result = trainer.fit()
        if result.error is not None:
            raise result.error
    except SystemExit as err:  # Ray Train's own SIGINT handler aborts the controller, then calls sys.exit
        raise KeyboardInterrupt(f"Ray Train run {name} aborted") from err
    except Exception as err:
        fatal = fatal_error_of(err)
        if fatal is not None:
            raise fatal.rebuild() from None
        raise
    best = None
    epoch_checkpoints = [cm for cm in result.best_checkpoints or [] if not is_step_report(cm[1])]
    if epoch_checkpoints:
        pick = max if cfg.train.best_mode == "max" else min
        best = pick(epoch_checkpoints, key=lambda cm: cm[1].get("checkpoint/score", 0.0))[0].path
        best = storage_uri.to_uri(storage, best)  # Ray gives a path in its file system: s3://... again
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    return metrics, best, storage_uri.join(storage, name)


__all__ = [
    "RayTrainSession",
    "init_ray",
    "quiet_worker_logs",
    "ray_storage",
    "ray_worker",
    "spill_folder",
    "use_gpu",
]
