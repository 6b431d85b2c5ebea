"""``itr sweep SPACE``: a Ray Tune experiment over a search space; each trial runs the same ``train_loop``.

How a trial runs
  - one worker, no GPU (``scaling.num_workers == 1`` and ``resources.gpu == 0``): inline, in the Tune function
    trainable, through a ``TuneSession`` (``ray.tune.report`` + ``ray.tune.Checkpoint`` every epoch,
    ``ray.tune.get_checkpoint`` to resume). The trial reserves ``resources.cpu`` CPUs.
  - several workers or GPUs: the trial function fits a ``TorchTrainer`` (``orchestrator.run._fit_with_ray``, the
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
  ``train.output_dir`` it is a folder in the bucket (``orchestrator.sweep_storage``). Rerunning (``--resume``
  insists on it) restores it with ``Tuner.restore(resume_unfinished=True, resume_errored=True)``: finished
  trials are not rerun, unfinished ones continue from their last checkpoint Tune had snapshotted
  (``TUNE_GLOBAL_CHECKPOINT_S`` is 2 s here), MLflow gets the same parent and the same child per trial id
  (epochs already logged are not logged again).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from orchestrator import leaderboard, storage, tracking
from orchestrator.config import ExperimentConfig
from orchestrator.errors import UserError
from orchestrator.search_space import SearchSpace, trial_config
from orchestrator.sweep_storage import (SweepFolder, leaderboard_folder, read_state, sweep_folder,
                                        tune_storage_path, write_state)

log = logging.getLogger(__name__)

TRAIN_CPU_SLIVER = 0.01           # what a trial that drives a TorchTrainer reserves itself
#: result keys that are Tune's bookkeeping, never metrics
_TUNE_KEYS = {"training_iteration", "done", "timestamp", "time_this_iter_s", "time_total_s", "pid", "date",
              "time_since_restore", "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint"}
# parent run id -> True once the Tune loop ended with trials neither finished nor failed (an interruption)
_INTERRUPTED: dict[str, bool] = {}


# -------------------------------------------------------------------------------------- the trials
def needs_train(cfg: ExperimentConfig, gpu: float) -> bool:
    """Whether a trial goes through a TorchTrainer (several workers, or GPUs) rather than inline."""
    return cfg.scaling.num_workers > 1 or gpu > 0 or cfg.scaling.use_gpu is True


def effective_params(params: dict[str, Any], cpu: float, gpu: float, base_tree: dict[str, Any]) -> dict[str, Any]:
    """A trial's varied values plus how it really runs (so the logged config says what ran)."""
    cfg = trial_config(base_tree, params)
    out = dict(params)
    out["scaling.cpus_per_worker"] = float(cpu)
    if needs_train(cfg, gpu):
        out["scaling.backend"] = "ray"
        if gpu > 0:
            out["scaling.use_gpu"] = True
    else:
        out["scaling.use_gpu"] = False
    return out


def build_trial_config(base_tree: dict[str, Any], params: dict[str, Any], cpu: float, gpu: float) -> ExperimentConfig:
    return trial_config(base_tree, effective_params(params, cpu, gpu, base_tree))


class TuneSession:
    """The ``Session`` of an inline trial: metrics and checkpoints go to Tune, resume comes from Tune."""

    rank = 0
    world_size = 1

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


TrialFn = Callable[[ExperimentConfig, Any], Any]


