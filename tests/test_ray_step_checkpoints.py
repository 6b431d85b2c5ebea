"""Step checkpoints on the Ray backend (issue 14, item 5): ``train.checkpoint_every_steps`` under Ray Train.

- Every rank reports at the step (Ray Train needs all of them); rank 0's folder holds the checkpoint, rank k's its
  own RNG states and epoch sums (``rank_000k.pt``); Ray puts both in one checkpoint folder.
- The report is marked ``checkpoint/step_report``: the Train controller logs no MLflow epoch for it, a sweep's Train
  trial forwards nothing to Tune, and its score is below every epoch's, so Ray 2.60's retention
  (``num_to_keep=1`` + score order, the latest never deleted) keeps the best epoch checkpoint and the latest one.
- The slow test: 2 workers writing to a moto S3 server, one SIGKILLed mid-epoch after a step checkpoint; the
  restarted group resumes from it and ends with an undisturbed 2-worker run's per-epoch metrics.

A SIGTERM of a Ray worker (a preempted node) is not caught there: the training function runs outside the worker's
main thread, and one rank alone cannot make the collective report. Ray Train restarts the group from the latest
checkpoint, so ``checkpoint_every_steps`` bounds the steps a preemption loses (the local backend saves one at the
SIGTERM: tests/test_step_checkpoints.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from orchestrator.ray_train_hooks import (
    TrainControllerHooks,
    _epoch_reports_class,
    checkpoint_config,
    is_step_report,
    step_report,
)
from tests.test_object_storage import BUCKET, objects, s3_endpoint, write_config  # noqa: F401 - a fixture

# ------------------------------------------------------------------------------- Ray's retention
RETENTION = [  # (folder, an epoch's selection metric in mode max, or a step report's position)
    ("e0", -1e30),  # epoch 0, not evaluated (train.eval_every: 2)
    ("s1", (1, 3)),
    ("s2", (1, 6)),
    ("e1", 5.0),
    ("s3", (2, 3)),
    ("e2", 4.0),
    ("s4", (3, 3)),
    ("e3", 20.0),
]
#: the folders left after each report: the best epoch by score, and the latest
KEPT = [{"e0"}, {"e0", "s1"}, {"e0", "s2"}, {"e1"}, {"e1", "s3"}, {"e1", "e2"}, {"e1", "s4"}, {"e3"}]


def _retained(tmp_path: Path, mode: str) -> list[tuple[set[str], str]]:
    """Feed ``RETENTION`` (as ``RayTrainSession`` words its reports) to Ray 2.60's own Train V2 checkpoint manager
    with ``checkpoint_config(mode)``; (folders left in storage, latest) after each report."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.context import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    sign = 1.0 if mode == "max" else -1.0
    after: list[tuple[set[str], str]] = []

    async def run() -> None:  # the manager notifies listeners through asyncio tasks
        storage = StorageContext(str(tmp_path), "run")
        manager = CheckpointManager(checkpoint_config(mode), storage)
        root = Path(storage.experiment_fs_path)
        for name, what in RETENTION:
            folder = root / name
            folder.mkdir()
            (folder / "model.pt").write_bytes(b"w")
            if isinstance(what, tuple):
                metrics = step_report(*what, best_mode=mode)
            else:  # an epoch: RayTrainSession.report's score, the metric itself (min mode: negated values, lower
                # wins; the unevaluated epoch's -1e30 becomes +1e30, as orchestrator.run_ray._score words it)
                metrics = {"epoch": float(name[1:]), "checkpoint/score": sign * what}
            manager.register_checkpoint(_TrainingReport(Checkpoint(str(folder)), metrics, False))
            kept = {p.name for p in root.iterdir() if p.is_dir()}
            after.append((kept, Path(manager.latest_checkpoint_result.checkpoint.path).name))
        await asyncio.sleep(0)

    asyncio.run(run())
    return after


@pytest.mark.parametrize("mode", ["max", "min"])
def test_ray_keeps_the_best_epoch_checkpoint_and_the_latest_step_checkpoint(tmp_path, mode):
    """Ray's own manager: a step checkpoint survives while it is the latest (a restart resumes from it), never
    evicts the best epoch checkpoint -- not even an unevaluated one -- and is dropped once a newer checkpoint
    exists. The same in min mode (a step score of the wrong sign would become the best there and evict e0)."""
    after = _retained(tmp_path, mode)
    assert [folders for folders, _ in after] == KEPT
    assert [latest for _, latest in after] == [name for name, _ in RETENTION]


def test_a_step_report_is_marked_and_has_no_epoch():
    report = step_report(2, 40, "max")
    assert is_step_report(report) and "epoch" not in report
    assert (report["checkpoint/epoch"], report["checkpoint/step"]) == (2.0, 40.0)
    # below an unevaluated epoch's score (-1e30 in max mode, +1e30 in min mode: orchestrator.run_ray._score)
    assert report["checkpoint/score"] < -1e30 and step_report(0, 1, "min")["checkpoint/score"] > 1e30
    assert not is_step_report({"epoch": 2.0, "checkpoint/score": 3.0}) and not is_step_report(None)


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []
        self.closed = 0

    def log_metrics(self, metrics, step) -> None:
        self.logged.append((dict(metrics), step))

    def close(self, timeout_s=None) -> bool:
        self.closed += 1
        return True


