"""``train.output_dir`` as object storage (s3://), against a moto S3 server on loopback.

The Ray Train run writes its checkpoints into the bucket; ``itr eval --checkpoint s3://...`` reads one back and
prints the metrics the run logged for that epoch; the local backend and local-only features refuse a URI with
one line naming train.output_dir; a missing bucket is exit 2 before anything starts. Step checkpoints on Ray in
S3: tests/test_ray_step_checkpoints.py; sweeps in S3: tests/test_sweep_storage.py (both reuse ``s3_endpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import yaml

from orchestrator.config import validate_config
from tests.conftest import tiny_tree
from tests.test_bad_input import run_cli as run_cli_lines

BUCKET = "itr-runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback with one bucket; the AWS_* variables point pyarrow (and Ray) at it."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of ``itr argv`` in-process (``tests.test_bad_input.run_cli``, stderr joined)."""
    rc, lines, out = run_cli_lines(argv, cwd)
    return rc, "\n".join(lines), out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def write_config(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def objects(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# ------------------------------------------------------------------------------------------ config
def test_output_dir_keeps_a_uri_and_makes_a_local_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = tiny_tree(tmp_path)
    tree["train"]["output_dir"] = "s3://bucket/runs/"
    assert validate_config(tree).train.output_dir == "s3://bucket/runs"
    tree["train"]["output_dir"] = "gs://bucket/runs?endpoint_override=h:1"
    assert validate_config(tree).train.output_dir == "gs://bucket/runs?endpoint_override=h:1"
    tree["train"]["output_dir"] = "rel/runs"
    assert validate_config(tree).train.output_dir == (tmp_path / "rel" / "runs").resolve()
    # round trip through the JSON dump Ray workers receive
    cfg = validate_config(dict(tree, train=dict(tree["train"], output_dir="s3://bucket/runs")))
    assert validate_config(cfg.model_dump(mode="json")).train.output_dir == "s3://bucket/runs"


def test_ray_storage_and_checkpoint_uris_stay_uris():
    from orchestrator.run import ray_storage, spill_folder
    from orchestrator.storage import join, to_uri

    cfg = validate_config({"train": {"output_dir": "s3://b/runs?scheme=http"}, "scaling": {"backend": "ray"}})
    assert ray_storage(cfg) == "s3://b/runs/ray?scheme=http"
    assert join("s3://b/runs", "ray", "x") == "s3://b/runs/ray/x"
    assert (
        to_uri("s3://b/runs/ray?scheme=http", "b/runs/ray/x/checkpoint_1")
        == "s3://b/runs/ray/x/checkpoint_1?scheme=http"
    )
    assert not str(spill_folder("s3://b/runs/ray", "x")).startswith(str(Path.cwd()))


# --------------------------------------------------------------------------------- refused uses
@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"scaling": {"backend": "local"}}, "scaling.backend: local"),
        ({"scaling": {"backend": "ray"}, "train": {"run_key": "k1"}}, "train.run_key"),
    ],
)
def test_uri_output_dir_needs_ray_and_no_local_only_feature(tmp_path, s3_endpoint, extra, needle):
    tree = tiny_tree(tmp_path)
    for section, values in extra.items():
        tree[section].update(values)
    tree["train"]["output_dir"] = f"s3://{BUCKET}/refused"
    rc, err, _ = run_cli(["train", str(write_config(tmp_path, tree))], tmp_path)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert "train.output_dir" in lines[0] and needle in lines[0] and f"s3://{BUCKET}/refused" in lines[0], lines
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "mlflow.db").exists()
    assert objects(s3_endpoint, "refused") == []


def test_missing_bucket_is_exit_2_before_anything_starts(tmp_path, s3_endpoint):
    tree = tiny_tree(tmp_path, scaling={"backend": "ray", "num_workers": 2})
    tree["train"]["output_dir"] = "s3://no-such-bucket/runs"
    rc, err, _ = run_cli(["train", str(write_config(tmp_path, tree))], tmp_path)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert "train.output_dir" in lines[0] and "'no-such-bucket' not found" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()


def test_eval_reads_a_checkpoint_from_s3(tmp_path, s3_endpoint):
    """A local run's checkpoint, uploaded: eval from s3:// prints the same metrics as eval of the local folder."""
    tree = tiny_tree(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 2}, tracking={"enabled": False})
    tree.setdefault("eval", {})["reports"] = False
    rc, err, _ = run_cli(["train", str(write_config(tmp_path, tree))], tmp_path)
    assert rc == 0, err
    ckpt = next(p for p in (tmp_path / "runs").rglob("model.pt")).parent
    for f in ckpt.iterdir():
        s3_endpoint.upload_file(str(f), BUCKET, f"uploaded/ckpt/{f.name}")
    rc, err, local_out = run_cli(["eval", "--checkpoint", str(ckpt)], tmp_path)
    assert rc == 0, err
    rc, err, s3_out = run_cli(["eval", "--checkpoint", f"s3://{BUCKET}/uploaded/ckpt"], tmp_path)
    assert rc == 0, err
    local, remote = json.loads(local_out.splitlines()[-1]), json.loads(s3_out.splitlines()[-1])
    assert remote["checkpoint"] == f"s3://{BUCKET}/uploaded/ckpt"
    assert remote["metrics"] == local["metrics"] and remote["metrics"]
    rc, err, _ = run_cli(["eval", "--checkpoint", f"s3://{BUCKET}/uploaded/none"], tmp_path)
    assert rc == 2 and "checkpoint not found" in error_lines(err)[0], err


