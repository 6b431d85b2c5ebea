"""Where a run's tracking store and artifacts go: a local store keeps its artifacts next to its database."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import TrackingConfig
from orchestrator.tracking import resolve_target


def test_local_store_artifacts_sit_next_to_its_database_not_in_the_cwd(tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "elsewhere" / "mlflow.db"
    target = resolve_target(TrackingConfig(uri=f"sqlite:///{store}"))
    assert target.uri == f"sqlite:///{store}"
    assert target.artifact_root == (tmp_path / "elsewhere" / "mlartifacts").as_uri()
    # relative database path: against the cwd, artifacts beside it
    assert (
        resolve_target(TrackingConfig(uri="sqlite:///db/x.db")).artifact_root
        == (launch / "db" / "mlartifacts").as_uri()
    )
    # the default store and an explicit artifact folder
    assert resolve_target(TrackingConfig()).artifact_root == (launch / "mlartifacts").as_uri()
    assert (
        resolve_target(TrackingConfig(uri=f"sqlite:///{store}", artifact_dir=Path("art"))).artifact_root
        == (launch / "art").as_uri()
    )
    # a server keeps its own artifact store
    assert resolve_target(TrackingConfig(uri="http://127.0.0.1:5000")).artifact_root is None