def _trial_main(config: dict[str, Any], base_tree: dict[str, Any] | None = None,
                ctx: dict[str, Any] | None = None) -> None:
    """The Tune function trainable: rebuild the trial's config, run the loop inline or through Ray Train."""
    from ray import tune

    _quiet_trial_logs()
    assert base_tree is not None and ctx is not None
    cpu, gpu = ctx["cpu"], ctx["gpu"]
    cfg = build_trial_config(base_tree, config, cpu, gpu)
    fn: TrialFn = ctx.get("trial_fn") or _train_loop
    if needs_train(cfg, gpu):
        from ray.util.queue import Queue

        from orchestrator.ray_train_hooks import epoch_reports_to_tune
        from orchestrator.run import _fit_with_ray

        trial_id = tune.get_context().get_trial_id()
        controllers = Queue(actor_options={"num_cpus": 0})
        _LIVE_TRAIN_RUNS.append(controllers)
        try:
            _fit_with_ray(cfg, f"train-{trial_id}", None, None, storage_path=ctx["train_storage"],
                          callbacks=[epoch_reports_to_tune(), _PublishController(controllers)])
        finally:
            if controllers in _LIVE_TRAIN_RUNS:
                _LIVE_TRAIN_RUNS.remove(controllers)
            controllers.shutdown()
        return
    if fn is _train_loop:
        import torch

        torch.set_num_threads(max(1, int(cpu)))
    fn(cfg, TuneSession(cfg))


def _quiet_trial_logs() -> None:
    """As ``orchestrator.run.quiet_worker_logs`` (not imported: it pulls torch and open_clip into trials that may
    not need them), and quieter: the driver prints one line per epoch."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("orchestrator", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().addFilter(_drop_known_noise)


def _drop_known_noise(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


def _train_loop(cfg: ExperimentConfig, session) -> Any:
    from orchestrator.train_loop import train_loop

    return train_loop(cfg, session)


# ------------------------------------------------------------- stopping a trial that drives a TorchTrainer
# When Tune stops such a trial (ASHA, an interruption), it ends the trial's actor; the Train controller that actor
# owns dies with it before it can release its workers' placement group, and Ray Train V2 only frees the group of
# a dead controller through the state API (the dashboard, which this install lacks). The CPUs would stay reserved
# and later trials wait forever. So the controller publishes its handle, and the trial's cleanup aborts it first:
# the controller then shuts its workers down and removes the group itself.
_LIVE_TRAIN_RUNS: list = []   # per trial process: queues holding the handles of running Train controllers


def _publish_controller_class():
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class PublishController(ControllerCallback):
        """Runs inside the Train controller: sends the controller's own actor handle to the trial."""

        def __init__(self, queue) -> None:
            self.queue = queue

        def after_controller_start(self, train_run_context) -> None:
            import ray

            self.queue.put(ray.get_runtime_context().current_actor)

    return PublishController


def _PublishController(queue):
    return _publish_controller_class()(queue)


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