# ------------------------------------------------------------------------------- Ray Train on S3
@pytest.mark.ray
@pytest.mark.slow  # ~50 s on the 2-core box (Ray start, 2 workers, S3 round trips)
def test_two_worker_ray_run_checkpoints_into_s3_and_eval_reads_them(tmp_path, s3_endpoint):
    """2 DDP workers, 2 epochs; the checkpoints are objects in the bucket (none on local disk), the best one is
    recorded as an s3:// URI, and ``itr eval`` of it prints the val metrics the run logged for that epoch."""
    import ray
    from mlflow.tracking import MlflowClient

    tree = tiny_tree(
        tmp_path,
        scaling={"backend": "ray", "num_workers": 2, "cpus_per_worker": 1},
        train={"epochs": 2, "max_steps_per_epoch": 3, "output_dir": f"s3://{BUCKET}/runs"},
        tracking={"run_name": "s3run"},
    )
    tree.setdefault("eval", {})["reports"] = False
    try:
        rc, err, out = run_cli(["train", str(write_config(tmp_path, tree))], tmp_path)
    finally:
        ray.shutdown()
    assert rc == 0, err[-4000:]
    keys = objects(s3_endpoint, "runs/ray/")
    assert any(k.endswith("/model.pt") and "/checkpoint_" in k for k in keys), keys
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()

    client = MlflowClient(tracking_uri=tree["tracking"]["uri"])
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    best = run.data.tags["itr.best_checkpoint"]
    assert best.startswith(f"s3://{BUCKET}/runs/ray/"), best
    assert run.data.tags["itr.run_dir"].startswith(f"s3://{BUCKET}/runs/ray/")
    rc, err, eval_out = run_cli(["eval", "--checkpoint", best], tmp_path)
    assert rc == 0, err
    metrics = json.loads(eval_out.splitlines()[-1])["metrics"]
    rsum = client.get_metric_history(run.info.run_id, "val/rsum")
    epoch = max(rsum, key=lambda m: m.value).step  # the best checkpoint's epoch (train.best_metric val/rsum)
    for key in ("i2t_r1", "t2i_r1", "rsum"):
        logged = [m.value for m in client.get_metric_history(run.info.run_id, f"val/{key}") if m.step == epoch]
        assert metrics[key] == pytest.approx(logged[0], abs=1e-4), (key, metrics, logged)


@pytest.mark.ray
@pytest.mark.slow  # a Ray run of 4 epochs in a child process plus the undisturbed reference
def test_sigkilled_worker_resumes_from_the_s3_checkpoint(tmp_path, s3_endpoint):
    """As tests/test_faults.py's worker SIGKILL, with the checkpoints in S3: once epoch 1 is committed the worker
    is SIGKILLed; Ray Train restores the last checkpoint from the bucket, the run exits 0 and its final metrics
    equal an undisturbed local run's (same tolerances and reasons as there)."""
    import threading
    import time

    import torch
    from mlflow.tracking import MlflowClient

    from orchestrator.run import run_experiment
    from tests.test_faults import cmdline, fault_tree, kill_session, logged_epochs, session_pids, start_itr, wait_for

    epochs = 4
    tree = fault_tree(
        tmp_path,
        epochs=epochs,
        steps_per_epoch=20,
        scaling={"backend": "ray", "num_workers": 1},
        tracking={"run_name": "killed"},
    )
    tree["train"]["output_dir"] = f"s3://{BUCKET}/killed"
    config = write_config(tmp_path, tree)
    log = tmp_path / "train.log"
    MlflowClient(tracking_uri=tree["tracking"]["uri"]).search_experiments()  # the store exists before the race
    proc = start_itr(["train", str(config)], tmp_path, log)  # inherits the AWS_* variables
    kill: dict = {}

    def kill_the_worker_after_epoch_1() -> None:
        try:
            watcher = MlflowClient(tracking_uri=tree["tracking"]["uri"])
            wait_for(lambda: 1 in logged_epochs(watcher, "test"), 240, "epoch 1 to be committed", proc, log)
            workers = [p for p in session_pids(proc.pid) if cmdline(p).startswith("ray::RayTrainWorker")]
            assert len(workers) == 1, [cmdline(p) for p in session_pids(proc.pid)]
            time.sleep(0.3)
            os.kill(workers[0], signal.SIGKILL)
            time.sleep(2.0)
            kill["committed"] = max(logged_epochs(watcher, "test"))
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            kill["error"] = err

    killer = threading.Thread(target=kill_the_worker_after_epoch_1, daemon=True)
    killer.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (cpus_per_worker 1)
    try:
        ref_tree = dict(
            tree,
            scaling={"backend": "local"},
            tracking={"enabled": False},
            train=dict(tree["train"], output_dir=str(tmp_path / "reference")),
        )
        reference = run_experiment(validate_config(ref_tree)).metrics
        killer.join(timeout=300)
        rc = proc.wait(timeout=300)
    finally:
        torch.set_num_threads(threads)
        kill_session(proc.pid)
    if "error" in kill:
        raise kill["error"]
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    committed = kill["committed"]
    assert 1 <= committed < epochs - 1, "the kill did not land mid-run"
    assert re.search(rf"resumed from \S+ \(epoch {committed} done\)", out), out[-4000:]
    assert any(k.endswith("/model.pt") for k in objects(s3_endpoint, "killed/ray/"))
    client = MlflowClient(tracking_uri=tree["tracking"]["uri"])
    final = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0].data.metrics
    assert final["train/loss"] == pytest.approx(reference["train/loss"], abs=1e-6)
    for key in ("val/rsum", "val/i2t_r1", "val/t2i_r1"):
        assert final[key] == pytest.approx(reference[key], abs=1e-4), key
