"""Case 4, last part: the next attempt of a preempted ``itr train`` resumes it (``train.run_key``).

- A run with ``train.run_key`` lives in ``<output_dir>/<run_key>``. SIGTERM ends it KILLED (exit 143); the same
  command again resumes from its latest checkpoint, in the same MLflow run (KILLED -> RUNNING -> FINISHED), each
  epoch's metrics logged once, and ends with the metrics of an uninterrupted run of the same seed.
- The folder is refused (exit 2, one line naming it, nothing written) to another config, to a second process
  while one runs in it (an ``flock`` held for the run's lifetime), and once its run finished.
- Without a key every run gets a new folder (``tests/test_run_hardening.py`` pins that).

The first attempt is a real process (it gets the signal); the others run the CLI in-process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from orchestrator.config import validate_config
from orchestrator.metrics_catalogue import TIMING_METRICS
from orchestrator.run_folders import LOCK_FILE, RUN_FILE, claim_keyed_folder
from tests.test_bad_input import assert_one_line_error, run_cli, snapshot
from tests.test_faults import session_pids
from tests.test_run_hardening import ENV, ITR, _mlflow_runs, quick_tree, write_config

EPOCHS = 6


def keyed_tree(tmp: Path, key: str, **train) -> dict:
    tree = quick_tree(tmp)
    tree["train"].update(run_key=key, **train)
    return tree


def config_hash_in(cwd: Path, tree: dict) -> str:
    """The config hash ``itr train`` run in ``cwd`` computes (relative default paths resolve against the cwd)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return validate_config(tree).config_hash()
    finally:
        os.chdir(old)