def _sweep_trainable(fn):
    """The Tune trainable class of ``fn`` whose cleanup (Tune stopping the trial) aborts live Train runs first."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(fn)

    class SweepTrial(base):
        def cleanup(self):
            try:
                abort_live_train_runs()
            finally:
                super().cleanup()

    SweepTrial.__name__ = SweepTrial.__qualname__ = "SweepTrial"
    return SweepTrial


class _TrialResources:
    """Per-trial resources: ``resources.cpu`` (inline), or a sliver for a trial that drives a TorchTrainer."""

    def __init__(self, base_tree: dict[str, Any], cpu: float, gpu: float) -> None:
        self.base_tree, self.cpu, self.gpu = base_tree, cpu, gpu

    def __call__(self, config: dict[str, Any]):
        from ray.tune import PlacementGroupFactory

        cfg = trial_config(self.base_tree, config)
        if needs_train(cfg, self.gpu):
            return PlacementGroupFactory([{"CPU": TRAIN_CPU_SLIVER}])
        return PlacementGroupFactory([{"CPU": self.cpu}])


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------------- MLflow callback
def _metrics_of(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in result.items():
        if key in _TUNE_KEYS or key.startswith(("config", "itr/", "checkpoint")):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        if "/" in key or key == "epoch":
            out[key] = float(value)
    return out


def _failure_reason(trial) -> str:
    """``ExceptionType: message`` of the trial's error (Tune writes it to the trial's local folder first)."""
    from ray import cloudpickle

    def pickled():
        local = trial.pickled_error_file
        if local and os.path.isfile(local):
            with open(local, "rb") as fh:
                return cloudpickle.load(fh)
        return trial.get_pickled_error()

    def textual():
        local = trial.error_file
        if local and os.path.isfile(local):
            return Path(local).read_text(errors="replace")
        return trial.get_error() or ""

    text = None
    try:
        err = pickled()
        cause = getattr(err, "cause", None) or err
        if cause is not None:
            text = f"{cause.__class__.__name__}: {cause}"
    except Exception:  # pragma: no cover - best effort
        text = None
    if not text:
        try:
            lines = [ln for ln in str(textual()).strip().splitlines() if ln.strip()]
            text = lines[-1] if lines else None
        except Exception:  # pragma: no cover
            text = None
    text = (text or "trial failed (no error recorded)").strip()
    first = text.splitlines()
    return first[-1][:2000] if len(first) > 20 else text[:5000]


class SweepTracker(Callback):
    """A Tune callback (driver side) that keeps MLflow in step with the trials; see the module docstring."""

    def __init__(self, target: tracking.TrackingTarget, parent_run_id: str, sweep_name: str,
                 base_tree: dict[str, Any], varied: list[str], cpu: float, gpu: float, metric: str = "val/rsum",
                 progress: bool = True, fresh: bool = False) -> None:
        self.target, self.parent_run_id, self.sweep_name = target, parent_run_id, sweep_name
        self.base_tree, self.varied, self.cpu, self.gpu = base_tree, varied, cpu, gpu
        self.metric, self.progress = metric, progress
        self.fresh = fresh   # a new parent run: no child can exist yet, skip the lookup
        self._runs: dict[str, str] = {}
        self._logged: dict[str, set[int]] = {}
        self._planned: dict[str, int] = {}
        self._located: set[str] = set()
        self._ended: set[str] = set()      # trials that completed or failed in this driver

    def __reduce__(self):  # pickled into tuner.pkl: only the settings, never run state
        return (_make_tracker, (self.target, self.parent_run_id, self.sweep_name, self.base_tree, self.varied,
                                self.cpu, self.gpu, self.metric, self.progress, False))

    def _say(self, trial, text: str, *args) -> None:
        if self.progress:
            shown = ", ".join(f"{k}={_short(trial.config[k])}" for k in self.varied if k in trial.config)
            log.info("trial %s (%s) " + text, trial.trial_id, shown, *args)

    # -- helpers
    def _child(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        c = tracking.client(self.target)
        params = {k: trial.config[k] for k in self.varied if k in trial.config}
        cfg = build_trial_config(self.base_tree, trial.config, self.cpu, self.gpu)
        self._planned[tid] = cfg.train.epochs
        existing = [] if self.fresh else [
            r for r in tracking.child_runs(self.target, self.parent_run_id, {"itr.trial_id": tid})
            if r.data.tags.get("itr.superseded") != "true"]
        if existing:
            run_id = existing[0].info.run_id
            for extra in existing[1:]:  # never expected; keep one
                c.set_tag(extra.info.run_id, "itr.superseded", "true")
            tracking.reopen_run(self.target, run_id)
            self._logged[tid] = {int(m.step) for m in c.get_metric_history(run_id, "epoch")}
            log.info("trial %s continues in MLflow run %s (%d epochs logged)", tid, run_id, len(self._logged[tid]))
        else:
            shown = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items())
            varied = json.dumps({k: _jsonable(v) for k, v in params.items()})
            run_id = self._start_child(cfg, f"{self.sweep_name} {tid} {shown}".strip(), {
                "itr.trial_id": tid, "itr.trial_name": _trial_name(trial), "itr.sweep": self.sweep_name,
                "itr.varied": varied, "itr.kind": "trial"})
            self._logged[tid] = set()
        self._runs[tid] = run_id
        return run_id

    def _start_child(self, cfg: ExperimentConfig, run_name: str, extra_tags: dict[str, str]) -> str:
        """``tracking.start_run`` with the provenance tags (git, versions, device) looked up once per sweep."""
        if not hasattr(self, "_provenance"):
            self._provenance = tracking.run_tags(cfg)
            self._experiment_id = tracking.ensure_experiment(self.target)
        tags = dict(self._provenance)
        tags.update({"itr.config_hash": cfg.config_hash(), "itr.loss_family": cfg.loss.family,
                     "itr.model": cfg.model.name, "mlflow.runName": run_name,
                     "mlflow.parentRunId": self.parent_run_id})
        tags.update(tracking.redact(cfg.tracking.tags))
        tags.update(extra_tags)
        run = tracking.client(self.target).create_run(self._experiment_id, run_name=run_name, tags=tags)
        tracking.log_params(self.target, run.info.run_id, cfg.flat_params())
        return run.info.run_id

    # -- Tune's hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._child(trial)
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._child(trial)
        tid = trial.trial_id
        step = int(result.get("epoch", result.get("training_iteration", 1) - 1))
        if tid not in self._located and "itr/node_id" in result:
            c = tracking.client(self.target)
            c.set_tag(run_id, "itr.ray_node_id", str(result["itr/node_id"]))
            c.set_tag(run_id, "itr.ray_gcs_address", str(result["itr/gcs_address"]))
            c.set_tag(run_id, "itr.hostname", str(result.get("hostname", "")))
            self._located.add(tid)
        value = result.get(self.metric)
        # the epoch index as MLflow steps, itr train and the leaderboard's "best epoch" count it (from 0)
        self._say(trial, "epoch %d (%d of %s): %s %s", step, step + 1, self._planned.get(tid, "?"), self.metric,
                  "-" if value is None else f"{value:.4g}")
        if step in self._logged.setdefault(tid, set()):
            return
        tracking.log_metrics(self.target, run_id, _metrics_of(result), step)
        self._logged[tid].add(step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        self._ended.add(trial.trial_id)
        last = trial.last_result or {}
        epochs = int(last["epoch"]) + 1 if "epoch" in last else int(last.get("training_iteration", 0))
        c = tracking.client(self.target)
        c.set_tag(run_id, "itr.epochs_run", str(epochs))
        planned = self._planned.get(trial.trial_id, epochs)
        if epochs < planned:
            c.set_tag(run_id, "itr.stopped_early", "true")
        tracking.end_run(self.target, run_id, "FINISHED")
        self._say(trial, "%s after %d epoch(s)", "stopped early by the scheduler" if epochs < planned else "finished",
                  epochs)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        self._ended.add(trial.trial_id)
        reason = _failure_reason(trial)
        tracking.end_run(self.target, run_id, "FAILED", reason=reason)
        log.warning("trial %s FAILED: %s", trial.trial_id, reason.splitlines()[-1] if reason else "")

    def on_experiment_end(self, trials, **info):
        # Tune's cleanup marks the trials it stops at an interruption TERMINATED (the saved state still has them
        # RUNNING, so a resume continues them): a trial started here that neither completed nor failed was cut off.
        unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")
                      or (t.trial_id in self._runs and t.trial_id not in self._ended)]
        if unfinished:
            _INTERRUPTED[self.parent_run_id] = True
        for trial in unfinished:
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None:
                tracking.end_run(self.target, run_id, "KILLED",
                                 reason="sweep interrupted before this trial ended (itr sweep --resume continues it)")


def _make_tracker(*args):
    return SweepTracker(*args)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _jsonable(v: Any) -> Any:
    from orchestrator.search_space import plain

    v = plain(v)
    return v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)


# ------------------------------------------------------------------------------------------ the driver
@dataclass
class SweepResult:
    name: str
    path: SweepFolder  # a local folder, or a URI in object storage
    parent_run_id: str | None
    tracking_uri: str | None
    table: list[dict[str, Any]]
    records: list[leaderboard.TrialRecord]
    plots: list[Path | str]
    resumed: bool
    interrupted: bool = False
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any] | None:
        return self.table[0] if self.table else None


def sweep_dir(space: SearchSpace, name: str | None = None) -> SweepFolder:
    """``<train.output_dir>/sweeps/<name>``: where Tune's experiment state and the sweep's state file live (a URI
    for an object-storage ``train.output_dir``, :func:`orchestrator.sweep_storage.sweep_folder`)."""
    return sweep_folder(space.base_config.train.output_dir, name or space.name)


def _run_exists(target: tracking.TrackingTarget, run_id: str) -> bool:
    try:
        run = tracking.client(target).get_run(run_id)
    except Exception:
        return False
    return run.info.lifecycle_stage == "active"


def _start_parent(space: SearchSpace, target: tracking.TrackingTarget, name: str, path: SweepFolder) -> str:
    c = tracking.client(target)
    exp_id = tracking.ensure_experiment(target)
    tags = tracking.run_tags(space.base_config)
    tags.pop("itr.loss_family", None)
    tags.update({"mlflow.runName": f"sweep {name}", "itr.kind": "sweep", "itr.sweep": name,
                 "itr.space_file": str(space.path), "itr.sweep_dir": str(path)})
    run = c.create_run(exp_id, run_name=f"sweep {name}", tags=tags)
    run_id = run.info.run_id
    tracking.log_params(target, run_id, space.settings())
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / space.path.name
        copy.write_text(space.text, encoding="utf-8")
        c.log_artifact(run_id, str(copy))
        base = Path(tmp) / "base_config.yaml"
        base.write_text(space.base_config.to_yaml(), encoding="utf-8")
        c.log_artifact(run_id, str(base))
    return run_id


def _kill_running_children(target: tracking.TrackingTarget, parent_run_id: str, status: str, reason: str) -> int:
    n = 0
    for run in tracking.child_runs(target, parent_run_id):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            tracking.end_run(target, run.info.run_id, status, reason=reason)
            n += 1
    return n


class _SigtermAsInterrupt:
    """SIGTERM on the driver: the first one asks Tune to stop (as Ctrl-C does: state saved, trials stopped), a
    second one raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.previous = None
        self.count = 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            log.warning("SIGTERM: stopping the sweep (state is saved; itr sweep --resume continues it)")
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _any_train_trials(space: SearchSpace) -> bool:
    """Whether some trial drives a TorchTrainer (then trial actors are not reused: each one owns a Train run)."""
    res = space.spec.resources
    dist = space.distributions.get("scaling.num_workers")
    counts = [int(v) for v in dist.sample_values()] if dist else [None]
    return any(needs_train(build_trial_config(space.base_tree, {} if n is None else {"scaling.num_workers": n},
                                              res.cpu, res.gpu), res.gpu) for n in counts)


