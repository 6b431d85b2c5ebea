"""One experiment through Ray Train (2 DDP workers on CPU) recorded in one MLflow run, read back via MlflowClient."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import validate_config
from orchestrator.run import run_experiment
from tests.conftest import tiny_tree

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_worker_ray_train_run_is_tracked_in_mlflow(tmp_path, ray_cluster):
    from mlflow.tracking import MlflowClient

    tree = tiny_tree(
        tmp_path,
        scaling={"backend": "ray", "num_workers": 2, "cpus_per_worker": 1},
        train={"epochs": 2, "max_steps_per_epoch": 4},
        tracking={"run_name": "ddp"},
    )
    cfg = validate_config(tree)
    result = run_experiment(cfg, config_source="inline")

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name("test")
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert params["scaling.num_workers"] == "2" and params["loss.family"] == "infonce"
    assert params["train.lr"] == "0.001" and params["model.name"] == "itr-tiny-vit"
    tags = run.data.tags
    assert tags["itr.config_hash"] == cfg.config_hash() and tags["itr.device"].startswith("cpu")
    assert "itr.version.torch" in tags and tags["itr.best_checkpoint"]
    for key in ("train/loss", "train/infonce", "train/temperature/tau", "val/i2t_r1", "val/t2i_r10", "val/rsum"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "final_metrics.json", str(tmp_path))
    final = json.loads(open(local).read())
    assert final["val/rsum"] == pytest.approx(result.metrics["val/rsum"])
    # two workers split each global step: 4 steps per epoch per rank of batch 16
    assert final["train/steps"] == 8.0