def _metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def sigterm_after_first_checkpoint(tmp: Path, config: Path, folder: Path) -> tuple[int, str]:
    """Run ``itr train config`` as a process, SIGTERM it (its pid) once ``folder`` holds a checkpoint."""
    log = tmp / "attempt1.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ITR, "train", str(config)],
            cwd=tmp,
            env={**os.environ, **ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not list(folder.glob("checkpoints/epoch_*/state.pt")):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    return rc, log.read_text(errors="replace")


def test_a_preempted_run_resumes_in_the_same_mlflow_run_and_ends_as_an_uninterrupted_one(tmp_path, caplog):
    """Attempt 1 (a process) gets SIGTERM after its first checkpoint: exit 143, MLflow run KILLED. Attempt 2, the
    same command: resumes after the last checkpointed epoch, ends FINISHED in the same MLflow run with each epoch
    logged once, and its final metrics equal an uninterrupted run's with the same seed.
    Before: ``train.run_key`` did not exist and every attempt started over in a new folder and a new run."""
    from orchestrator.run import run_experiment

    tree = keyed_tree(tmp_path, "preempted", epochs=EPOCHS, max_steps_per_epoch=1)
    config = write_config(tmp_path, tree)
    uri = tree["tracking"]["uri"]
    folder = tmp_path / "runs" / "preempted"

    rc, out = sigterm_after_first_checkpoint(tmp_path, config, folder)
    assert rc == 143, out[-3000:]
    [run] = _mlflow_runs(uri, "itr")
    assert run.info.status == "KILLED" and run.data.tags["itr.run_key"] == "preempted"
    assert run.data.tags["itr.run_dir"] == str(folder)
    killed_at = len(_metric_steps(uri, run.info.run_id, "train/loss"))
    assert 1 <= killed_at < EPOCHS, out[-3000:]  # cut off mid-run, after at least one checkpointed epoch
    assert json.loads((folder / RUN_FILE).read_text())["status"] == "running"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as attempt 1 (OMP_NUM_THREADS=1): another thread count sums in another order
    try:
        with caplog.at_level(logging.INFO, logger="orchestrator"):
            rc, lines, _ = run_cli(["train", str(config)], tmp_path)
        reference_tree = quick_tree(tmp_path / "ref")
        reference_tree["train"].update(epochs=EPOCHS, max_steps_per_epoch=1)
        reference_tree["tracking"] = {"enabled": False}
        (tmp_path / "ref").mkdir()
        reference = run_experiment(validate_config(reference_tree)).metrics
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, (lines, caplog.text[-3000:])
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from ")]
    assert len(resumed) == 1 and str(folder / "checkpoints") in resumed[0], resumed
    done = int(resumed[0].rsplit("(epoch ", 1)[1].split()[0])
    assert done == killed_at - 1  # it resumes after the last epoch whose metrics MLflow has

    [again] = _mlflow_runs(uri, "itr")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert "itr.failure" not in again.data.tags
    assert _metric_steps(uri, run.info.run_id, "train/loss") == list(range(EPOCHS))  # no epoch twice, none lost
    assert _metric_steps(uri, run.info.run_id, "val/rsum") == list(range(EPOCHS))
    assert json.loads((folder / RUN_FILE).read_text())["status"] == "finished"

    assert reference["epoch"] == EPOCHS - 1
    finals = {k: v for k, v in again.data.metrics.items() if k not in TIMING_METRICS}
    expected = {k: v for k, v in reference.items() if k not in TIMING_METRICS}
    assert finals == expected  # exact: model, optimiser, schedule, temperature and torch RNG all resume


def test_the_folder_is_refused_to_another_config_and_once_its_run_finished(tmp_path):
    """A finished keyed run: the same command again, and a changed config with the same key, exit 2 naming the
    folder; nothing in it changes. Before: ``train.run_key`` was an unknown key."""
    tree = keyed_tree(tmp_path, "exp1")
    tree["tracking"] = {"enabled": False}
    config = write_config(tmp_path, tree)
    rc, lines, _ = run_cli(["train", str(config)], tmp_path)
    assert rc == 0, lines
    folder = tmp_path / "runs" / "exp1"
    record = json.loads((folder / RUN_FILE).read_text())
    assert record["status"] == "finished" and record["config_hash"] == config_hash_in(tmp_path, tree)
    before = snapshot(tmp_path)

    rc, lines, _ = run_cli(["train", str(config)], tmp_path)
    assert_one_line_error(rc, lines, f"error: {folder}:train.run_key: holds a finished run")

    tree["train"]["lr"] = 2e-3
    changed = config_hash_in(tmp_path, tree)
    rc, lines, _ = run_cli(["train", str(write_config(tmp_path, tree))], tmp_path)
    assert_one_line_error(
        rc, lines, f"error: {folder}:train.run_key: holds a run of another config", record["config_hash"], changed
    )
    assert snapshot(tmp_path) == before


def test_a_second_process_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    """While a run holds the folder's lock (taken here as ``itr train`` takes it), ``itr train`` with the same key
    exits 2 naming the folder and the holder's pid, and writes nothing; once released, it runs."""
    tree = keyed_tree(tmp_path, "shared")
    tree["tracking"] = {"enabled": False}
    config = write_config(tmp_path, tree)
    holder = claim_keyed_folder(tmp_path / "runs", "shared", config_hash_in(tmp_path, tree), resume=True)
    try:
        before = snapshot(tmp_path)
        rc, lines, _ = run_cli(["train", str(config)], tmp_path)
        folder = tmp_path / "runs" / "shared"
        assert_one_line_error(
            rc, lines, f"error: {folder}:train.run_key: in use by another itr train (pid {os.getpid()})"
        )
        assert snapshot(tmp_path) == before and not (folder / "checkpoints").exists()
    finally:
        holder.release()
    rc, lines, _ = run_cli(["train", str(config)], tmp_path)
    assert rc == 0, lines
    assert (folder / "checkpoints").is_dir() and (folder / LOCK_FILE).is_file()


def test_a_run_key_that_is_not_one_folder_name_exits_2(tmp_path):
    tree = keyed_tree(tmp_path, "../elsewhere")
    config = write_config(tmp_path, tree)
    rc, lines, _ = run_cli(["train", str(config)], tmp_path)
    assert_one_line_error(rc, lines, f"{config}:train.run_key", "not a folder name")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()