def check_fits_cluster(space: SearchSpace) -> None:
    """Every trial's resource request fits the cluster (else Ray would wait for it forever): a UserError naming
    the space's ``resources`` line on a cluster this process started, a warning on one given by RAY_ADDRESS (it
    may autoscale)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    res = space.spec.resources
    dist = space.distributions.get("scaling.num_workers")
    worker_counts = [int(v) for v in dist.sample_values()] if dist else [space.base_config.scaling.num_workers]
    problems = []
    for n in sorted(set(worker_counts)):
        cfg = build_trial_config(space.base_tree, {"scaling.num_workers": n} if dist else {}, res.cpu, res.gpu)
        if needs_train(cfg, res.gpu):
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


def run_sweep(space: SearchSpace, *, resume: bool = False, name: str | None = None,
              trial_fn: TrialFn | None = None, verbose: int = 0, progress: bool = True,
              plots: bool = True) -> SweepResult:
    """Run (or continue) the sweep of ``space``; returns its leaderboard. Raises KeyboardInterrupt when interrupted
    (after ending every MLflow run it opened as KILLED), ``UserError`` when ``resume`` finds nothing to resume.

    ``trial_fn(cfg, session)`` replaces ``train_loop`` (benchmarks, tests); it must be picklable.
    """
    from ray import tune

    from orchestrator.run import init_ray

    t0 = time.perf_counter()
    name = name or space.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"sweep name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    path = sweep_dir(space, name)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")       # stack-notes §3: snapshot often, resume closer
    # ...on purpose: Tune's "snapshotting has been triggered multiple times" warning would repeat every few seconds
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"      # metric names are checked by load_space;
    # an epoch without evaluation (train.eval_every > 1) simply has no val/ value, which ASHA skips.
    state = read_state(path)
    restorable = tune.Tuner.can_restore(str(path))
    if resume and not restorable and state is None:
        raise UserError(f"nothing to resume: no sweep at {path}", path=str(space.path))
    if state is not None and state.get("fingerprint") != space.fingerprint():
        raise UserError(f"the space or its base config changed since sweep {name!r} started ({path}); "
                        f"resume it unchanged, or start a new one with --name", path=str(space.path))
    train_trials = _any_train_trials(space)
    target = tracking.resolve_target(space.base_config.tracking) if space.base_config.tracking.enabled else None
    preflight_space(space, target.uri if target is not None else None)
    init_ray()
    check_fits_cluster(space)
    if trial_fn is None:
        prepare_shared_features(space.base_config)

    parent: str | None = None
    fresh_parent = False
    if target is not None:
        if state and state.get("parent_run_id") and _run_exists(target, state["parent_run_id"]):
            parent = state["parent_run_id"]
            tracking.reopen_run(target, parent)
            if not restorable:  # killed before Tune's first snapshot: its trials start over under new ids
                for run in tracking.child_runs(target, parent):
                    tracking.client(target).set_tag(run.info.run_id, "itr.superseded", "true")
                _kill_running_children(target, parent, "KILLED", "superseded: the sweep restarted from scratch")
        else:
            parent = _start_parent(space, target, name, path)
            fresh_parent = not restorable
    write_state(path, {"name": name, "parent_run_id": parent, "tracking_uri": target.uri if target else None,
                        "experiment": target.experiment if target else None, "fingerprint": space.fingerprint(),
                        "space_file": str(space.path), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if parent is not None:
        _INTERRUPTED.pop(parent, None)
        log.info("sweep %r: %d trial(s), %s; MLflow parent run %s in %s", name, space.num_trials,
                 "resuming" if restorable else "starting", parent, target.uri)

    res = space.spec.resources
    ctx = {"cpu": res.cpu, "gpu": res.gpu, "trial_fn": trial_fn, "train_storage": storage.join(path, "train")}
    trainable = tune.with_resources(
        _sweep_trainable(tune.with_parameters(_trial_main, base_tree=space.base_tree, ctx=ctx)),
        _TrialResources(space.base_tree, res.cpu, res.gpu))
    callbacks = []
    if target is not None and parent is not None:
        callbacks.append(SweepTracker(target, parent, name, space.base_tree, space.varied, res.cpu, res.gpu,
                                      space.metric, progress, fresh_parent))

    interrupted = False
    try:
        with _SigtermAsInterrupt():
            if restorable:
                tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
                # the restored run config carries the first driver's callback (same parent run); use this one's
                # settings (progress lines) where Tune lets us
                local = getattr(tuner, "_local_tuner", None)
                if local is not None and callbacks:
                    run_config = local.get_run_config()
                    run_config.callbacks = [cb for cb in (run_config.callbacks or [])
                                            if not isinstance(cb, SweepTracker)] + callbacks
                    run_config.verbose = verbose
            else:
                scheduler = None
                sched = space.spec.scheduler
                if sched.type == "asha":
                    from ray.tune.schedulers import ASHAScheduler

                    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=space.max_t(),
                                              grace_period=sched.grace_period,
                                              reduction_factor=sched.reduction_factor,
                                              stop_last_trials=False)  # a trial at max_t ends by itself
                tuner = tune.Tuner(
                    trainable,
                    param_space=space.param_space(),
                    tune_config=tune.TuneConfig(
                        metric=space.metric, mode=space.mode, scheduler=scheduler,
                        num_samples=space.spec.num_samples,
                        max_concurrent_trials=space.spec.max_concurrent_trials,
                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
                        reuse_actors=not train_trials),
                    run_config=tune.RunConfig(
                        name=name, storage_path=tune_storage_path(path), callbacks=callbacks, verbose=verbose,
                        failure_config=tune.FailureConfig(max_failures=space.spec.max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
                )
            tuner.fit()
        interrupted = bool(parent and _INTERRUPTED.pop(parent, False))
        if interrupted:
            raise KeyboardInterrupt("sweep interrupted")
    except BaseException as err:
        if target is not None and parent is not None:
            stopped = isinstance(err, KeyboardInterrupt)
            status = "KILLED" if stopped else "FAILED"
            reason = ("sweep interrupted" if stopped else f"sweep driver failed: {err.__class__.__name__}: {err}")
            try:
                _kill_running_children(target, parent, "KILLED", reason + " (itr sweep --resume continues it)")
                tracking.end_run(target, parent, status, reason=reason)
            except Exception:  # pragma: no cover - never mask the original error
                log.exception("could not end the MLflow runs of sweep %s", name)
        raise

    # --- the leaderboard
    table: list[dict[str, Any]] = []
    records: list[leaderboard.TrialRecord] = []
    pngs: list[Path] = []
    try:
        if target is not None and parent is not None:
            records = leaderboard.records_from_mlflow(target, parent, space.metric)
            table = leaderboard.rows(records, space.varied, space.metric, space.mode)
            c = tracking.client(target)
            with leaderboard_folder(path) as out:  # object storage: drawn locally, uploaded at the end
                csv_path = leaderboard.write_csv(out.local / "leaderboard.csv", table)
                log_scale = [k for k, d in space.distributions.items() if d.kind == "loguniform"]
                if plots:
                    pngs = leaderboard.make_plots(records, space.varied, space.metric, space.mode,
                                                  out.local / "plots", log_scale=log_scale)
                c.log_artifact(parent, str(csv_path))
                for p in pngs:
                    c.log_artifact(parent, str(p), "plots")
            pngs = out.published(pngs)
            tracking.log_text_artifact(target, parent, "leaderboard.txt", leaderboard.format_table(table) + "\n")
            if table and isinstance(table[0][f"best {space.metric}"], float) \
                    and math.isfinite(table[0][f"best {space.metric}"]):
                c.log_metric(parent, f"best/{space.metric}", table[0][f"best {space.metric}"])
                c.set_tag(parent, "itr.best_trial", table[0]["trial"])
                c.set_tag(parent, "itr.best_run_id", table[0]["run_id"])
            counts: dict[str, int] = {}
            for r in records:
                counts[r.status] = counts.get(r.status, 0) + 1
            c.set_tag(parent, "itr.trial_status_counts", json.dumps(counts, sort_keys=True))
            _kill_running_children(target, parent, "KILLED", "left running after the sweep ended")
            tracking.end_run(target, parent, "FINISHED")
    except BaseException as err:
        if target is not None and parent is not None:
            tracking.end_run(target, parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                             reason=f"leaderboard: {err.__class__.__name__}: {err}")
        raise
    return SweepResult(name=name, path=path, parent_run_id=parent, tracking_uri=target.uri if target else None,
                       table=table, records=records, plots=pngs, resumed=restorable, interrupted=interrupted,
                       wall_s=time.perf_counter() - t0)
