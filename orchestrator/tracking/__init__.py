"""MLflow at the edge: where the store is, one run per experiment, and one write path for everything logged.

- :mod:`~orchestrator.tracking.target`: the store and its artifact folder (``resolve_target``), the client;
- :mod:`~orchestrator.tracking.redaction`: secret-looking keys never reach the store;
- :mod:`~orchestrator.tracking.provenance`: the provenance tags of a run (``run_tags``);
- :mod:`~orchestrator.tracking.ops`: every write to a run as an op, performed by ``send_op``: at once
  (``log_params``, ``log_metrics``, ``set_tags``, ``log_text_artifact``, ``log_artifacts``, ``end_run``,
  ``reopen_run``: the store's error is raised) or queued;
- :mod:`~orchestrator.tracking.sender`: ``RunLogger``, the queue that rides out tracking-server outages (retry
  with backoff, a local copy, ``replay_unsent``);
- :mod:`~orchestrator.tracking.runs`: starting runs and finding them again (``start_run``, ``child_runs``,
  ``find_keyed_run``, ...).

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``; ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` point it at a server instead.
"""

from __future__ import annotations

from orchestrator.tracking.ops import (
    MAX_PARAM_CHARS,
    PERMANENT_ERROR_CODES,
    Op,
    artifact_op,
    describe_ops,
    end_op,
    end_run,
    final_metrics_json,
    is_permanent_error,
    log_artifacts,
    log_metrics,
    log_params,
    log_text_artifact,
    metrics_op,
    params_op,
    reopen_op,
    reopen_run,
    send,
    send_op,
    set_tags,
    tag_op,
    text_op,
)
from orchestrator.tracking.provenance import git_commit, run_tags
from orchestrator.tracking.redaction import SECRET_MARKERS, is_secret_key, redact, redact_text, redact_tree
from orchestrator.tracking.runs import (
    child_runs,
    create_run,
    download_artifact,
    find_keyed_run,
    find_runs,
    latest_metrics,
    metric_history,
    run_exists,
    start_run,
)
from orchestrator.tracking.sender import (
    DEFAULT_FLUSH_TIMEOUT_S,
    UNSENT_PREFIX,
    RunLogger,
    flush_timeout_s,
    replay_unsent,
)
from orchestrator.tracking.target import TrackingTarget, client, ensure_experiment, resolve_target

__all__ = [
    "DEFAULT_FLUSH_TIMEOUT_S",
    "MAX_PARAM_CHARS",
    "PERMANENT_ERROR_CODES",
    "SECRET_MARKERS",
    "UNSENT_PREFIX",
    "Op",
    "RunLogger",
    "TrackingTarget",
    "artifact_op",
    "child_runs",
    "client",
    "create_run",
    "download_artifact",
    "describe_ops",
    "end_op",
    "end_run",
    "metrics_op",
    "params_op",
    "reopen_op",
    "tag_op",
    "text_op",
    "ensure_experiment",
    "final_metrics_json",
    "find_keyed_run",
    "find_runs",
    "flush_timeout_s",
    "git_commit",
    "is_permanent_error",
    "is_secret_key",
    "latest_metrics",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "log_text_artifact",
    "metric_history",
    "redact",
    "redact_text",
    "redact_tree",
    "reopen_run",
    "replay_unsent",
    "resolve_target",
    "run_exists",
    "run_tags",
    "send",
    "send_op",
    "set_tags",
    "start_run",
]
