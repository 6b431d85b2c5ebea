"""``itr train`` and ``itr ui`` at their edges: signals, the tracking store, the output folder, run folders.

- SIGTERM mid-run (Kubernetes preemption, ``timeout``) ends the MLflow run KILLED and exits 143, in bounded time.
- What can fail is checked before the MLflow run exists: an unreachable server, an unknown URI scheme, an SQLite
  URI on a non-database, an ``output_dir`` that is a file, a missing image: exit 2, one line, nothing written.
- Two identical configs started in the same second get their own run folders.
- ``itr ui`` rejects a bad port or URI up front, and SIGTERM to it takes its MLflow server down (port freed).

The CLI runs in-process except where a real process is the point (the two signal tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.config import validate_config
from tests.mlflow_server import free_port
from tests.test_bad_input import assert_one_line_error, base_tree, run_cli, snapshot
from tests.test_faults import _stat, session_pids

ITR = str(Path(sys.executable).with_name("itr"))
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


def write_config(tmp: Path, tree: dict) -> Path:
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def quick_tree(tmp: Path) -> dict:
    """``base_tree`` cut to the fewest steps: no initial evaluation, no report figures."""
    tree = base_tree(tmp)
    tree["train"].update(eval_at_start=False, max_steps_per_epoch=2)
    tree["eval"] = {"reports": False}
    return tree


def train_fails_before_anything(tmp: Path, tree: dict, *needles: str) -> str:
    """``itr train`` of ``tree`` exits 2 with one line holding ``needles``; no file appears under ``tmp``."""
    cfg = write_config(tmp, tree)
    before = snapshot(tmp)
    rc, lines, out = run_cli(["train", str(cfg)], tmp)
    line = assert_one_line_error(rc, lines, *needles)
    assert snapshot(tmp) == before, "a failed check wrote files (an MLflow store, a run folder)"
    assert out == ""
    return line


# ------------------------------------------------------------------------------------ preflight (5, 12c, 12h, 13)
def test_unreachable_tracking_server_exits_2_at_once_naming_it(tmp_path):
    """Nothing listens on the port: one probe with a short timeout, then exit 2 -- not minutes of MLflow's HTTP
    retries (the default budget is ~4 minutes), and no step runs."""
    tree = quick_tree(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    tree["tracking"]["uri"] = uri
    t0 = time.monotonic()
    line = train_fails_before_anything(
        tmp_path, tree, "tracking.uri", f"tracking server {uri} unreachable; set tracking.uri or start it"
    )
    assert time.monotonic() - t0 < 15, "the start waited on the tracking server"
    assert line.startswith(f"error: {tmp_path / 'experiment.yaml'}:tracking.uri: ")


def test_unreachable_server_from_the_environment_names_the_variable(tmp_path, monkeypatch):
    tree = quick_tree(tmp_path)
    del tree["tracking"]["uri"]
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = train_fails_before_anything(tmp_path, tree, f"tracking server {uri} unreachable")
    assert line.startswith("error: MLFLOW_TRACKING_URI: "), line


def test_unknown_tracking_uri_scheme_exits_2(tmp_path):
    tree = quick_tree(tmp_path)
    tree["tracking"]["uri"] = "foo://bar"
    train_fails_before_anything(tmp_path, tree, "tracking.uri", "unknown tracking URI scheme 'foo' in foo://bar")


def test_sqlite_uri_on_a_file_that_is_not_a_database_exits_2_and_leaves_it_alone(tmp_path):
    tree = quick_tree(tmp_path)
    notes = tmp_path / "notes.db"
    notes.write_text("my notes, not a database\n")
    tree["tracking"]["uri"] = f"sqlite:///{notes}"
    line = train_fails_before_anything(tmp_path, tree, "not an SQLite database")
    assert line.startswith(f"error: {notes}:tracking.uri: "), line
    assert notes.read_text() == "my notes, not a database\n"


def test_sqlite_store_checks_take_new_files_and_folders_and_real_databases(tmp_path):
    """Not over-strict: MLflow creates a missing database and its folders, and an empty file is a database."""
    import sqlite3

    from orchestrator.errors import UserError
    from orchestrator.preflight import check_tracking_uri

    real = tmp_path / "real.db"
    sqlite3.connect(real).execute("create table t (x)").connection.close()
    (tmp_path / "empty.db").touch()
    for ok in (tmp_path / "new" / "sub" / "m.db", real, tmp_path / "empty.db"):
        check_tracking_uri(f"sqlite:///{ok}")
    check_tracking_uri("sqlite://")  # in memory
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot create the tracking database: .*afile is a file, not a folder"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'afile' / 'm.db'}")
    with pytest.raises(UserError, match="is a folder, not an SQLite database"):
        check_tracking_uri(f"sqlite:///{tmp_path}")


def test_output_dir_that_is_a_file_fails_before_the_run_starts(tmp_path):
    """Before: the MLflow run was created and the first checkpoint failed after epoch 0."""
    tree = quick_tree(tmp_path)
    runs = tmp_path / "runs"
    runs.write_text("a file where the run folders should go\n")
    train_fails_before_anything(tmp_path, tree, "train.output_dir", f"{runs} is a file, not a folder")


def missing_image_tree(tmp: Path) -> tuple[dict, Path]:
    """``quick_tree`` on a captions_json dataset whose train and val images do not exist; and the train image."""
    data = tmp / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.json").write_text(
            json.dumps([{"image": f"{split}-missing.png", "caption": "a red square", "image_id": 1}])
        )
    tree = quick_tree(tmp)
    tree["data"] = {"format": "captions_json", "root": str(data)}
    return tree, (data / "train-missing.png").resolve()


def test_missing_image_fails_before_an_mlflow_run_exists(tmp_path):
    """Data errors come before the run: no FAILED MLflow run (no store at all), no run folder."""
    tree, missing = missing_image_tree(tmp_path)
    train_fails_before_anything(tmp_path, tree, str(missing), "image file not found")


def sweep_fails_before_anything(tmp: Path, tree: dict, *needles: str) -> str:
    """``itr sweep`` over ``tree`` as inline base exits 2 with one line holding ``needles``, before Ray starts:
    no sweep folder, no MLflow store, no parent run (the check runs once, not in every trial)."""
    space = tmp / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {"base": tree, "space": {"train.lr": {"grid": [1e-3, 2e-3]}}, "metric": "val/rsum"}, sort_keys=False
        )
    )
    before = snapshot(tmp)
    t0 = time.perf_counter()
    rc, lines, out = run_cli(["sweep", str(space), "--quiet"], tmp)
    line = assert_one_line_error(rc, lines, *needles)
    assert snapshot(tmp) == before, "a failed check wrote files (a sweep folder, an MLflow store)"
    assert time.perf_counter() - t0 < 20, "the check should come before Ray starts"
    import ray

    assert not ray.is_initialized()
    return line


def test_sweep_with_a_missing_image_fails_once_before_ray_or_a_parent_run(tmp_path):
    tree, missing = missing_image_tree(tmp_path)
    sweep_fails_before_anything(tmp_path, tree, str(missing), "image file not found")


def test_sweep_against_an_unreachable_tracking_server_fails_before_ray(tmp_path):
    tree = quick_tree(tmp_path)
    tree["tracking"] = {"uri": f"http://127.0.0.1:{free_port()}"}
    sweep_fails_before_anything(tmp_path, tree, "tracking.uri", "unreachable; set tracking.uri or start it")


# ---------------------------------------------------------------------------------------------- run folders (14)
def test_identical_configs_started_in_the_same_second_get_their_own_run_folders(tmp_path, monkeypatch):
    """Same config, same (frozen) timestamp: before, both runs shared one folder and the second resumed from the
    first's checkpoint (trained nothing, returned no metrics). Each must train in its own folder."""
    from orchestrator.run import run_experiment

    tree = quick_tree(tmp_path)
    tree["tracking"] = {"enabled": False}
    cfg = validate_config(tree)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    first = run_experiment(cfg)
    second = run_experiment(cfg)
    assert first.run_dir != second.run_dir
    assert Path(first.run_dir).parent == Path(second.run_dir).parent == tmp_path / "runs"
    for result in (first, second):
        assert Path(result.run_dir).name.startswith(f"infonce-20260101-000000-{cfg.config_hash()[:6]}-")
        assert Path(result.best_checkpoint).parent.parent == Path(result.run_dir)
    assert second.metrics["epoch"] == first.metrics["epoch"] == 0
    assert second.metrics["train/loss"] == pytest.approx(first.metrics["train/loss"], abs=1e-6)


