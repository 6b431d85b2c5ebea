"""One trial of a sweep: its config, the resources it reserves, and the Tune function trainable that runs it.

A trial runs inline in the trainable (one worker, no GPU) through a :class:`TuneSession`, or fits a
``TorchTrainer`` (several workers, or GPUs) through ``orchestrator.run_ray._fit_with_ray``; see
:mod:`orchestrator.sweep` for how each reports to Tune.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig
from orchestrator.errors import UserError
from orchestrator.search_space import SearchSpace, trial_config
from orchestrator.sweep import ray_compat
from orchestrator.sweep.state import SweepFolder

log = logging.getLogger(__name__)

#: What a trial that drives a TorchTrainer reserves itself (its Train workers reserve the real resources).
TRAIN_CPU_SLIVER = 0.01

#: ``trial_fn(cfg, session)``: what a trial runs in place of ``train_loop`` (benchmarks, tests); picklable.
TrialFn = Callable[[ExperimentConfig, Any], Any]


def runs_through_train(cfg: ExperimentConfig, gpu: float) -> bool:
    """Whether a trial goes through a TorchTrainer (several workers, or GPUs) rather than inline."""
    return cfg.scaling.num_workers > 1 or gpu > 0 or cfg.scaling.use_gpu is True


def effective_params(params: dict[str, Any], cpu: float, gpu: float, base_tree: dict[str, Any]) -> dict[str, Any]:
    """A trial's varied values plus how it really runs (so the logged config says what ran)."""
    cfg = trial_config(base_tree, params)
    out = dict(params)
    out["scaling.cpus_per_worker"] = float(cpu)
    if runs_through_train(cfg, gpu):
        out["scaling.backend"] = "ray"
        if gpu > 0:
            out["scaling.use_gpu"] = True
    else:
        out["scaling.use_gpu"] = False
    return out


def build_trial_config(base_tree: dict[str, Any], params: dict[str, Any], cpu: float, gpu: float) -> ExperimentConfig:
    """The config a trial with the varied values ``params`` runs (:func:`effective_params` applied)."""
    return trial_config(base_tree, effective_params(params, cpu, gpu, base_tree))


def trial_name(trial) -> str:
    """``trial_<id>``: the trial's name in Tune and its folder in the sweep folder."""
    return f"trial_{trial.trial_id}"


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one sweep shares, shipped to the trial processes with the trainable.

    ``base_tree``: the space's base config; ``cpu`` / ``gpu``: the space's ``resources``; ``train_storage``:
    where the Ray Train runs of trials that drive a TorchTrainer go (``<sweep>/train``); ``trial_fn``: what runs
    in place of ``train_loop`` (None: the loop)."""

    base_tree: dict[str, Any]
    cpu: float
    gpu: float
    train_storage: SweepFolder
    trial_fn: TrialFn | None = None

    def config(self, params: dict[str, Any]) -> ExperimentConfig:
        return build_trial_config(self.base_tree, params, self.cpu, self.gpu)


class TuneSession:
    """The ``Session`` of an inline trial: metrics and checkpoints go to Tune, resume comes from Tune."""

    rank = 0
    world_size = 1
    progress = False
    saves_steps = False  # a Tune trial resumes from its last epoch report

    def __init__(self, cfg: ExperimentConfig) -> None:
        import ray

        self.cfg = cfg
        self._restored = tempfile.mkdtemp(prefix="itr-restore-")
        ctx = ray.get_runtime_context()
        self._where = {"itr/node_id": ctx.get_node_id(), "itr/gcs_address": ctx.gcs_address}

    @property
    def device(self):
        import torch  # lazily: a trial stand-in that never trains need not import torch

        return torch.device("cpu")

    def prepare_model(self, model):
        return model.to(self.device)

    def latest_checkpoint(self) -> Path | None:
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        return Path(ckpt.to_directory(self._restored))

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, epoch: int) -> None:
        from ray import tune

        payload: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
        payload.setdefault("epoch", float(epoch))
        payload.update(self._where)
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(payload, checkpoint=checkpoint)

    def save_step(self, checkpoint_dir: Path, epoch: int, step: int) -> None:
        """Never called (``saves_steps`` is false): Tune checkpoints are the epoch reports."""
        raise RuntimeError("a Tune trial keeps epoch checkpoints only (TuneSession.saves_steps is false)")


def run_trial(config: dict[str, Any], settings: TrialSettings | None = None) -> None:
    """The Tune function trainable: rebuild the trial's config, run the loop inline or through Ray Train."""
    from ray import tune

    _quiet_trial_logs()
    assert settings is not None, "run_trial gets its settings through tune.with_parameters"
    cfg = settings.config(config)
    if runs_through_train(cfg, settings.gpu):
        from orchestrator.ray_train_hooks import epoch_reports_to_tune
        from orchestrator.run_ray import _fit_with_ray

        trial_id = tune.get_context().get_trial_id()
        with ray_compat.abortable_train_run() as publish_controller:
            _fit_with_ray(
                cfg,
                f"train-{trial_id}",
                None,
                None,
                storage_path=str(settings.train_storage),
                callbacks=[epoch_reports_to_tune(), publish_controller],
            )
        return
    if settings.trial_fn is None:
        import torch

        from orchestrator.train_loop import train_loop

        torch.set_num_threads(max(1, int(settings.cpu)))
        train_loop(cfg, TuneSession(cfg))
    else:
        settings.trial_fn(cfg, TuneSession(cfg))


