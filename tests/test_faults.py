"""Fault injection: a Ray Train worker SIGKILLed mid-epoch, the MLflow server down for 30 s mid-run, a
non-finite loss (single run and one trial of a sweep), a full disk / read-only folder when writing checkpoints.

Each test checks that nothing is lost and nothing is logged twice, against values computed independently (an
undisturbed run with the same seed, the run's own config, the files on disk). Processes a test starts live in
their own session (``start_new_session``) and are killed by session id, never by name, so other Ray clusters and
MLflow servers on the machine survive.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import tracking
from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE, atomic_save, load_file
from orchestrator.config import validate_config
from orchestrator.errors import UserError
from tests.conftest import tiny_tree
from tests.mlflow_server import free_port, mlflow_server
from tests.test_sweep import wait_for

ITR = str(Path(sys.executable).with_name("itr"))
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
NON_FINITE = re.compile(r"NonFiniteLossError: non-finite loss at epoch 0, step \d+ \(terms: infonce\)")


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process training on one thread: on a shared 2-core box two threads run 3x slower, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, session) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2]), int(fields[3])


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (everything a ``start_new_session`` child started, Ray's included)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            st = _stat(int(entry))
            if st is not None and st[2] == sid and st[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_session(sid: int, timeout: float = 20.0) -> None:
    """SIGKILL every process of session ``sid`` (Ray's agents ignore SIGTERM once orphaned), by pid."""
    deadline = time.time() + timeout
    while (pids := session_pids(sid)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    assert not session_pids(sid), f"processes of session {sid} survived SIGKILL"


def start_itr(args: list[str], cwd: Path, log: Path, **env) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [ITR, *args],
            cwd=cwd,
            env={**os.environ, **ENV, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    assert len(runs) <= 1, [r.info.run_name for r in runs]
    return runs[0] if runs else None


def steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def logged_epochs(client, experiment: str) -> list[int]:
    try:
        run = only_run(client, experiment)
    except Exception:  # the store is being created or written by the run under test
        return []
    return steps(client, run.info.run_id, "epoch") if run is not None else []


def write_config(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def fault_tree(tmp_path: Path, *, epochs: int, steps_per_epoch: int, **sections) -> dict:
    """The tiny model on 480 synthetic images: ~0.1 s per step on a loaded 2-core box; no report figures."""
    tree = tiny_tree(tmp_path, **sections)
    tree["train"].update(epochs=epochs, max_steps_per_epoch=steps_per_epoch, eval_at_start=False, log_every_steps=1000)
    tree["data"]["synthetic"]["num_train_images"] = 480
    tree.setdefault("eval", {})["reports"] = False
    return tree


# ------------------------------------------------------------------------- (a) worker SIGKILL
@pytest.mark.ray
def test_sigkilled_train_worker_resumes_and_matches_an_undisturbed_run(tmp_path):
    """``itr train`` on Ray (4 epochs); once epoch 1 is committed (checkpoint persisted, metrics in MLflow) the
    worker is SIGKILLed from outside, in the middle of the next epoch. Ray Train restarts the worker group from
    the last committed checkpoint; the run exits 0, MLflow holds every epoch exactly once, and the final metrics
    equal those of an undisturbed run with the same seed (run in-process meanwhile).

    Tolerance: a resume restores model, optimiser, scheduler and the torch RNG, and the batch order is a function
    of (seed, epoch), so the resumed run computes the same floating-point operations in the same order: measured
    difference 0.0 (train/loss, val/rsum) against the undisturbed run. ``abs=1e-6`` on the loss and 1e-4 on
    recall percentages only absorbs a change of summation order by a future torch; a resume from the wrong
    epoch, a lost optimiser state or a re-seeded RNG moves them by >1e-3 / whole recall points."""
    import threading

    import torch
    from mlflow.tracking import MlflowClient

    from orchestrator.run import run_experiment

    epochs = 4
    tree = fault_tree(
        tmp_path,
        epochs=epochs,
        steps_per_epoch=20,
        scaling={"backend": "ray", "num_workers": 1},
        tracking={"run_name": "killed"},
    )
    config = write_config(tmp_path, tree)
    log = tmp_path / "train.log"
    client = MlflowClient(tracking_uri=tree["tracking"]["uri"])
    proc = start_itr(["train", str(config)], tmp_path, log)
    kill: dict = {}

    def kill_the_worker_after_epoch_1() -> None:
        try:
            watcher = MlflowClient(tracking_uri=tree["tracking"]["uri"])
            wait_for(lambda: 1 in logged_epochs(watcher, "test"), 240, "epoch 1 to be committed", proc, log)
            workers = [p for p in session_pids(proc.pid) if cmdline(p).startswith("ray::RayTrainWorker")]
            assert len(workers) == 1, [cmdline(p) for p in session_pids(proc.pid)]
            time.sleep(0.3)  # into the next epoch's steps
            os.kill(workers[0], signal.SIGKILL)
            time.sleep(2.0)  # an epoch committed just before the kill reaches MLflow meanwhile
            kill["committed"] = max(logged_epochs(watcher, "test"))
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            kill["error"] = err

    killer = threading.Thread(target=kill_the_worker_after_epoch_1, daemon=True)
    killer.start()
    try:
        # the undisturbed run: same config and seed, in-process on one thread (as the worker: cpus_per_worker 1)
        ref_tree = dict(
            tree,
            scaling={"backend": "local"},
            tracking={"enabled": False},
            train=dict(tree["train"], output_dir=str(tmp_path / "reference")),
        )
        assert torch.get_num_threads() == 1  # one_torch_thread
        reference = run_experiment(validate_config(ref_tree)).metrics
        killer.join(timeout=300)
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc.pid)
    if "error" in kill:
        raise kill["error"]
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    committed = kill["committed"]
    assert 1 <= committed < epochs - 1, "the kill did not land mid-run"
    assert re.search(rf"resumed from \S+ \(epoch {committed} done\)", out), out[-4000:]
    run = only_run(client, "test")
    assert worker_group_starts(Path(run.data.tags["itr.run_dir"]).name) == 2
    assert run.info.status == "FINISHED"
    for key in ("epoch", "train/loss", "train/infonce", "train/epoch_time_s", "val/rsum", "val/i2t_r1"):
        assert steps(client, run.info.run_id, key) == list(range(epochs)), key

    final = run.data.metrics
    assert final["train/loss"] == pytest.approx(reference["train/loss"], abs=1e-6)
    for key in ("val/rsum", "val/i2t_r1", "val/t2i_r1", "val/i2t_r10"):
        assert final[key] == pytest.approx(reference[key], abs=1e-4), key


# ------------------------------------------------------------------- (b) tracking server outage
def test_mlflow_server_down_30s_mid_run_loses_nothing(tmp_path, monkeypatch):
    """A run against a real ``mlflow server``; after epoch 0 reached it, the server is stopped for 30 s and
    restarted on the same port and store. Training goes on meanwhile (epochs finish during the outage), the
    queued metrics, tags and artifacts arrive after it, and the run ends FINISHED with every epoch once.

    MLflow's own HTTP retries are cut to one immediate retry (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=1``, backoff 0)
    so that what carries the run through is the orchestrator's queue, not urllib3's 4-minute retry budget."""
    from mlflow.tracking import MlflowClient

    epochs = 8
    tree = fault_tree(tmp_path, epochs=epochs, steps_per_epoch=15, scaling={"backend": "local"})
    tree["tracking"] = {"experiment": "outage", "run_name": "outage"}  # the server comes from the environment
    config = write_config(tmp_path, tree)
    log = tmp_path / "train.log"
    with mlflow_server(tmp_path / "server") as server:
        client = MlflowClient(tracking_uri=server.uri)
        proc = start_itr(
            ["train", str(config)],
            tmp_path,
            log,
            MLFLOW_TRACKING_URI=server.uri,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
            MLFLOW_HTTP_REQUEST_TIMEOUT="10",
        )
        try:
            wait_for(lambda: 0 in logged_epochs(client, "outage"), 120, "epoch 0 in MLflow", proc, log)
            done_before = len(re.findall(r"INFO orchestrator\.train_loop: epoch \d+:", log.read_text()))
            server.stop()
            down_at = time.monotonic()
            time.sleep(30)
            done_during = len(re.findall(r"INFO orchestrator\.train_loop: epoch \d+:", log.read_text())) - done_before
            server.start()
            outage_s = time.monotonic() - down_at
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                kill_session(proc.pid)
        out = log.read_text(errors="replace")
        assert rc == 0, out[-4000:]
        assert outage_s >= 30 and done_during >= 2, (outage_s, done_during)  # training did not wait for MLflow
        assert "unreachable" in out and "reachable again" in out and "did not take" not in out

        run = only_run(client, "outage")
        assert run.info.status == "FINISHED"
        rid = run.info.run_id
        for key in ("epoch", "train/loss", "train/lr", "train/temperature/tau", "val/rsum", "val/t2i_r5"):
            assert steps(client, rid, key) == list(range(epochs)), key
        monkeypatch.chdir(tmp_path)  # relative path defaults resolve where itr ran
        cfg = validate_config(tree)
        assert run.data.params == tracking.redact(cfg.flat_params())
        assert run.data.tags["itr.run_dir"] and run.data.tags["itr.config_hash"] == cfg.config_hash()
        assert {a.path for a in client.list_artifacts(rid)} >= {"config.yaml", "final_metrics.json"}
        final = json.loads(Path(client.download_artifacts(rid, "final_metrics.json", str(tmp_path))).read_text())
        assert final["epoch"] == epochs - 1 and final["val/rsum"] == pytest.approx(run.data.metrics["val/rsum"])
        assert yaml.safe_load(
            Path(client.download_artifacts(rid, "config.yaml", str(tmp_path))).read_text()
        ) == yaml.safe_load(cfg.to_yaml())
    assert not list(tmp_path.rglob(f"{tracking.UNSENT_PREFIX}*")), "nothing should have been spilled"


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """One SQLite tracking store for the logger tests (creating one costs seconds): (uri, client, experiment id)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'store.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("spill", artifact_location=(root / "artifacts").as_uri())


def _sqlite_run(store):
    uri, client, exp = store
    return uri, client, client.create_run(exp).info.run_id


def test_unreachable_store_spills_a_replayable_local_copy(tmp_path, sqlite_store, monkeypatch, caplog):
    """The server never comes back: ``close`` gives up after its bound, the run goes on, a warning names the
    file holding every unsent call, and replaying that file later logs exactly what was queued."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri, client, run_id = _sqlite_run(sqlite_store)
    dead = tracking.TrackingTarget(uri=f"http://127.0.0.1:{free_port()}", artifact_root=None, experiment="spill")
    logger = tracking.RunLogger(dead, run_id, spill_dir=tmp_path / "run", backoff_s=0.05, max_backoff_s=0.2)
    for epoch in range(3):
        logger({"train/loss": 1.0 / (epoch + 1), "epoch": float(epoch), "checkpoint/score": 9.0}, epoch)
    logger.log_text("final_metrics.json", '{"epoch": 2}')
    logger.set_tag("itr.run_dir", "somewhere")
    logger.end_run("FINISHED")
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="orchestrator.tracking"):
        assert logger.close(timeout_s=1.0) is False
    assert time.monotonic() - t0 < 5
    spilled = list((tmp_path / "run").glob(f"{tracking.UNSENT_PREFIX}{run_id}-*.json"))
    assert len(spilled) == 1
    assert str(spilled[0]) in caplog.text and "3 metric batch(es) (steps 0-2)" in caplog.text
    assert client.get_run(run_id).info.status == "RUNNING" and not client.get_metric_history(run_id, "epoch")

    assert tracking.replay_unsent(spilled[0], tracking_uri=uri) == 6
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["itr.run_dir"] == "somewhere"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (0, 1.0),
        (1, 0.5),
        (2, pytest.approx(1 / 3)),
    ]
    assert "checkpoint/score" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["final_metrics.json"]
    assert not spilled[0].exists()


def test_replayed_calls_are_idempotent_and_rejected_ones_do_not_block_the_queue(tmp_path, sqlite_store):
    """A call sent twice (a retry after a lost reply, a replayed file) leaves one metric row per step; a call the
    store rejects (changing a logged param) is dropped with the rest of the queue still sent."""
    uri, client, run_id = _sqlite_run(sqlite_store)
    target = tracking.TrackingTarget(uri=uri, artifact_root=None, experiment="spill")
    logger = tracking.RunLogger(target, run_id)
    logger.log_params({"train.lr": "0.001"})
    logger.log_metrics({"val/rsum": 12.5}, 0, timestamp_ms=1_000)
    logger.log_metrics({"val/rsum": 12.5}, 0, timestamp_ms=1_000)  # the same call again
    logger.log_params({"train.lr": "0.002"})  # rejected: params are immutable
    logger.log_metrics({"val/rsum": 20.0}, 1, timestamp_ms=2_000)
    assert logger.close(timeout_s=30) is True
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/rsum")] == [(0, 12.5), (1, 20.0)]
    assert client.get_run(run_id).data.params == {"train.lr": "0.001"}
    assert len(logger.dropped) == 1 and logger.dropped[0]["params"] == {"train.lr": "0.002"}


# ------------------------------------------------------------------------------ (c) non-finite loss
def test_non_finite_loss_fails_the_single_run_at_once_with_the_reason(tmp_path, capsys):
    """``itr train`` (in-process backend) with lr 1e30: the first update overflows the weights, the loss is NaN;
    the run stops at epoch 0 (no checkpoint), exit 1, MLflow run FAILED naming epoch, step and term."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    tree = fault_tree(tmp_path, epochs=3, steps_per_epoch=5, train={"lr": 1e30})
    assert main(["train", str(write_config(tmp_path, tree))]) == 1
    err = capsys.readouterr().err
    assert NON_FINITE.search(err), err
    run = only_run(MlflowClient(tracking_uri=tree["tracking"]["uri"]), "test")
    assert run.info.status == "FAILED" and NON_FINITE.fullmatch(run.data.tags["itr.failure"])
    assert not list((tmp_path / "runs").rglob(TRAINING_STATE_FILE))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_non_finite_loss_on_ray_train_is_not_retried(tmp_path, ray_cluster):
    """Through ``TorchTrainer`` with ``max_failures: 2``: the NaN fails the run on its first attempt (no
    restart from the checkpoint, which would only repeat it) and the driver raises the original error."""
    from mlflow.tracking import MlflowClient

    from orchestrator.run import run_experiment
    from orchestrator.train_loop import NonFiniteLossError

    tree = fault_tree(
        tmp_path, epochs=3, steps_per_epoch=5, train={"lr": 1e30}, scaling={"backend": "ray", "max_failures": 2}
    )
    t0 = time.monotonic()
    with pytest.raises(NonFiniteLossError) as info:
        run_experiment(validate_config(tree))
    assert info.value.epoch == 0 and info.value.terms == ["infonce"]
    run = only_run(MlflowClient(tracking_uri=tree["tracking"]["uri"]), "test")
    assert run.info.status == "FAILED" and NON_FINITE.fullmatch(run.data.tags["itr.failure"])
    ray_dirs = list((tmp_path / "runs" / "ray").iterdir())
    assert len(ray_dirs) == 1 and not list(ray_dirs[0].glob("checkpoint_*"))
    assert worker_group_starts(ray_dirs[0].name) == 1  # a retry would start a second group
    assert time.monotonic() - t0 < 120


def worker_group_starts(run_name: str) -> int:
    """How many worker groups the Train controller of ``run_name`` started, read from its log (Ray sessions keep
    them under ``/tmp/ray/session_*/logs/train``; run names carry a time stamp and a config hash)."""
    found = 0
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    for path in {p.resolve() for p in root.glob("session_*/logs/train/ray-train-app-controller-*.log")}:
        for line in path.read_text(errors="replace").splitlines():
            if f'"run_name": "{run_name}"' in line and "Attempting to start training worker group" in line:
                found += 1
    return found


@pytest.mark.ray
def test_non_finite_trial_fails_with_reason_and_the_sweep_goes_on(tmp_path, ray_cluster):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from orchestrator.search_space import load_space
    from orchestrator.sweep import run_sweep

    base = fault_tree(tmp_path, epochs=2, steps_per_epoch=4)
    base["tracking"]["experiment"] = "sweeps"
    doc = {
        "name": "nan",
        "base": base,
        "space": {"train.lr": {"grid": [1e-3, 1e30]}},
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run_sweep(load_space(path), progress=False)

    client = MlflowClient(tracking_uri=base["tracking"]["uri"])
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    children = {r.data.params["train.lr"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert set(children) == {"0.001", "1e+30"} and len(parent) == 1
    nan = children["1e+30"]
    assert nan.info.status == "FAILED" and NON_FINITE.search(nan.data.tags["itr.failure"]), nan.data.tags
    ok = children["0.001"]
    assert ok.info.status == "FINISHED" and steps(client, ok.info.run_id, "epoch") == [0, 1]
    assert parent[0].info.status == "FINISHED"
    assert {r["status"] for r in result.table} == {"finished", "failed"}


# ------------------------------------------------------------------------ (d) checkpoint write errors
class _DiskFullAfter:
    """A file object that accepts ``room`` bytes, then raises ENOSPC (as writing to a full disk does)."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.fh.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)


def fill_disk_after(monkeypatch, good_saves: int) -> list[Path]:
    """``torch.save`` succeeds ``good_saves`` times, then the disk is full 1 KB into the file; returns the folders
    the failing saves wrote into."""
    import torch

    real_save = torch.save
    calls = {"n": 0}
    failed_in: list[Path] = []

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= good_saves:
            return real_save(obj, f, *args, **kwargs)
        failed_in.append(Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).parent)
        return real_save(obj, _DiskFullAfter(f, 1024), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return failed_in


def test_atomic_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    path = tmp_path / "ckpt" / TRAINING_STATE_FILE
    atomic_save({"epoch": 0, "w": torch.arange(4.0)}, path)
    fill_disk_after(monkeypatch, good_saves=0)
    with pytest.raises(UserError) as info:
        atomic_save({"epoch": 1, "w": torch.zeros(100_000)}, path)
    assert info.value.path == str(path) and "No space left on device" in str(info.value)
    previous = load_file(path)
    assert previous["epoch"] == 0 and torch.equal(previous["w"], torch.arange(4.0))
    assert os.listdir(path.parent) == [TRAINING_STATE_FILE]


def test_atomic_save_into_a_read_only_folder_is_a_user_error(tmp_path):
    import torch

    folder = tmp_path / "ckpt"
    atomic_save({"epoch": 0}, folder / TRAINING_STATE_FILE)
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("this user writes into read-only folders (root): chmod cannot block the write")
        with pytest.raises(UserError) as info:
            atomic_save({"epoch": 1, "w": torch.zeros(10)}, folder / TRAINING_STATE_FILE)
        assert info.value.path == str(folder / TRAINING_STATE_FILE) and "Permission denied" in str(info.value)
        assert load_file(folder / TRAINING_STATE_FILE)["epoch"] == 0 and os.listdir(folder) == [TRAINING_STATE_FILE]
    finally:
        folder.chmod(0o755)


def test_disk_full_during_training_exits_2_naming_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """``itr train`` (in-process backend): epoch 0's checkpoint is written (two files), epoch 1's first file hits
    a full disk. Exit 2 with one line naming the file; the epoch-0 checkpoint still loads; no temp file is left;
    the MLflow run is FAILED with the reason."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    tree = fault_tree(tmp_path, epochs=3, steps_per_epoch=3)
    config = write_config(tmp_path, tree)
    failed_in = fill_disk_after(monkeypatch, good_saves=2)
    assert main(["train", str(config)]) == 2
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(failed_in) == 1 and len(err_lines) == 1
    assert (
        err_lines[0]
        == f"error: {failed_in[0] / TRAINING_STATE_FILE}: cannot write checkpoint (No space left on device)"
    )

    checkpoints = sorted((tmp_path / "runs").rglob("checkpoints/epoch_*"))
    assert [p.name for p in checkpoints] == ["epoch_0000"]
    state = load_file(checkpoints[0] / TRAINING_STATE_FILE)
    assert state["epoch"] == 0 and load_file(checkpoints[0] / MODEL_FILE)["epoch"] == 0
    assert not failed_in[0].exists() or not any(failed_in[0].iterdir())
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    run = only_run(MlflowClient(tracking_uri=tree["tracking"]["uri"]), "test")
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["itr.failure"]
    assert steps(MlflowClient(tracking_uri=tree["tracking"]["uri"]), run.info.run_id, "epoch") == [0]


def test_publish_dir_on_a_full_disk_keeps_the_previous_folder_and_no_partial_copy(tmp_path, monkeypatch):
    """``checkpoint.publish_dir`` (copy a checkpoint folder into the run folder): the second file hits a full
    disk -> UserError naming the destination; the previous folder is intact; no ``.tmp`` folder is left."""
    import shutil

    from orchestrator.checkpoint import publish_dir

    src = tmp_path / "src"
    src.mkdir()
    (src / MODEL_FILE).write_bytes(b"new model")
    (src / TRAINING_STATE_FILE).write_bytes(b"new state")
    dest = tmp_path / "checkpoints" / "epoch_0001"
    dest.mkdir(parents=True)
    (dest / TRAINING_STATE_FILE).write_bytes(b"old state")

    real_copyfile = shutil.copyfile
    copied = []

    def copyfile(a, b, *args, **kwargs):  # what copytree's copy2 writes the bytes with
        if copied:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(b))
        copied.append(b)
        return real_copyfile(a, b, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises(UserError) as info:
        publish_dir(src, dest)
    assert str(info.value) == f"{dest}: cannot write checkpoint (No space left on device)"
    assert sorted(os.listdir(dest.parent)) == ["epoch_0001"] and os.listdir(dest) == [TRAINING_STATE_FILE]
    assert (dest / TRAINING_STATE_FILE).read_bytes() == b"old state"

    monkeypatch.setattr(shutil, "copyfile", real_copyfile)
    publish_dir(src, dest)
    assert sorted(os.listdir(dest.parent)) == ["epoch_0001"]
    assert (dest / TRAINING_STATE_FILE).read_bytes() == b"new state" and (
        dest / MODEL_FILE
    ).read_bytes() == b"new model"