# ------------------------------------------------------------------------------------------------ SIGTERM (4)
def _mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp is not None else []


def sigterm_itr_train_mid_run(tmp_path: Path, scaling: dict, first_checkpoint: str) -> tuple[int, float, str, list]:
    """Start ``itr train`` of a many-epoch config, SIGTERM it (its pid only, as Kubernetes does) once
    ``first_checkpoint`` (a glob under ``runs/``) exists; returns (exit code, seconds it took to exit, its output,
    its MLflow runs). Whatever is left of its session is SIGKILLed afterwards."""
    tree = quick_tree(tmp_path)
    tree["train"].update(epochs=500, max_steps_per_epoch=1)
    tree["scaling"] = scaling
    config = write_config(tmp_path, tree)
    log = tmp_path / "train.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ITR, "train", str(config)],
            cwd=tmp_path,
            env={**os.environ, **ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "runs").glob(first_checkpoint)):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in session_pids(proc.pid)]
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    out = log.read_text(errors="replace")
    assert not left, f"processes of itr train outlived it: {left}"
    return rc, took, out, _mlflow_runs(tree["tracking"]["uri"], "itr")


def test_sigterm_mid_run_ends_the_mlflow_run_killed_and_exits_143(tmp_path):
    """``itr train`` (in-process backend) gets SIGTERM once its first checkpoint is written: it exits 143 within
    the flush bound, and its MLflow run is KILLED (not RUNNING forever) with epoch 0's metrics in.
    Before: the default SIGTERM action killed the process (-15) and the run stayed RUNNING."""
    rc, took, out, runs = sigterm_itr_train_mid_run(tmp_path, {"backend": "local"}, "*/checkpoints/epoch_*/state.pt")
    assert rc == 143, out[-3000:]
    assert took < 15, f"SIGTERM took {took:.1f} s to end the run"
    assert out.rstrip().endswith("terminated (SIGTERM)") and "Traceback" not in out, out[-3000:]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert run.data.tags["itr.failure"] == "Terminated: SIGTERM"
    assert "train/loss" in run.data.metrics and run.data.metrics["epoch"] >= 0


