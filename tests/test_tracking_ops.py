"""The one write path to MLflow (``orchestrator.tracking.ops``): a run written synchronously and the same calls
queued on a ``RunLogger`` end up identical in the store; limits, redaction and failure tagging are applied once
(checked against values written out here by hand); batches beyond MLflow's per-call limits; reopen; the look-ups
that sweep, reproduce and the leaderboard use instead of the raw client; provenance looked up once per process.
"""

from __future__ import annotations

import json

import pytest

from orchestrator import tracking
from orchestrator.tracking import provenance


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds): (target, raw client for the checks)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    target = tracking.TrackingTarget(
        uri=f"sqlite:///{root / 'store.db'}", artifact_root=(root / "artifacts").as_uri(), experiment="ops"
    )
    tracking.ensure_experiment(target)
    return target, MlflowClient(tracking_uri=target.uri)


def _new_run(store, name: str, **tags) -> str:
    target, _ = store
    return tracking.create_run(target, name, {k.replace("__", "."): v for k, v in tags.items()}, {})


LONG = "x" * 7000
REASON = "RuntimeError: " + "y" * 6000


def _write_everything(write) -> None:
    """The same calls, through either path (``write`` takes ops)."""
    write(tracking.params_op({"train.lr": 0.001, "tracking.tags.api_token": "s3cr3t", "model.note": LONG}))
    write(
        tracking.metrics_op(
            {"val/rsum": 12.5, "epoch": 0, "checkpoint/score": 9.0, "note": "text"}, 0, timestamp_ms=1_000
        )
    )
    write(tracking.metrics_op({"val/rsum": 20.0, "epoch": 1}, 1, timestamp_ms=2_000))
    write(tracking.tag_op("itr.run_dir", "/somewhere"))
    write(tracking.tag_op("db_password", "hunter2"))
    write(tracking.text_op("config.yaml", "tracking:\n  tags:\n    api_token: s3cr3t\n    team: ir\n"))
    write(tracking.end_op("FAILED", REASON))


def _stored(store, run_id: str) -> dict:
    _, c = store
    run = c.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    history = {k: [(m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, k)] for k in run.data.metrics}
    artifact = c.download_artifacts(run_id, "config.yaml")
    return {
        "status": run.info.status,
        "params": run.data.params,
        "tags": tags,
        "history": history,
        "config.yaml": open(artifact, encoding="utf-8").read(),
    }


def test_the_synchronous_path_and_the_queue_write_the_same_run(store):
    target, _ = store
    sync_id, queued_id = _new_run(store, "sync"), _new_run(store, "queued")
    _write_everything(lambda op: tracking.send(target, sync_id, op))
    logger = tracking.RunLogger(target, queued_id)
    _write_everything(logger._put)
    assert logger.close(timeout_s=60) is True and not logger.dropped
    sync, queued = _stored(store, sync_id), _stored(store, queued_id)
    assert sync == queued
    # what the one path made of the calls, written out by hand
    assert sync["status"] == "FAILED"
    assert sync["params"] == {"train.lr": "0.001", "tracking.tags.api_token": "***", "model.note": "x" * 6000}
    assert sync["history"] == {
        "val/rsum": [(0, 12.5, 1_000), (1, 20.0, 2_000)],
        "epoch": [(0, 0.0, 1_000), (1, 1.0, 2_000)],
    }
    assert sync["tags"] == {"itr.run_dir": "/somewhere", "db_password": "***", "itr.failure": REASON[:5000]}
    assert "s3cr3t" not in sync["config.yaml"] and "team: ir" in sync["config.yaml"]


def test_the_logger_methods_queue_the_constructors_ops():
    logger = tracking.RunLogger(tracking.TrackingTarget("sqlite:///unused.db", None, "x"), "r" * 32)
    queued: list[dict] = []
    logger._put = queued.append  # type: ignore[method-assign] - collect the ops instead of sending them
    logger.log_params({"a_secret": 1})
    logger.set_tag("k", 3)
    logger.log_text("n.json", '{"password": "p"}')
    logger.end_run("KILLED", "stopped")
    logger.log_metrics({"m/x": 1, "checkpoint/y": 2}, 4, timestamp_ms=7)
    assert queued == [
        {"op": "params", "params": {"a_secret": "***"}},
        {"op": "tag", "key": "k", "value": "3"},
        {"op": "text", "name": "n.json", "text": json.dumps({"password": "***"}, indent=2), "artifact_path": None},
        {"op": "end", "status": "KILLED", "reason": "stopped"},
        {"op": "metrics", "step": 4, "metrics": {"m/x": 1.0}, "timestamp": 7},
    ]


