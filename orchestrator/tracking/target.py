"""Where MLflow runs go: the tracking store and its artifact folder (:func:`resolve_target`), and the client.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts`` (absolute paths, so a
Ray worker whose cwd is elsewhere still writes to the same place). ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` point it at a server instead. Experiments are created on the driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import TrackingConfig


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: ``uri`` (tracking store) and ``artifact_root`` (file URI, used for new experiments)."""

    uri: str
    artifact_root: str | None
    experiment: str


def resolve_target(cfg: TrackingConfig, base_dir: Path | None = None) -> TrackingTarget:
    """The tracking store (``tracking.uri``, else $MLFLOW_TRACKING_URI, else ``<base_dir>/mlflow.db``; base_dir
    defaults to the cwd) and, for a local store, its artifact folder: ``tracking.artifact_dir``, else
    ``mlartifacts`` beside the SQLite file (beside ``base_dir`` for ``file:`` stores), so a store's artifacts
    never land in whatever folder a command happened to run from."""
    base = Path(base_dir or Path.cwd()).resolve()
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_root = None
    if not uri:
        uri = f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        if cfg.artifact_dir:
            artifacts = Path(cfg.artifact_dir).expanduser()
        else:
            db = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
            artifacts = ((base / db).parent if db and db != ":memory:" else base) / "mlartifacts"
        artifact_root = (artifacts if artifacts.is_absolute() else base / artifacts).resolve().as_uri()
    return TrackingTarget(uri=uri, artifact_root=artifact_root, experiment=cfg.experiment)


def client(target: TrackingTarget):
    """An ``MlflowClient`` on ``target``'s store (the only place one is made)."""
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
