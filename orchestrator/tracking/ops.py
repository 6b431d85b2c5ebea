"""The one write path to an MLflow run: every write is an *op*, a plain JSON-able dict made by one of the
constructors below and performed by :func:`send_op`.

The constructors prepare a write once, for every path it may take: values coerced and cut to MLflow's limits,
``checkpoint/*`` metrics (internal) left out, secret-looking keys redacted, a failure reason kept as the
``itr.failure`` tag. :func:`send_op` batches (MLflow's ``log_batch`` limits) and performs it. Ops go to the store
either queued by :class:`~orchestrator.tracking.sender.RunLogger` (retried through outages, spilled to a file when
the store stays away) or at once by :func:`send` and the synchronous functions built on it (``log_params``,
``log_metrics``, ``set_tags``, ``log_text_artifact``, ``log_artifacts``, ``end_run``, ``reopen_run``), which raise
the store's error to the caller.

Every kind is idempotent when repeated: metrics carry their original timestamp (the store drops an identical row),
params and tags are rewritten with the same value, artifacts overwrite themselves, end and reopen set a status.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.tracking.redaction import is_secret_key, redact, redact_text
from orchestrator.tracking.target import TrackingTarget, client

#: One queued or sent write: ``{"op": <kind>, ...}`` (kinds: metrics, params, tag, text, artifact, end, reopen).
Op = dict[str, Any]

#: MLflow's limit on a param value.
MAX_PARAM_CHARS = 6000
#: How much of a failure reason the ``itr.failure`` tag keeps.
MAX_REASON_CHARS = 5000
#: Per ``log_batch`` call (MLflow takes at most 1000 metrics and 100 params).
METRICS_PER_BATCH, PARAMS_PER_BATCH = 500, 100
#: The tag holding why a run ended FAILED or KILLED.
FAILURE_TAG = "itr.failure"
#: MLflow error codes that a retry cannot fix (the store rejected the call).
PERMANENT_ERROR_CODES = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "MALFORMED_REQUEST",
        "INVALID_STATE",
        "INVALID_STATE_TRANSITION",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ENDPOINT_NOT_FOUND",
        "FEATURE_DISABLED",
    }
)


# ------------------------------------------------------------------------------------------ the ops
def is_internal_metric(key: str) -> bool:
    """``checkpoint/*`` keys steer Ray's checkpoint bookkeeping; they are never logged."""
    return key.startswith("checkpoint/")


def metrics_op(metrics: dict[str, Any], step: int, timestamp_ms: int | None = None) -> Op:
    """One step's numeric metrics (``checkpoint/*`` left out), stamped now unless ``timestamp_ms`` is given."""
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not is_internal_metric(k)}
    return {
        "op": "metrics",
        "step": int(step),
        "metrics": values,
        "timestamp": int(timestamp_ms if timestamp_ms is not None else time.time() * 1000),
    }


def params_op(params: dict[str, Any]) -> Op:
    """Params as strings of at most :data:`MAX_PARAM_CHARS`, secret-looking keys redacted."""
    return {"op": "params", "params": redact({k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()})}


def tag_op(key: str, value: Any) -> Op:
    """One tag (``***`` for a secret-looking key)."""
    return {"op": "tag", "key": key, "value": "***" if is_secret_key(key) else str(value)}


def text_op(name: str, text: str, artifact_path: str | None = None) -> Op:
    """A text artifact ``name`` (YAML/JSON redacted: :func:`~orchestrator.tracking.redaction.redact_text`)."""
    return {"op": "text", "name": name, "text": redact_text(name, text), "artifact_path": artifact_path}


def artifact_op(path: Path | str, artifact_path: str | None = None, *, staged: bool = False) -> Op:
    """A file to upload; ``staged``: a copy the sender deletes once it went through."""
    return {"op": "artifact", "path": str(path), "artifact_path": artifact_path, "staged": staged}


def end_op(status: str = "FINISHED", reason: str | None = None) -> Op:
    """The run's end (FINISHED, FAILED or KILLED), ``reason`` kept as the ``itr.failure`` tag."""
    return {"op": "end", "status": status, "reason": reason[:MAX_REASON_CHARS] if reason else None}


def reopen_op() -> Op:
    """A terminated run RUNNING again, its ``itr.failure`` tag removed (a resumed run continues in it)."""
    return {"op": "reopen"}


def send_op(c, run_id: str, op: Op) -> None:
    """Perform one op on client ``c`` (batched to MLflow's limits)."""
    from mlflow.entities import Metric, Param

    kind = op["op"]
    if kind == "metrics":
        step, stamp = int(op["step"]), int(op["timestamp"])
        metrics = [Metric(k, float(v), stamp, step) for k, v in op["metrics"].items()]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            c.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
    elif kind == "params":
        params = [Param(k, v) for k, v in op["params"].items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            c.log_batch(run_id, params=params[start : start + PARAMS_PER_BATCH])
    elif kind == "tag":
        c.set_tag(run_id, op["key"], op["value"])
    elif kind == "text":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / op["name"]
            path.write_text(op["text"], encoding="utf-8")
            c.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "artifact":
        c.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "end":
        if op.get("reason"):
            c.set_tag(run_id, FAILURE_TAG, op["reason"])
        c.set_terminated(run_id, status=op["status"])
    elif kind == "reopen":
        c.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in c.get_run(run_id).data.tags:
            c.delete_tag(run_id, FAILURE_TAG)
    else:
        raise ValueError(f"unknown tracking op {kind!r}")


def is_permanent_error(err: BaseException) -> bool:
    """Whether retrying ``err`` is pointless (the store rejected the call); connection errors are not."""
    return getattr(err, "error_code", None) in PERMANENT_ERROR_CODES


def describe_ops(ops: list[Op]) -> str:
    """A short summary of ops: ``3 metric batch(es) (steps 4-6), 2 tag(s), 1 artifact(s), end status FINISHED``."""
    steps = sorted(int(o["step"]) for o in ops if o["op"] == "metrics")
    parts = []
    if steps:
        parts.append(f"{len(steps)} metric batch(es) (steps {steps[0]}-{steps[-1]})")
    for kind, label in (("params", "param batch(es)"), ("tag", "tag(s)")):
        n = sum(o["op"] == kind for o in ops)
        if n:
            parts.append(f"{n} {label}")
    n = sum(o["op"] in ("text", "artifact") for o in ops)
    if n:
        parts.append(f"{n} artifact(s)")
    ends = [o for o in ops if o["op"] == "end"]
    if ends:
        parts.append(f"end status {ends[-1]['status']}")
    return ", ".join(parts) or "nothing"


def final_metrics_json(metrics: dict[str, Any]) -> str:
    """The ``final_metrics.json`` artifact of a run (internal ``checkpoint/*`` keys left out)."""
    return json.dumps({k: v for k, v in metrics.items() if not is_internal_metric(k)}, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------- synchronous writes
def send(target: TrackingTarget, run_id: str, *ops: Op) -> None:
    """Perform ``ops`` on the run now, in order, through one client; the store's first error is raised."""
    c = client(target)
    for op in ops:
        send_op(c, run_id, op)


def log_params(target: TrackingTarget, run_id: str, params: dict[str, Any]) -> None:
    send(target, run_id, params_op(params))


def log_metrics(target: TrackingTarget, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One batch of numeric metrics at ``step`` (keys under ``checkpoint/`` are internal and skipped)."""
    send(target, run_id, metrics_op(metrics, step))


def set_tags(target: TrackingTarget, run_id: str, tags: dict[str, Any]) -> None:
    send(target, run_id, *(tag_op(k, v) for k, v in tags.items()))


def log_text_artifact(
    target: TrackingTarget, run_id: str, name: str, text: str, artifact_path: str | None = None
) -> None:
    send(target, run_id, text_op(name, text, artifact_path))


def log_artifacts(
    target: TrackingTarget, run_id: str, paths: Iterable[Path | str], artifact_path: str | None = None
) -> None:
    send(target, run_id, *(artifact_op(p, artifact_path) for p in paths))


def end_run(target: TrackingTarget, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """Terminate the run (FINISHED, FAILED or KILLED), recording ``reason`` as the ``itr.failure`` tag."""
    send(target, run_id, end_op(status, reason))


def reopen_run(target: TrackingTarget, run_id: str) -> None:
    """Mark a terminated run RUNNING again (a resumed trial or sweep continues in its old run)."""
    send(target, run_id, reopen_op())
