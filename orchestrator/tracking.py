"""MLflow at the edge: where the store is, one run per experiment, batched metric logging, run status.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts`` (absolute paths, so a
Ray worker whose cwd is elsewhere still writes to the same place). ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` point it at a server instead. Experiments are created on the driver.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from orchestrator.config import ExperimentConfig, TrackingConfig

log = logging.getLogger(__name__)

#: MLflow's limit on a param value.
MAX_PARAM_CHARS = 6000
#: Keys whose values look like secrets are never logged.
SECRET_MARKERS = ("password", "secret", "token", "api_key", "apikey", "access_key", "credential", "private_key")


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: ``uri`` (tracking store) and ``artifact_root`` (file URI, used for new experiments)."""

    uri: str
    artifact_root: str | None
    experiment: str


def resolve_target(cfg: TrackingConfig, base_dir: Path | None = None) -> TrackingTarget:
    base = Path(base_dir or Path.cwd()).resolve()
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_root = None
    if not uri:
        uri = f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        artifacts = Path(cfg.artifact_dir).expanduser() if cfg.artifact_dir else base / "mlartifacts"
        artifact_root = (artifacts if artifacts.is_absolute() else base / artifacts).resolve().as_uri()
    return TrackingTarget(uri=uri, artifact_root=artifact_root, experiment=cfg.experiment)


def is_secret_key(key: str) -> bool:
    low = key.lower()
    return any(marker in low for marker in SECRET_MARKERS)


def redact(params: dict[str, str]) -> dict[str, str]:
    """``params`` with the values of secret-looking keys replaced by ``***``."""
    return {k: ("***" if is_secret_key(k) else v) for k, v in params.items()}


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Provenance tags: git commit, package versions, config hash, host device."""
    tags = {"itr.config_hash": cfg.config_hash(), "itr.loss_family": cfg.loss.family,
            "itr.model": cfg.model.name, "itr.python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "ray", "mlflow", "pydantic"):
        try:
            tags[f"itr.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        import torch

        tags["itr.device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    except Exception:  # pragma: no cover - device query is best effort
        pass
    tags.update(cfg.tracking.tags)
    return tags


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def client(target: TrackingTarget):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=target.uri)


def ensure_experiment(target: TrackingTarget) -> str:
    """The id of ``target.experiment``, created (with the absolute artifact root) when missing."""
    c = client(target)
    exp = c.get_experiment_by_name(target.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(target.experiment, artifact_location=target.artifact_root)
    except Exception:
        exp = c.get_experiment_by_name(target.experiment)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


def start_run(target: TrackingTarget, cfg: ExperimentConfig, *, run_name: str, parent_run_id: str | None = None,
              extra_tags: dict[str, str] | None = None) -> str:
    """Create a RUNNING run with the config's params and provenance tags; returns its id."""
    c = client(target)
    exp_id = ensure_experiment(target)
    tags = run_tags(cfg)
    tags["mlflow.runName"] = run_name
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    log_params(target, run.info.run_id, cfg.flat_params())
    return run.info.run_id


def log_params(target: TrackingTarget, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in redact(params).items()]
    c = client(target)
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_metrics(target: TrackingTarget, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One batch of finite numeric metrics at ``step`` (keys under ``checkpoint/`` are internal and skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if not k.startswith("checkpoint/") and isinstance(v, (int, float))]
    c = client(target)
    for start in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[start : start + 500])


class MetricSink:
    """A picklable ``(metrics, step) -> None`` that logs to one MLflow run (used on rank 0 of the workers)."""

    def __init__(self, target: TrackingTarget, run_id: str) -> None:
        self.target = target
        self.run_id = run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.target, self.run_id, metrics, step)


def log_text_artifact(target: TrackingTarget, run_id: str, name: str, text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text, encoding="utf-8")
        client(target).log_artifact(run_id, str(path))


def log_artifacts(target: TrackingTarget, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    c = client(target)
    for p in paths:
        c.log_artifact(run_id, str(p), artifact_path)


def end_run(target: TrackingTarget, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """Terminate the run (FINISHED, FAILED or KILLED), recording ``reason`` as the ``itr.failure`` tag."""
    c = client(target)
    if reason:
        c.set_tag(run_id, "itr.failure", reason[:5000])
    c.set_terminated(run_id, status=status)


def final_metrics_json(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if not k.startswith("checkpoint/")}, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------ nested runs (sweeps)
def child_runs(target: TrackingTarget, parent_run_id: str, tags: dict[str, str] | None = None) -> list:
    """The runs nested under ``parent_run_id`` (tag ``mlflow.parentRunId``), optionally with equal ``tags``."""
    c = client(target)
    exp_id = c.get_run(parent_run_id).info.experiment_id
    clauses = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"]
    for key, value in (tags or {}).items():
        clauses.append(f"tags.`{key}` = '{value}'")
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=" and ".join(clauses), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def reopen_run(target: TrackingTarget, run_id: str) -> None:
    """Mark a terminated run RUNNING again (a resumed trial or sweep continues in its old run)."""
    c = client(target)
    c.update_run(run_id, status="RUNNING")
    if "itr.failure" in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, "itr.failure")