def test_sigterm_inside_a_deferred_block_lands_after_it_and_is_found_behind_a_library_error():
    """A checkpoint being published is never cut in half: the signal waits for the block. An interruption a
    library wrapped (``torch.save`` cut short raises a RuntimeError over it) still counts as one."""
    from orchestrator.interrupts import Terminated, deferred, interruption_in, sigterm_as_interrupt

    steps, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                steps.append("finished the block")
            steps.append("after the block")
    assert steps == ["finished the block"]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back

    try:
        try:
            raise Terminated("SIGTERM")
        except Terminated:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904 (the chain is tested)
    except RuntimeError as err:
        wrapped = err
    assert isinstance(interruption_in(wrapped), Terminated)
    assert interruption_in(ValueError("no interruption here")) is None


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_mid_ray_train_run_ends_it_killed_and_leaves_no_ray_process(tmp_path):
    """The same on Ray Train. Before: Ray's own SIGTERM handler called sys.exit(1): the run ended FAILED
    ("SystemExit: 1") and itr exited 134. Metrics the Train controller had not sent yet may be missing."""
    rc, took, out, runs = sigterm_itr_train_mid_run(
        tmp_path, {"backend": "ray", "num_workers": 1}, "ray/*/checkpoint_*"
    )
    assert rc == 143, out[-3000:]
    assert took < 30, f"SIGTERM took {took:.1f} s to end the run"
    assert "terminated (SIGTERM)" in out and "Traceback" not in out, out[-3000:]
    assert len(runs) == 1
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["itr.failure"] == "Terminated: SIGTERM"


# ---------------------------------------------------------------------------------------------------- itr ui
@pytest.fixture
def no_server_started(monkeypatch):
    """A bad argument must fail before any server process: starting one fails the test instead."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a server was started: {args}")

    monkeypatch.setattr(os, "execvpe", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("port", [99999, 0, -1])
def test_itr_ui_rejects_a_port_outside_1_to_65535(tmp_path, no_server_started, port):
    rc, lines, _ = run_cli(["ui", "--port", str(port), "--uri", f"sqlite:///{tmp_path / 'ui.db'}"], tmp_path)
    line = assert_one_line_error(rc, lines, "--port", f"{port} is not a TCP port (use 1-65535)")
    assert line == f"error: --port: {port} is not a TCP port (use 1-65535)"


@pytest.mark.parametrize(
    "uri, needle", [("foo://", "unknown tracking URI scheme 'foo'"), ("foo://bar", "unknown tracking URI scheme 'foo'")]
)
def test_itr_ui_rejects_an_unknown_uri_scheme(tmp_path, no_server_started, uri, needle):
    rc, lines, _ = run_cli(["ui", "--uri", uri], tmp_path)
    line = assert_one_line_error(rc, lines, needle)
    assert line.startswith("error: --uri: "), line


def test_itr_ui_rejects_an_sqlite_uri_on_a_non_database(tmp_path, no_server_started):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    rc, lines, _ = run_cli(["ui", "--uri", f"sqlite:///{junk}"], tmp_path)
    assert_one_line_error(rc, lines, str(junk), "--uri", "not an SQLite database")


def _descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (by parent links in /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_to_itr_ui_stops_its_mlflow_server_and_frees_the_port(tmp_path):
    """Before: ``itr ui`` exec'd ``mlflow ui``, whose uvicorn server outlived a SIGTERM, holding the port."""
    port = free_port()
    env = {**os.environ, **ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ITR, "ui", "--port", str(port), "--uri", f"sqlite:///{tmp_path / 'ui.db'}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    children: set[int] = set()
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the UI did not answer within 90 s"
            try:
                with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        children = _descendants(proc.pid)
        assert children, "itr ui runs the server as its child"
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=20)
        deadline = time.monotonic() + 5
        while (_port_open(port) or any(map(_alive, children))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _port_open(port), "the port is still held after itr ui exited"
        assert not [p for p in children if _alive(p)], "server processes outlived itr ui"
        assert rc == 143, log.read_text(errors="replace")[-3000:]
    finally:
        for pid in [proc.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