def test_the_train_controller_logs_epochs_and_skips_step_reports():
    """A step report of the last epoch neither reaches MLflow nor closes the logger (which the last epoch's
    report does); the epoch reports around it are logged at step = epoch."""
    hooks = TrainControllerHooks(None, None, spill_dir="/nonexistent", last_epoch=1, max_failures=0)
    hooks._logger = _Logger()
    epoch0 = {"epoch": 0.0, "train/loss": 1.5, "checkpoint/score": 3.0}
    hooks.after_report(None, [epoch0, dict(epoch0)], object())
    hooks.after_report(None, [step_report(1, 5, "max")] * 2, object())
    assert hooks._logger.logged == [(epoch0, 0)] and hooks._logger.closed == 0
    epoch1 = {"epoch": 1.0, "train/loss": 1.2, "checkpoint/score": 4.0}
    hooks.after_report(None, [epoch1, dict(epoch1)], object())
    assert [step for _, step in hooks._logger.logged] == [0, 1] and hooks._logger.closed == 1


def test_a_sweeps_train_trial_forwards_only_epoch_reports_to_tune():
    """``epoch_reports_to_tune``'s callback (built without a Tune session here): Tune's queue gets the epoch
    report with its checkpoint path, nothing for a step report (which would count as a training iteration)."""
    cls = _epoch_reports_class()
    callback = cls.__new__(cls)
    queue: list[dict] = []
    callback._training_actor_item_queue = type("Q", (), {"put": staticmethod(queue.append)})()

    class Ckpt:
        path = "bucket/runs/ray/x/checkpoint_1"

    callback.after_report(None, [step_report(0, 5, "max")], Ckpt())
    assert queue == []
    callback.after_report(None, [{"epoch": 0.0, "val/rsum": 9.0}], Ckpt())
    assert queue == [{"epoch": 0.0, "val/rsum": 9.0, "checkpoint_path": Ckpt.path}]


# --------------------------------------------------------------------------- per-rank state
def test_each_rank_resumes_a_step_checkpoint_with_its_own_rng_and_sums(tmp_path, caplog):
    """Rank 1's file beside rank 0's ``state.pt``: ``for_rank`` gives rank 1 its own RNG states (what it drew
    next before the cut) and epoch sums, rank 0 its ``state.pt``; an epoch checkpoint and a folder without the
    rank's file (another world size: a warning) leave ``state.pt``'s."""
    from orchestrator.distributed import MetricSums
    from orchestrator.training_state import capture_rng, for_rank, restore_rng, save_rank_state

    sums = MetricSums(torch.device("cpu"))
    for loss in (0.25, 0.5, 2.0):
        sums.add({"train/loss": torch.tensor(loss)})
    torch.manual_seed(11)
    save_rank_state(tmp_path, 1, sums)
    want = torch.rand(3)  # what rank 1 draws next
    rank0 = {
        "position": {"epoch": 2, "step": 3},
        "rng": capture_rng(),
        "sums": {"names": ["train/loss"], "total": torch.tensor([9.0], dtype=torch.float64), "steps": 3},
    }

    own = for_rank(rank0, tmp_path, 1)
    assert own["sums"]["total"].tolist() == [2.75] and own["sums"]["steps"] == 3
    assert own["position"] == rank0["position"]
    restore_rng(own["rng"])
    assert torch.equal(torch.rand(3), want)
    assert for_rank(rank0, tmp_path, 0) is rank0
    assert for_rank({**rank0, "position": None}, tmp_path, 1)["sums"]["total"].tolist() == [9.0]
    with caplog.at_level(logging.WARNING, logger="orchestrator.training_state"):
        assert for_rank(rank0, tmp_path, 2) is rank0
    assert "rank_0002.pt" in caplog.text


# ----------------------------------------------------------------------- Ray Train on S3, slow
def _snapshot(client, prefix: str) -> dict | None:
    """Ray Train's checkpoint manager snapshot of the one run under ``prefix`` in the bucket, or None."""
    keys = [k for k in objects(client, prefix) if k.endswith("/checkpoint_manager_snapshot.json")]
    if len(keys) != 1:
        return None
    try:
        return json.loads(client.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read())
    except (ValueError, client.exceptions.NoSuchKey):
        return None


def _latest_step_report(client, prefix: str, epoch: int) -> dict | None:
    snap = _snapshot(client, prefix)
    latest = (snap or {}).get("latest_checkpoint_result") or {}
    metrics = latest.get("metrics") or {}
    if is_step_report(metrics) and metrics.get("checkpoint/epoch") == epoch:
        return latest
    return None


