"""MLflow at the edge: where the store is, one run per experiment, batched metric logging, run status,
and a buffered ``RunLogger`` that rides out tracking-server outages (queue, retry with backoff, local copy).

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts`` (absolute paths, so a
Ray worker whose cwd is elsewhere still writes to the same place). ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` point it at a server instead. Experiments are created on the driver.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from orchestrator.config import ExperimentConfig, TrackingConfig

log = logging.getLogger(__name__)

#: MLflow's limit on a param value.
MAX_PARAM_CHARS = 6000
#: Keys whose values look like secrets are never logged.
SECRET_MARKERS = ("password", "secret", "token", "api_key", "apikey", "access_key", "credential", "private_key")


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: ``uri`` (tracking store) and ``artifact_root`` (file URI, used for new experiments)."""

    uri: str
    artifact_root: str | None
    experiment: str


def resolve_target(cfg: TrackingConfig, base_dir: Path | None = None) -> TrackingTarget:
    """The tracking store (``tracking.uri``, else $MLFLOW_TRACKING_URI, else ``<base_dir>/mlflow.db``; base_dir
    defaults to the cwd) and, for a local store, its artifact folder: ``tracking.artifact_dir``, else
    ``mlartifacts`` beside the SQLite file (beside ``base_dir`` for ``file:`` stores), so a store's artifacts
    never land in whatever folder a command happened to run from."""
    base = Path(base_dir or Path.cwd()).resolve()
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_root = None
    if not uri:
        uri = f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        if cfg.artifact_dir:
            artifacts = Path(cfg.artifact_dir).expanduser()
        else:
            db = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
            artifacts = ((base / db).parent if db and db != ":memory:" else base) / "mlartifacts"
        artifact_root = (artifacts if artifacts.is_absolute() else base / artifacts).resolve().as_uri()
    return TrackingTarget(uri=uri, artifact_root=artifact_root, experiment=cfg.experiment)


def is_secret_key(key: str) -> bool:
    low = key.lower()
    return any(marker in low for marker in SECRET_MARKERS)


def redact(params: dict[str, str]) -> dict[str, str]:
    """``params`` with the values of secret-looking keys replaced by ``***``."""
    return {k: ("***" if is_secret_key(k) else v) for k, v in params.items()}