def _quiet_trial_logs() -> None:
    """As ``orchestrator.run_ray.quiet_worker_logs`` (not imported: it pulls torch and open_clip into trials that may
    not need them), and quieter: the driver prints one line per epoch."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("orchestrator", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().addFilter(_drop_known_noise)


def _drop_known_noise(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


class TrialResources:
    """Per-trial resources: ``resources.cpu`` (inline), or a sliver for a trial that drives a TorchTrainer."""

    def __init__(self, base_tree: dict[str, Any], cpu: float, gpu: float) -> None:
        self.base_tree, self.cpu, self.gpu = base_tree, cpu, gpu

    def __call__(self, config: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        cfg = trial_config(self.base_tree, config)
        if runs_through_train(cfg, self.gpu):
            return PlacementGroupFactory([{"CPU": TRAIN_CPU_SLIVER}])
        return PlacementGroupFactory([{"CPU": self.cpu}])


def _worker_counts(space: SearchSpace) -> list[int | None]:
    """The values ``scaling.num_workers`` takes in the space (``[None]``: not varied, the base config's)."""
    dist = space.distributions.get("scaling.num_workers")
    if dist is None:
        return [None]
    return [n for n in sorted({int(v) for v in dist.sample_values()})]


def _config_with_workers(space: SearchSpace, n: int | None) -> ExperimentConfig:
    res = space.spec.resources
    return build_trial_config(space.base_tree, {} if n is None else {"scaling.num_workers": n}, res.cpu, res.gpu)


def any_train_trials(space: SearchSpace) -> bool:
    """Whether some trial drives a TorchTrainer (then trial actors are not reused: each one owns a Train run)."""
    gpu = space.spec.resources.gpu
    return any(runs_through_train(_config_with_workers(space, n), gpu) for n in _worker_counts(space))


def check_fits_cluster(space: SearchSpace) -> None:
    """Every trial's resource request fits the cluster (else Ray would wait for it forever): a UserError naming
    the space's ``resources`` line on a cluster this process started, a warning on one given by RAY_ADDRESS (it
    may autoscale)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    res = space.spec.resources
    problems = []
    for n in _worker_counts(space):
        cfg = _config_with_workers(space, n)
        n = cfg.scaling.num_workers
        if runs_through_train(cfg, res.gpu):
            need_cpu, need_gpu = n * res.cpu + TRAIN_CPU_SLIVER, (n if res.gpu > 0 else 0)
            what = f"{n} Train worker(s) x {res.cpu:g} CPU (resources.cpu) + {TRAIN_CPU_SLIVER} CPU for the trial"
        else:
            need_cpu, need_gpu = res.cpu, 0
            what = f"{res.cpu:g} CPU (resources.cpu)"
        if need_cpu > cpus + 1e-9:
            hint = f"; e.g. resources.cpu: {max(0.01, (cpus - TRAIN_CPU_SLIVER) / n):.2f}" if n > 1 else ""
            problems.append(f"a trial needs {what} = {need_cpu:g} CPUs but the cluster has {cpus:g}{hint}")
        if need_gpu > gpus:
            problems.append(f"a trial needs {need_gpu} GPU(s) but the cluster has {gpus:g}")
    if problems:
        if os.environ.get("RAY_ADDRESS"):
            log.warning("%s (waiting for the cluster to grow)", problems[0])
        else:
            raise UserError(problems[0], path=space.where("resources"))