@pytest.mark.ray
@pytest.mark.slow  # two 2-worker Ray runs in child processes (~3 min on the 2-core box)
def test_sigkilled_worker_resumes_mid_epoch_from_the_step_checkpoint_in_s3(tmp_path, s3_endpoint):  # noqa: F811
    """2 DDP workers, ``checkpoint_every_steps: 10`` (30 steps per epoch), checkpoints in S3. Once a step
    checkpoint of epoch 1 is committed, one worker is SIGKILLed: the group restarts from the latest step
    checkpoint (``... then S steps of epoch 1``), MLflow holds epochs 0 and 1 once each and no step report, and
    both epochs' train/loss means (both ranks' sums, rank 1's carried in its own file) and the val metrics equal an
    undisturbed 2-worker run's. The folder committed at the kill holds rank 0's ``state.pt`` and rank 1's
    ``rank_0001.pt``; at the end only epoch checkpoints are left.

    Tolerances as in tests/test_faults.py: the resumed ranks compute the same operations in the same order
    (measured difference 0.0); a resume from the epoch start, or rank 0's sums on rank 1, moves the epoch-1
    train/loss mean by > 1e-3."""
    from mlflow.tracking import MlflowClient

    from tests.test_faults import cmdline, fault_tree, kill_session, session_pids, start_itr, wait_for

    tree = fault_tree(
        tmp_path, epochs=2, steps_per_epoch=30, scaling={"backend": "ray", "num_workers": 2, "cpus_per_worker": 1}
    )
    tree["data"]["synthetic"]["num_train_images"] = 960  # 960 / (16 x 2 ranks) = 30 steps per epoch
    tree["train"].update(checkpoint_every_steps=10, output_dir=f"s3://{BUCKET}/stepkill")
    tree["tracking"].update(experiment="killed", run_name="killed")
    config = write_config(tmp_path, tree)
    MlflowClient(tracking_uri=tree["tracking"]["uri"]).search_experiments()  # the store exists before the runs
    log = tmp_path / "killed.log"
    proc = start_itr(["train", str(config)], tmp_path, log)
    try:
        latest = wait_for(
            lambda: _latest_step_report(s3_endpoint, "stepkill/", 1),
            400,
            "a step checkpoint of epoch 1",
            proc,
            log,
            poll=0.1,
        )
        workers = [p for p in session_pids(proc.pid) if cmdline(p).startswith("ray::RayTrainWorker")]
        assert len(workers) == 2, [cmdline(p) for p in session_pids(proc.pid)]
        os.kill(workers[1], signal.SIGKILL)
        killed_at = latest["metrics"]["checkpoint/step"]
        folder = [k for k in objects(s3_endpoint, "stepkill/") if f"/{latest['checkpoint_dir_name']}/" in k]
        rc = proc.wait(timeout=400)
    finally:
        kill_session(proc.pid)
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    assert {Path(k).name for k in folder} >= {"state.pt", "model.pt", "rank_0001.pt"}, folder
    resumed = {int(s) for s in re.findall(r"resumed from \S+ \(epoch 0 done, then (\d+) steps of epoch 1\)", out)}
    assert resumed and resumed <= {int(killed_at), int(killed_at) + 10}, out[-4000:]
    left = objects(s3_endpoint, "stepkill/")
    assert any(k.endswith("/model.pt") for k in left) and not any(k.endswith("/rank_0001.pt") for k in left)

    # the undisturbed run: same config, local storage, its own experiment
    ref_tree = dict(
        tree,
        train=dict(tree["train"], output_dir=str(tmp_path / "reference")),
        tracking=dict(tree["tracking"], experiment="reference", run_name="reference"),
    )
    (tmp_path / "ref").mkdir()
    ref_log = tmp_path / "reference.log"
    ref = start_itr(["train", str(write_config(tmp_path / "ref", ref_tree))], tmp_path, ref_log)
    try:
        assert ref.wait(timeout=400) == 0, ref_log.read_text(errors="replace")[-4000:]
    finally:
        kill_session(ref.pid)
    assert "resumed from" not in ref_log.read_text(errors="replace")

    client = MlflowClient(tracking_uri=tree["tracking"]["uri"])
    runs = {}
    for experiment in ("killed", "reference"):
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(found) == 1 and found[0].info.status == "FINISHED"
        runs[experiment] = found[0]
    killed, reference = runs["killed"], runs["reference"]
    assert not any(k.startswith("checkpoint/") for k in killed.data.metrics), sorted(killed.data.metrics)

    def history(run, key: str) -> dict[int, float]:
        points = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in points]
        assert steps == sorted(set(steps)) == [0, 1], (key, steps)  # each epoch once, no step report
        return {m.step: m.value for m in points}

    for key in ("epoch", "train/loss", "train/infonce"):
        mine, theirs = history(killed, key), history(reference, key)
        assert mine == pytest.approx(theirs, abs=1e-6), key
    for key in ("val/rsum", "val/i2t_r1", "val/t2i_r1"):
        assert killed.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-4), key
    assert killed.data.tags["itr.best_checkpoint"].startswith(f"s3://{BUCKET}/stepkill/ray/")
