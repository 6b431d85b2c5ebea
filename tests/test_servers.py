"""Real servers: a sweep tracked by an ``mlflow server`` (SQLite backend, artifact folder, read back over its
REST API), and a sweep on a 2-node Ray cluster (``ray start --head`` + ``ray start --address`` on this machine)
whose trials land on both nodes. Trials are stand-ins (no training) so each test takes well under a minute of
work; every process a test starts is killed by process group / pid, never by name (other Ray clusters on the
machine survive), and the test asserts none is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator.search_space import load_space
from tests.conftest import tiny_tree
from tests.mlflow_server import free_port, mlflow_server
from tests.test_sweep import kill_tagged, tagged_env, tagged_pids

LR_SCALE = 1e5  # the stand-in's val/rsum = LR_SCALE * lr * (epoch + 1)


def stand_in_trial(cfg, session) -> dict:
    """Reports ``train.epochs`` epochs without training; ``train.warmup_steps`` seconds of sleep per epoch keep
    concurrent trials overlapping (so a 1-CPU node cannot take both)."""
    metrics = {}
    for epoch in range(cfg.train.epochs):
        time.sleep(cfg.train.warmup_steps)
        metrics = {"train/loss": 1.0 / (epoch + 1), "val/rsum": LR_SCALE * cfg.train.lr * (epoch + 1), "epoch": epoch}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "epoch.txt").write_text(str(epoch))
            session.report(metrics, Path(tmp), epoch)
    return metrics


@pytest.fixture
def stand_ins_by_value():
    """Ship this module's stand-in to Ray workers by value (they cannot import tests.*)."""
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def shutdown_inprocess_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def space_file(tmp_path: Path, name: str, base: dict, lrs: list[float], cpu: float) -> Path:
    doc = {
        "name": name,
        "base": base,
        "space": {"train.lr": {"grid": lrs}},
        "max_concurrent_trials": len(lrs),
        "resources": {"cpu": cpu},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_base(tmp_path: Path, epochs: int = 2, sleep_s: int = 0) -> dict:
    tree = tiny_tree(
        tmp_path, train={"epochs": epochs, "eval_at_start": False, "warmup_steps": sleep_s, "min_lr": 1e-9}
    )
    tree["tracking"]["experiment"] = "sweeps"
    return tree


# ----------------------------------------------------------------------------------------- MLflow server
def rest(uri: str, method: str, endpoint: str, payload: dict | None = None) -> dict:
    """One call to the tracking server's REST API (loopback, never through a proxy)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    data = None
    if method == "GET" and payload:
        url += "?" + urllib.parse.urlencode(payload)
    elif payload is not None:
        data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.mark.ray
def test_sweep_against_an_mlflow_server_is_readable_over_rest(tmp_path, monkeypatch, stand_ins_by_value):
    from orchestrator.sweep import run_sweep

    shutdown_inprocess_ray()
    base = sweep_base(tmp_path)
    del base["tracking"]["uri"], base["tracking"]["artifact_dir"]  # MLFLOW_TRACKING_URI decides
    lrs = [1e-3, 2e-3]
    path = space_file(tmp_path, "served", base, lrs, cpu=0.5)
    with mlflow_server(tmp_path / "server") as server:
        pgid = server.pid
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        try:
            result = run_sweep(load_space(path), trial_fn=stand_in_trial, progress=False, plots=False)
        finally:
            shutdown_inprocess_ray()
        assert result.tracking_uri == server.uri

        exp = rest(server.uri, "GET", "experiments/get-by-name", {"experiment_name": "sweeps"})["experiment"]
        runs = rest(server.uri, "POST", "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})[
            "runs"
        ]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parents = [r for r in runs if tags[r["info"]["run_id"]].get("itr.kind") == "sweep"]
        children = [r for r in runs if "mlflow.parentRunId" in tags[r["info"]["run_id"]]]
        assert len(parents) == 1 and len(children) == 2
        parent_id = parents[0]["info"]["run_id"]
        assert parent_id == result.parent_run_id and parents[0]["info"]["status"] == "FINISHED"
        by_lr = {}
        for child in children:
            run_id = child["info"]["run_id"]
            assert tags[run_id]["mlflow.parentRunId"] == parent_id and child["info"]["status"] == "FINISHED"
            params = {p["key"]: p["value"] for p in child["data"]["params"]}
            history = rest(server.uri, "GET", "metrics/get-history", {"run_id": run_id, "metric_key": "val/rsum"})
            by_lr[float(params["train.lr"])] = sorted((m["step"], m["value"]) for m in history["metrics"])
        assert by_lr == {lr: [(e, pytest.approx(LR_SCALE * lr * (e + 1))) for e in range(2)] for lr in lrs}
        best = {m["key"]: m["value"] for m in parents[0]["data"]["metrics"]}["best/val/rsum"]
        assert best == pytest.approx(LR_SCALE * max(lrs) * 2)
        listed = rest(server.uri, "GET", "artifacts/list", {"run_id": parent_id})
        assert {"leaderboard.csv", "served.yaml", "base_config.yaml"} <= {f["path"] for f in listed["files"]}
        stored = list((tmp_path / "server" / "mlartifacts").rglob("leaderboard.csv"))
        assert len(stored) == 1 and stored[0].read_text().count("\n") == 3  # proxied into the server's folder
    assert not server.is_running()
    assert not [p for p in tagged_pids("-", (pgid,))], "the mlflow server left processes behind"


# ---------------------------------------------------------------------------------------- 2-node Ray
def ray_start(args: list[str], env: dict, pgids: list[int]) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [ray_bin, "start", *args, "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pgids.append(proc.pid)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.ray
def test_sweep_trials_spread_over_a_two_node_cluster(tmp_path, monkeypatch, stand_ins_by_value):
    from orchestrator.sweep import run_sweep

    shutdown_inprocess_ray()
    port = free_port()
    tag = uuid.uuid4().hex
    temp_root = tempfile.mkdtemp(prefix="itr-2n-", dir="/tmp")  # short: Ray's socket paths live under it
    env = tagged_env(tag, RAY_TMPDIR=temp_root)
    pgids: list[int] = []
    try:
        # one CPU per node and one CPU per trial: two overlapping trials cannot share a node
        ray_start(
            ["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", '--resources={"itr_head": 1}'],
            env,
            pgids,
        )
        ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"itr_worker": 1}'], env, pgids)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        path = space_file(tmp_path, "two_nodes", sweep_base(tmp_path, epochs=2, sleep_s=2), [1e-3, 2e-3], cpu=1)
        result = run_sweep(load_space(path), trial_fn=stand_in_trial, progress=False, plots=False)
        import ray

        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        shutdown_inprocess_ray()
        assert len(nodes) == 2
        role = {nid: ("head" if "itr_head" in res else "worker") for nid, res in nodes.items()}
        assert sorted(role.values()) == ["head", "worker"]

        from mlflow.tracking import MlflowClient

        c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = c.get_experiment_by_name("sweeps")
        children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2 and len(result.table) == 2
        assert all(r.info.status == "FINISHED" for r in children)
        placed = [role[r.data.tags["itr.ray_node_id"]] for r in children]
        assert sorted(placed) == ["head", "worker"], placed  # one trial on each node
        assert all(r.data.tags["itr.ray_gcs_address"].endswith(f":{port}") for r in children)
    finally:
        shutdown_inprocess_ray()
        for pgid in pgids:  # `ray stop` would stop every Ray cluster on the machine; these two nodes only
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_tagged(tag, tuple(pgids))  # asserts that nothing of this cluster survived
        shutil.rmtree(temp_root, ignore_errors=True)
