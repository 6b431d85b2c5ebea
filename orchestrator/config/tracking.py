"""The ``tracking`` section: the MLflow store, experiment and tags of a run."""

from __future__ import annotations

from pydantic import Field, StrictBool

from orchestrator.config.base import AbsolutePath, PositiveFloat, Section


class TrackingConfig(Section):
    enabled: StrictBool = True
    system_metrics: StrictBool = Field(
        True,
        description="MLflow system metrics (CPU, memory, disk, network; GPU utilisation and memory where "
        "there is one) of each node that trains, as system/... metrics of the run",
    )
    system_metrics_interval_s: PositiveFloat = Field(10.0, description="seconds between system-metric samples")
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db")
    artifact_dir: AbsolutePath | None = Field(
        None, description="artifact folder for a local store; default: mlartifacts beside the SQLite file"
    )
    experiment: str = "itr"
    run_name: str | None = None
    tags: dict[str, str] = {}
