"""Run lifecycle and look-ups: start a run (:func:`create_run`, :func:`start_run`), find runs again
(:func:`child_runs`, :func:`find_runs`, :func:`find_keyed_run`) and read what they hold. Writes to a run that
exists go through :mod:`orchestrator.tracking.ops` (``end_run``, ``reopen_run``, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import ExperimentConfig
from orchestrator.tracking.ops import log_params
from orchestrator.tracking.provenance import run_tags
from orchestrator.tracking.target import TrackingTarget, client, ensure_experiment

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run


def create_run(target: TrackingTarget, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    """Create a RUNNING run named ``run_name`` in ``target.experiment`` with ``tags`` and ``params``; its id."""
    exp_id = ensure_experiment(target)
    run = client(target).create_run(exp_id, run_name=run_name, tags={**tags, "mlflow.runName": run_name})
    log_params(target, run.info.run_id, params)
    return run.info.run_id


def start_run(
    target: TrackingTarget,
    cfg: ExperimentConfig,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run with the config's params and provenance tags (nested under ``parent_run_id``)."""
    tags = run_tags(cfg)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    return create_run(target, run_name, tags, cfg.flat_params())


def _clauses(tags: dict[str, str]) -> list[str]:
    return [f"tags.`{key}` = '{value}'" for key, value in tags.items()]


def _search(
    target: TrackingTarget,
    experiment_id: str,
    tags: dict[str, str],
    *,
    order_by: list[str] | None = None,
    max_results: int | None = None,
) -> list[Run]:
    """The runs of ``experiment_id`` whose tags equal ``tags``: every page, or at most ``max_results``."""
    c = client(target)
    runs: list[Run] = []
    token: str | None = None
    while True:
        want = 1000 if max_results is None else min(1000, max_results - len(runs))
        page = c.search_runs(
            [experiment_id],
            filter_string=" and ".join(_clauses(tags)),
            order_by=order_by,
            max_results=want,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs


def child_runs(target: TrackingTarget, parent_run_id: str, tags: dict[str, str] | None = None) -> list[Run]:
    """The runs nested under ``parent_run_id`` (tag ``mlflow.parentRunId``), optionally with equal ``tags``."""
    exp_id = client(target).get_run(parent_run_id).info.experiment_id
    return _search(target, exp_id, {"mlflow.parentRunId": parent_run_id, **(tags or {})})


def find_runs(target: TrackingTarget, tags: dict[str, str], *, max_results: int = 100) -> list[Run]:
    """The newest runs (at most ``max_results``) of ``target.experiment`` whose tags equal ``tags``; none when
    the experiment does not exist."""
    exp = client(target).get_experiment_by_name(target.experiment)
    if exp is None:
        return []
    return _search(target, exp.experiment_id, tags, order_by=["attributes.start_time DESC"], max_results=max_results)


def find_keyed_run(target: TrackingTarget, run_key: str, run_dir: str) -> str | None:
    """The id of the run of ``target.experiment`` tagged ``itr.run_key = run_key`` and ``itr.run_dir = run_dir``
    (the earlier attempt of a resumed ``itr train``; the newest if several), or ``None``."""
    found = [r for r in find_runs(target, {"itr.run_key": run_key}) if r.data.tags.get("itr.run_dir") == run_dir]
    return found[0].info.run_id if found else None


def run_exists(target: TrackingTarget, run_id: str) -> bool:
    """Whether the store has the run and it is not deleted."""
    try:
        run = client(target).get_run(run_id)
    except Exception:  # noqa: BLE001 - a missing run, a malformed id: both mean no
        return False
    return run.info.lifecycle_stage == "active"


def latest_metrics(target: TrackingTarget, run_id: str) -> dict[str, float]:
    """Each metric's latest value in the run."""
    return {k: float(v) for k, v in client(target).get_run(run_id).data.metrics.items()}


def metric_history(target: TrackingTarget, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` the run logged for ``key``."""
    return [(int(m.step), float(m.value)) for m in client(target).get_metric_history(run_id, key)]


def download_artifact(target: TrackingTarget, run_id: str, artifact_path: str, dst_dir: Path | str) -> Path | None:
    """The run's artifact ``artifact_path`` downloaded into ``dst_dir`` (``None`` when the run has no such file)."""
    c = client(target)
    parent, _, name = artifact_path.rpartition("/")
    if name not in {Path(a.path).name for a in c.list_artifacts(run_id, parent or None)}:
        return None
    return Path(c.download_artifacts(run_id, artifact_path, str(dst_dir)))