def test_batches_beyond_mlflows_per_call_limits_all_land(store):
    target, c = store
    run_id = _new_run(store, "wide")
    tracking.log_params(target, run_id, {f"p.{i:03d}": i for i in range(250)})  # 100 per call at most
    tracking.log_metrics(target, run_id, {f"m/{i:04d}": float(i) for i in range(1200)}, 3)  # 1000 per call
    run = c.get_run(run_id)
    assert len(run.data.params) == 250 and run.data.params["p.249"] == "249"
    assert len(run.data.metrics) == 1200 and run.data.metrics["m/1199"] == 1199.0
    assert tracking.metric_history(target, run_id, "m/0007") == [(3, 7.0)]
    assert tracking.latest_metrics(target, run_id)["m/0042"] == 42.0


def test_reopen_makes_an_ended_run_running_without_its_failure(store):
    target, c = store
    run_id = _new_run(store, "reopened")
    tracking.end_run(target, run_id, "KILLED", reason="interrupted")
    assert c.get_run(run_id).data.tags["itr.failure"] == "interrupted"
    tracking.reopen_run(target, run_id)
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING" and "itr.failure" not in run.data.tags
    tracking.reopen_run(target, run_id)  # again: nothing to remove, still RUNNING
    assert c.get_run(run_id).info.status == "RUNNING"


def test_look_ups_find_children_and_the_newest_tagged_runs(store):
    target, c = store
    parent = _new_run(store, "parent")
    kids = [
        tracking.create_run(target, f"kid{i}", {"mlflow.parentRunId": parent, "itr.trial_id": f"t{i % 2}"}, {})
        for i in range(3)
    ]
    assert sorted(r.info.run_id for r in tracking.child_runs(target, parent)) == sorted(kids)
    assert sorted(r.info.run_id for r in tracking.child_runs(target, parent, {"itr.trial_id": "t0"})) == sorted(
        [kids[0], kids[2]]
    )
    tagged = [_new_run(store, f"tagged{i}", repro__recipe="r", repro__status="pass") for i in range(3)]
    newest = [r.info.run_id for r in tracking.find_runs(target, {"repro.recipe": "r", "repro.status": "pass"})]
    starts = {rid: c.get_run(rid).info.start_time for rid in tagged}
    assert sorted(newest) == sorted(tagged)
    assert [starts[r] for r in newest] == sorted(starts.values(), reverse=True)
    assert len(tracking.find_runs(target, {"repro.recipe": "r"}, max_results=1)) == 1
    assert tracking.find_runs(tracking.TrackingTarget(target.uri, None, "no-such-experiment"), {"a": "b"}) == []
    assert tracking.run_exists(target, parent) and not tracking.run_exists(target, "0" * 32)


def test_replay_sends_a_spilled_file_through_the_same_ops(store, tmp_path):
    target, c = store
    run_id = _new_run(store, "replayed")
    doc = {
        "run_id": run_id,
        "tracking_uri": target.uri,
        "experiment": "ops",
        "ops": [tracking.metrics_op({"val/rsum": 5.0}, 2, timestamp_ms=5), tracking.end_op("FINISHED")],
    }
    path = tmp_path / f"{tracking.UNSENT_PREFIX}{run_id}-1.json"
    path.write_text(json.dumps(doc))
    assert tracking.replay_unsent(path) == 2 and not path.exists()
    assert c.get_run(run_id).info.status == "FINISHED"
    assert tracking.metric_history(target, run_id, "val/rsum") == [(2, 5.0)]


def test_provenance_is_looked_up_once_per_process(monkeypatch):
    from orchestrator.config import validate_config

    calls = []
    monkeypatch.setattr(provenance, "git_commit", lambda: calls.append(1) or "abc123")
    provenance._host_tags.cache_clear()
    try:
        first = provenance.run_tags(validate_config({"loss": {"family": "infonce"}}))
        second = provenance.run_tags(
            validate_config({"loss": {"family": "triplet"}, "tracking": {"tags": {"team": "ir", "my_token": "t"}}})
        )
    finally:
        provenance._host_tags.cache_clear()
    assert calls == [1]
    assert first["mlflow.source.git.commit"] == second["mlflow.source.git.commit"] == "abc123"
    assert first["itr.loss_family"] == "infonce" and second["itr.loss_family"] == "triplet"
    assert second["team"] == "ir" and second["my_token"] == "***" and "team" not in first
    second["itr.python"] = "changed"
    assert provenance.host_tags()["itr.python"] != "changed"  # callers get a copy
