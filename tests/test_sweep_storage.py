"""``itr sweep`` with an object-storage ``train.output_dir`` (issue 14, item 5), against a moto S3 server.

The sweep folder is then ``s3://<bucket>/<prefix>/sweeps/<name>``: Tune keeps its experiment state there, the
sweep's ``itr_sweep.json`` is read and written through pyarrow, the leaderboard is drawn locally, logged to MLflow
and uploaded to ``<sweep>/leaderboard``; nothing is written to the local disk under ``train.output_dir``'s name.
The fast tests pin the pure parts (folder naming, the state file's round trip through a URI, the leaderboard
upload, a missing bucket); the slow one runs a 2-trial grid sweep and its ``--resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from orchestrator.sweep.state import leaderboard_folder, read_state, sweep_folder, tune_storage_path, write_state
from tests.test_object_storage import BUCKET, objects, s3_endpoint  # noqa: F401 - a fixture
from tests.test_sweep import fake_trial, fakes_by_value, runs_of, space_doc, sweep_base  # noqa: F401


# ------------------------------------------------------------------------------------------- naming
def test_a_uri_output_dir_gives_a_sweep_folder_uri_and_tune_its_parent():
    folder = sweep_folder("s3://b/runs", "grid1")
    assert folder == "s3://b/runs/sweeps/grid1" and tune_storage_path(folder) == "s3://b/runs/sweeps"
    with_query = sweep_folder("gs://b/runs/?endpoint_override=h:1", "g")  # the query string stays at the end
    assert with_query == "gs://b/runs/sweeps/g?endpoint_override=h:1"
    assert tune_storage_path(with_query) == "gs://b/runs/sweeps?endpoint_override=h:1"


def test_a_local_output_dir_gives_an_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = sweep_folder(Path("runs"), "grid1")
    assert folder == (tmp_path / "runs" / "sweeps" / "grid1").resolve() and isinstance(folder, Path)
    assert tune_storage_path(folder) == str((tmp_path / "runs" / "sweeps").resolve())


def test_sweep_dir_follows_the_base_config(tmp_path):
    from orchestrator.config import validate_config
    from orchestrator.sweep import sweep_dir

    class Space:
        base_config = validate_config({"train": {"output_dir": "s3://b/runs"}})
        name, path = "s", tmp_path / "space.yaml"

    assert sweep_dir(Space()) == "s3://b/runs/sweeps/s" and sweep_dir(Space(), "other") == "s3://b/runs/sweeps/other"


# -------------------------------------------------------------------------- the state file in S3
def test_the_state_file_round_trips_through_a_uri(s3_endpoint):  # noqa: F811
    folder = f"s3://{BUCKET}/state/sweeps/s1"
    assert read_state(folder) is None  # nothing there yet
    state = {"name": "s1", "parent_run_id": "abc123", "fingerprint": "f" * 16, "space_file": "/x/space.yaml"}
    write_state(folder, state)
    assert objects(s3_endpoint, "state/") == ["state/sweeps/s1/itr_sweep.json"]
    assert read_state(folder) == state
    body = s3_endpoint.get_object(Bucket=BUCKET, Key="state/sweeps/s1/itr_sweep.json")["Body"].read()
    assert json.loads(body) == state
    write_state(folder, {**state, "parent_run_id": "def456"})  # replaced whole
    assert read_state(folder)["parent_run_id"] == "def456" and len(objects(s3_endpoint, "state/")) == 1
    s3_endpoint.put_object(Bucket=BUCKET, Key="state/sweeps/bad/itr_sweep.json", Body=b"{not json")
    assert read_state(f"s3://{BUCKET}/state/sweeps/bad") is None  # as a local unreadable file: start over


def test_the_state_file_round_trips_through_a_local_folder(tmp_path):
    folder = tmp_path / "sweeps" / "s1"
    write_state(folder, {"name": "s1"})
    assert read_state(folder) == {"name": "s1"} and sorted(p.name for p in folder.iterdir()) == ["itr_sweep.json"]


def test_the_leaderboard_is_drawn_locally_and_uploaded(s3_endpoint, tmp_path):  # noqa: F811
    folder = f"s3://{BUCKET}/board/sweeps/s1"
    with leaderboard_folder(folder) as out:
        assert out.local.is_dir() and not str(out.local).startswith("s3:")
        csv = out.local / "leaderboard.csv"
        csv.write_text("rank,trial\n1,t1\n")
        (out.local / "plots").mkdir()
        png = out.local / "plots" / "learning_curves.png"
        png.write_bytes(b"\x89PNG")
    assert not out.local.exists()  # the temp folder is gone
    assert sorted(objects(s3_endpoint, "board/")) == [
        "board/sweeps/s1/leaderboard/leaderboard.csv",
        "board/sweeps/s1/leaderboard/plots/learning_curves.png",
    ]
    assert out.published([png]) == [f"{folder}/leaderboard/plots/learning_curves.png"]
    body = s3_endpoint.get_object(Bucket=BUCKET, Key="board/sweeps/s1/leaderboard/leaderboard.csv")["Body"].read()
    assert body == b"rank,trial\n1,t1\n"
    with pytest.raises(RuntimeError), leaderboard_folder(f"s3://{BUCKET}/failed/sweeps/s1") as out:
        (out.local / "leaderboard.csv").write_text("half")
        raise RuntimeError("the plots failed")
    assert objects(s3_endpoint, "failed/") == []  # nothing half-published
    with leaderboard_folder(tmp_path / "sweeps" / "s1") as local:  # a local sweep writes in place
        assert local.local == tmp_path / "sweeps" / "s1" / "leaderboard"


def test_a_sweep_into_a_missing_bucket_stops_before_ray_starts(tmp_path, s3_endpoint):  # noqa: F811
    import ray

    from orchestrator.search_space import load_space
    from orchestrator.sweep import run_sweep

    ray.shutdown()
    base = sweep_base(tmp_path, epochs=1)
    base["train"]["output_dir"] = "s3://no-such-bucket/runs"
    space = load_space(space_doc(tmp_path, "nobucket", {"train.lr": {"grid": [1e-3, 4e-3]}}, base=base))
    with pytest.raises(UserError, match="'no-such-bucket' not found") as info:
        run_sweep(space, trial_fn=fake_trial, progress=False)
    assert info.value.field == "train.output_dir"
    with pytest.raises(UserError, match="nothing to resume: no sweep at s3://no-such-bucket/runs/sweeps/nobucket"):
        run_sweep(space, resume=True, trial_fn=fake_trial, progress=False)
    assert not ray.is_initialized() and runs_of(tmp_path) == ([], [])


# ----------------------------------------------------------------------------------- a sweep, slow
@pytest.mark.ray
@pytest.mark.slow  # Ray started in-process, two trials, then the resume (~60 s on the 2-core box)
def test_grid_sweep_keeps_its_folder_in_s3_and_resumes_from_it(tmp_path, s3_endpoint, fakes_by_value):  # noqa: F811
    """A 2-trial grid sweep (the trial stand-in reports 2 epochs with a checkpoint each) with ``train.output_dir:
    s3://itr-runs/runs``: it finishes, the bucket holds the state file (naming the MLflow parent run), Tune's
    experiment state, the trials' checkpoints and the leaderboard; nothing lands on local disk. A rerun with
    ``resume=True`` (``itr sweep --resume``) restores it from the bucket: same parent run, no trial run again
    (the trials' results and MLflow histories unchanged)."""
    import ray

    from orchestrator.search_space import load_space
    from orchestrator.sweep import run_sweep

    ray.shutdown()  # the trials must see the AWS_* variables the moto fixture set
    base = sweep_base(tmp_path, epochs=2)
    base["train"]["output_dir"] = f"s3://{BUCKET}/runs"
    space = load_space(
        space_doc(
            tmp_path,
            "s3grid",
            {"train.lr": {"grid": [1e-3, 4e-3]}},
            base=base,
            max_concurrent_trials=2,
            resources={"cpu": 0.5},
        )
    )
    try:
        result = run_sweep(space, trial_fn=fake_trial, progress=False, plots=True)
        folder = f"s3://{BUCKET}/runs/sweeps/s3grid"
        assert result.path == folder and not result.resumed
        keys = objects(s3_endpoint, "runs/sweeps/s3grid/")
        prefix = "runs/sweeps/s3grid/"
        assert f"{prefix}itr_sweep.json" in keys and any(k.startswith(f"{prefix}experiment_state") for k in keys)
        assert f"{prefix}leaderboard/leaderboard.csv" in keys, keys
        assert f"{prefix}leaderboard/plots/learning_curves.png" in keys, keys
        assert sum(k.endswith("/epoch.txt") for k in keys) >= 2, keys  # the trials' checkpoints
        assert all(str(p).startswith(f"{folder}/leaderboard/plots/") for p in result.plots) and result.plots
        assert read_state(folder)["parent_run_id"] == result.parent_run_id
        assert not (tmp_path / "runs").exists() and not (tmp_path / "s3:").exists()

        parents, children = runs_of(tmp_path)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
        assert parents[0].data.tags["itr.sweep_dir"] == folder
        from tests.test_sweep import mlflow_client

        client = mlflow_client(tmp_path)
        histories = {
            c.info.run_id: [(m.step, m.timestamp) for m in client.get_metric_history(c.info.run_id, "epoch")]
            for c in children
        }
        assert sorted(len(h) for h in histories.values()) == [2, 2]
        results = {
            k: s3_endpoint.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys if k.endswith("/result.json")
        }
        assert len(results) == 2, keys

        again = run_sweep(space, resume=True, trial_fn=fake_trial, progress=False, plots=False)
    finally:
        ray.shutdown()
    assert again.resumed and again.parent_run_id == result.parent_run_id
    assert sorted(r["trial"] for r in again.table) == sorted(r["trial"] for r in result.table)
    parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    for c in children:  # no trial ran again: no epoch logged twice, none re-logged
        assert [(m.step, m.timestamp) for m in client.get_metric_history(c.info.run_id, "epoch")] == histories[
            c.info.run_id
        ]
    for key, body in results.items():
        assert s3_endpoint.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body, key
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
@pytest.mark.slow  # a 2-worker Train run inside a Tune trial (~90 s on the 2-core box)
def test_a_train_trial_keeps_its_run_in_s3_and_tune_sees_only_epochs(tmp_path, s3_endpoint):  # noqa: F811
    """One trial with ``scaling.num_workers: 2`` (a TorchTrainer under ``<sweep>/train``, in the bucket) and
    ``train.checkpoint_every_steps: 2`` (5 steps per epoch: step reports at steps 2 and 4 of epoch 0, 1 and 3 of
    epoch 1). Tune gets the two epochs only (``training_iteration`` 1, 2: a forwarded step report would be a third
    and fourth), MLflow's child run epochs 0 and 1 once each, and the Train run's checkpoints are objects under
    ``sweeps/<name>/train/train-<trial id>/`` with no step checkpoint (``rank_0001.pt``) left at the end."""
    import ray

    from orchestrator.search_space import load_space
    from orchestrator.sweep import run_sweep
    from tests.test_sweep import epoch_steps

    ray.shutdown()
    base = sweep_base(tmp_path, epochs=2, checkpoint_every_steps=2)
    base["train"]["output_dir"] = f"s3://{BUCKET}/trainsweep"
    base["scaling"].update(num_workers=2)  # 320 images / (32 x 2 ranks) = 5 steps per epoch
    space = load_space(space_doc(tmp_path, "train2", {"train.lr": {"grid": [1e-3]}}, base=base, resources={"cpu": 0.5}))
    try:
        result = run_sweep(space, progress=False, plots=False)
    finally:
        ray.shutdown()
    _, children = runs_of(tmp_path)
    assert len(children) == 1 and children[0].info.status == "FINISHED", children[0].data.tags.get("itr.failure")
    assert epoch_steps(tmp_path, children[0].info.run_id) == [0, 1]
    trial_id = children[0].data.tags["itr.trial_id"]
    keys = objects(s3_endpoint, "trainsweep/sweeps/train2/")
    result_json = [k for k in keys if k.endswith(f"trial_{trial_id}/result.json")]
    assert len(result_json) == 1, keys
    lines = s3_endpoint.get_object(Bucket=BUCKET, Key=result_json[0])["Body"].read().decode().splitlines()
    assert [json.loads(line)["training_iteration"] for line in lines if line.strip()] == [1, 2]
    run_keys = [k for k in keys if k.startswith(f"trainsweep/sweeps/train2/train/train-{trial_id}/")]
    assert any(k.endswith("/model.pt") for k in run_keys), keys
    assert not any(k.endswith("/rank_0001.pt") for k in run_keys), run_keys
    assert result.table and result.table[0]["trial"]