def redact_tree(tree: Any) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys (at any depth) replaced by ``***``."""
    if isinstance(tree, dict):
        return {k: ("***" if isinstance(k, str) and is_secret_key(k) else redact_tree(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return tree


def redact_text(name: str, text: str) -> str:
    """A YAML/JSON text artifact (``*.yaml``, ``*.yml``, ``*.json``) with secret-looking keys redacted; other
    names, and text that does not parse, unchanged unless a secret key would survive (then it is dropped)."""
    if not name.lower().endswith((".yaml", ".yml", ".json")):
        return text
    import yaml

    from orchestrator.errors import UserError
    from orchestrator.yaml_io import parse_yaml

    try:
        tree = parse_yaml(text, name).tree  # JSON is YAML; a duplicate key or an alias bomb counts as unparsable
    except UserError:
        return "# redacted: unparsable text with secret-looking keys\n" if any(
            m in text.lower() for m in SECRET_MARKERS) else text
    if redact_tree(tree) == tree:
        return text
    if name.lower().endswith(".json"):
        return json.dumps(redact_tree(tree), indent=2)
    return yaml.safe_dump(redact_tree(tree), sort_keys=False)


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Provenance tags: git commit, package versions, config hash, host device."""
    tags = {"itr.config_hash": cfg.config_hash(), "itr.loss_family": cfg.loss.family,
            "itr.model": cfg.model.name, "itr.python": platform.python_version()}
    for pkg in ("torch", "open_clip_torch", "ray", "mlflow", "pydantic"):
        try:
            tags[f"itr.version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        import torch

        tags["itr.device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    except Exception:  # pragma: no cover - device query is best effort
        pass
    tags.update(redact(cfg.tracking.tags))
    return tags


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def client(target: TrackingTarget):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=target.uri)


def ensure_experiment(target: TrackingTarget) -> str:
    """The id of ``target.experiment``, created (with the absolute artifact root) when missing."""
    c = client(target)
    exp = c.get_experiment_by_name(target.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(target.experiment, artifact_location=target.artifact_root)
    except Exception:
        exp = c.get_experiment_by_name(target.experiment)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


def start_run(target: TrackingTarget, cfg: ExperimentConfig, *, run_name: str, parent_run_id: str | None = None,
              extra_tags: dict[str, str] | None = None) -> str:
    """Create a RUNNING run with the config's params and provenance tags; returns its id."""
    c = client(target)
    exp_id = ensure_experiment(target)
    tags = run_tags(cfg)
    tags["mlflow.runName"] = run_name
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    log_params(target, run.info.run_id, cfg.flat_params())
    return run.info.run_id


def log_params(target: TrackingTarget, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in redact(params).items()]
    c = client(target)
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_metrics(target: TrackingTarget, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One batch of finite numeric metrics at ``step`` (keys under ``checkpoint/`` are internal and skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if not k.startswith("checkpoint/") and isinstance(v, (int, float))]
    c = client(target)
    for start in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[start : start + 500])


# ------------------------------------------------------------------------ buffered logging (outages)
#: How long the end of a run waits for the tracking store to take what is still queued; env
#: ``ITR_MLFLOW_FLUSH_TIMEOUT_S`` overrides it. Whatever is still unsent then is written to a local file.
DEFAULT_FLUSH_TIMEOUT_S = 300.0
#: MLflow error codes that a retry cannot fix (the call is dropped with a warning instead of retried).
PERMANENT_ERROR_CODES = frozenset({
    "BAD_REQUEST", "INVALID_PARAMETER_VALUE", "MALFORMED_REQUEST", "INVALID_STATE", "INVALID_STATE_TRANSITION",
    "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED",
})
UNSENT_PREFIX = "mlflow-unsent-"


def flush_timeout_s() -> float:
    """``ITR_MLFLOW_FLUSH_TIMEOUT_S`` (seconds) or :data:`DEFAULT_FLUSH_TIMEOUT_S`."""
    try:
        return max(0.0, float(os.environ.get("ITR_MLFLOW_FLUSH_TIMEOUT_S", DEFAULT_FLUSH_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_FLUSH_TIMEOUT_S


def is_permanent_error(err: BaseException) -> bool:
    """Whether retrying ``err`` is pointless (the store rejected the call); connection errors are not."""
    return getattr(err, "error_code", None) in PERMANENT_ERROR_CODES


def _metric_items(metrics: dict[str, Any], step: int, timestamp_ms: int) -> list:
    from mlflow.entities import Metric

    return [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()
            if not k.startswith("checkpoint/") and isinstance(v, (int, float))]


def send_op(c, run_id: str, op: dict[str, Any]) -> None:
    """Perform one queued call (``op["op"]``: metrics, params, tag, text, artifact, end) on client ``c``.

    Every kind is idempotent when repeated: metrics carry their original timestamp (the store drops an identical
    row), params and tags are rewritten with the same value, artifacts overwrite themselves."""
    from mlflow.entities import Param

    kind = op["op"]
    if kind == "metrics":
        items = _metric_items(op["metrics"], int(op["step"]), int(op["timestamp"]))
        for start in range(0, len(items), 500):
            c.log_batch(run_id, metrics=items[start : start + 500])
    elif kind == "params":
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in redact(op["params"]).items()]
        for start in range(0, len(items), 100):
            c.log_batch(run_id, params=items[start : start + 100])
    elif kind == "tag":
        c.set_tag(run_id, op["key"], "***" if is_secret_key(op["key"]) else op["value"])
    elif kind == "text":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / op["name"]
            path.write_text(redact_text(op["name"], op["text"]), encoding="utf-8")
            c.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "artifact":
        c.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "end":
        if op.get("reason"):
            c.set_tag(run_id, "itr.failure", op["reason"][:5000])
        c.set_terminated(run_id, status=op["status"])
    else:
        raise ValueError(f"unknown tracking op {kind!r}")


def describe_ops(ops: list[dict[str, Any]]) -> str:
    """A short summary of queued calls: ``3 metric batches (steps 4-6), 2 tags, 1 artifact, end status FINISHED``."""
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


class RunLogger:
    """Everything logged to one MLflow run during training, never blocking it and never lost.

    Calls (``log_metrics``, ``log_params``, ``set_tag``, ``log_text``, ``log_artifacts``, ``end_run``) are queued
    and sent in order by one background thread. When the store is unreachable (server down, network, locked
    database) the call stays at the head of the queue and is retried with exponential backoff (``backoff_s``
    doubling up to ``max_backoff_s``) -- inside each attempt MLflow's own HTTP retries run too
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with backoff factor 2: about 4 minutes). A call the store
    rejects (a 4xx such as an invalid value) is dropped with a warning. ``close`` waits at most ``timeout_s`` for
    the queue to drain, then writes what is left to ``<spill_dir>/mlflow-unsent-<run id>.json`` (replayable with
    :func:`replay_unsent`) and warns naming the file.

    Callable as a metric sink: ``logger(metrics, step)``. Picklable (the queue and thread are not carried).
    """

    def __init__(self, target: TrackingTarget, run_id: str, *, spill_dir: Path | None = None,
                 backoff_s: float = 0.5, max_backoff_s: float = 5.0) -> None:
        self.target = target
        self.run_id = run_id
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._setup()

    def _setup(self) -> None:
        import collections
        import threading

        self._ops: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._failing_since: float | None = None
        self.last_error: str | None = None
        self.dropped: list[dict[str, Any]] = []
        self.sent = 0
        self._staging: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("target", "run_id", "spill_dir", "backoff_s", "max_backoff_s")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # -- what callers queue
    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue one step's metrics (numeric values; ``checkpoint/*`` keys skipped), stamped now unless given."""
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not k.startswith("checkpoint/")}
        self._put({"op": "metrics", "step": int(step), "metrics": values,
                   "timestamp": int(timestamp_ms if timestamp_ms is not None else time.time() * 1000)})

    def log_params(self, params: dict[str, Any]) -> None:
        self._put({"op": "params", "params": redact({k: str(v) for k, v in params.items()})})

    def set_tag(self, key: str, value: str) -> None:
        self._put({"op": "tag", "key": key, "value": "***" if is_secret_key(key) else str(value)})

    def log_text(self, name: str, text: str, artifact_path: str | None = None) -> None:
        self._put({"op": "text", "name": name, "text": redact_text(name, text), "artifact_path": artifact_path})

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Queue files: each is copied now to a staging folder (the caller may delete its own at once)."""
        import shutil
        import tempfile

        for p in paths:
            if self._staging is None:
                base = self.spill_dir if self.spill_dir is not None else None
                if base is not None:
                    base.mkdir(parents=True, exist_ok=True)
                self._staging = Path(tempfile.mkdtemp(prefix=".mlflow-staging-", dir=base))
            dest = Path(tempfile.mkdtemp(dir=self._staging)) / Path(p).name
            shutil.copy2(p, dest)
            self._put({"op": "artifact", "path": str(dest), "artifact_path": artifact_path, "staged": True})

    def end_run(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Queue the run's end (FINISHED, FAILED or KILLED) with ``reason`` as the ``itr.failure`` tag."""
        self._put({"op": "end", "status": status, "reason": reason})

    def adopt(self, path: Path) -> int:
        """Queue the calls another process left unsent in ``path`` (a file :meth:`close` wrote), then delete it."""
        ops = json.loads(Path(path).read_text(encoding="utf-8"))["ops"]
        for op in ops:
            self._put(op)
        Path(path).unlink()
        return len(ops)

    # -- state
    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._ops)

    def flush(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for every queued call to be sent; True when the queue is empty."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._ops:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush for at most ``timeout_s`` (default :func:`flush_timeout_s`); write what is left to a local file.

        Returns True when everything reached the store. The logger stays usable (a later call queues again)."""
        ok = self.flush(flush_timeout_s() if timeout_s is None else timeout_s)
        if ok:
            return True
        with self._cond:
            left = list(self._ops)
            self._ops.clear()
        where = self._spill(left)
        log.warning("MLflow at %s did not take %s for run %s (last error: %s); a local copy is in %s "
                    "(orchestrator.tracking.replay_unsent replays it)", self.target.uri, describe_ops(left),
                    self.run_id, self.last_error, where)
        return False

    def _spill(self, ops: list[dict[str, Any]]) -> Path:
        import tempfile

        base = self.spill_dir if self.spill_dir is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"{UNSENT_PREFIX}{self.run_id}-{os.getpid()}.json"
        doc = {"run_id": self.run_id, "tracking_uri": self.target.uri, "experiment": self.target.experiment,
               "last_error": self.last_error, "ops": ops}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        tmp.replace(path)
        return path

    # -- the sender
    def _put(self, op: dict[str, Any]) -> None:
        import threading

        with self._cond:
            self._ops.append(op)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"mlflow-{self.run_id[:8]}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        c = client(self.target)
        delay = self.backoff_s
        while True:
            with self._cond:
                while not self._ops:
                    self._cond.wait()
                op = self._ops[0]
            try:
                send_op(c, self.run_id, op)
            except Exception as err:  # noqa: BLE001 - any failure of the store: retry or drop, never raise
                self.last_error = f"{err.__class__.__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                if is_permanent_error(err):
                    log.warning("MLflow rejected %s for run %s, dropped: %s", describe_ops([op]), self.run_id,
                                self.last_error)
                    self._done(op, dropped=True)
                    continue
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("MLflow at %s unreachable (%s); buffering and retrying", self.target.uri,
                                self.last_error)
                time.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)
                continue
            if self._failing_since is not None:
                log.warning("MLflow at %s reachable again after %.0f s; sending %d buffered call(s)", self.target.uri,
                            time.monotonic() - self._failing_since, self.pending)
                self._failing_since = None
            delay = self.backoff_s
            self._done(op)

    def _done(self, op: dict[str, Any], dropped: bool = False) -> None:
        with self._cond:
            if self._ops and self._ops[0] is op:
                self._ops.popleft()
            if dropped:
                self.dropped.append(op)
            else:
                self.sent += 1
            self._cond.notify_all()
        if op.get("staged") and not dropped:
            staged = Path(op["path"])
            with contextlib.suppress(OSError):
                staged.unlink()
                staged.parent.rmdir()
                staged.parent.parent.rmdir()  # the staging folder, once its last file went


#: The sessions' name for a metric sink that logs to one MLflow run.
MetricSink = RunLogger


def replay_unsent(path: Path, tracking_uri: str | None = None) -> int:
    """Send the calls a :class:`RunLogger` left in ``path`` (to ``tracking_uri`` or the one recorded there).

    Synchronous, in order; raises on the first failure (rerun it later). Deletes the file when all went through."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri or doc["tracking_uri"])
    for op in doc["ops"]:
        send_op(c, doc["run_id"], op)
    Path(path).unlink()
    return len(doc["ops"])


def log_text_artifact(target: TrackingTarget, run_id: str, name: str, text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(redact_text(name, text), encoding="utf-8")
        client(target).log_artifact(run_id, str(path))


def log_artifacts(target: TrackingTarget, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    c = client(target)
    for p in paths:
        c.log_artifact(run_id, str(p), artifact_path)


def end_run(target: TrackingTarget, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """Terminate the run (FINISHED, FAILED or KILLED), recording ``reason`` as the ``itr.failure`` tag."""
    c = client(target)
    if reason:
        c.set_tag(run_id, "itr.failure", reason[:5000])
    c.set_terminated(run_id, status=status)


def final_metrics_json(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if not k.startswith("checkpoint/")}, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------ nested runs (sweeps)
def child_runs(target: TrackingTarget, parent_run_id: str, tags: dict[str, str] | None = None) -> list:
    """The runs nested under ``parent_run_id`` (tag ``mlflow.parentRunId``), optionally with equal ``tags``."""
    c = client(target)
    exp_id = c.get_run(parent_run_id).info.experiment_id
    clauses = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"]
    for key, value in (tags or {}).items():
        clauses.append(f"tags.`{key}` = '{value}'")
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=" and ".join(clauses), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_keyed_run(target: TrackingTarget, run_key: str, run_dir: str) -> str | None:
    """The id of the run of ``target.experiment`` tagged ``itr.run_key = run_key`` and ``itr.run_dir = run_dir``
    (the earlier attempt of a resumed ``itr train``; the newest if several), or ``None``."""
    c = client(target)
    exp = c.get_experiment_by_name(target.experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`itr.run_key` = '{run_key}'",
                         order_by=["attributes.start_time DESC"], max_results=100)
    found = [r for r in runs if r.data.tags.get("itr.run_dir") == run_dir]
    return found[0].info.run_id if found else None


def reopen_run(target: TrackingTarget, run_id: str) -> None:
    """Mark a terminated run RUNNING again (a resumed trial or sweep continues in its old run)."""
    c = client(target)
    c.update_run(run_id, status="RUNNING")
    if "itr.failure" in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, "itr.failure")
