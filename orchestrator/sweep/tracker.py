"""The sweep in MLflow (written by the driver only): the parent run (:func:`open_parent_run`,
:func:`publish_leaderboard`, :func:`parent_ends_on_error`) and :class:`SweepTracker`, the Tune ``Callback`` that
keeps one child run per trial in step.

See :mod:`orchestrator.sweep` for what each run holds and how it ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from orchestrator import leaderboard, tracking
from orchestrator.errors import UserError
from orchestrator.sweep import comparisons, ray_compat, settings_table
from orchestrator.sweep.state import ResumePoint, SweepFolder, leaderboard_folder
from orchestrator.sweep.trial import build_trial_config, trial_name

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.search_space import SearchSpace

log = logging.getLogger(__name__)

#: result keys that are Tune's bookkeeping, never metrics
_TUNE_KEYS = {
    "training_iteration",
    "done",
    "timestamp",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "date",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_dir_name",
    "should_checkpoint",
}


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of a Tune result: finite numbers under ``<group>/`` keys and ``epoch`` (Tune's and the sweep's
    own ``itr/`` keys left out)."""
    out = {}
    for key, value in result.items():
        if key in _TUNE_KEYS or key.startswith(("config", "itr/", "checkpoint")):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        if "/" in key or key == "epoch":
            out[key] = float(value)
    return out


def failure_reason(trial) -> str:
    """``ExceptionType: message`` of the trial's error, else the last line of its error file."""
    error, text = ray_compat.trial_error(trial)
    reason = None
    cause = getattr(error, "cause", None) or error
    if cause is not None:
        reason = f"{cause.__class__.__name__}: {cause}"
    if not reason and text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else None
    reason = (reason or "trial failed (no error recorded)").strip()
    lines = reason.splitlines()
    return lines[-1][:2000] if len(lines) > 20 else reason[:5000]


class SweepTracker(Callback):
    """A Tune callback (driver side) that keeps MLflow in step with the trials.

    ``fresh``: the parent run is new, so no child can exist yet (the lookup is skipped). After ``fit``,
    :attr:`interrupted` says whether the Tune loop ended with trials neither finished nor failed."""

    def __init__(
        self,
        target: tracking.TrackingTarget,
        parent_run_id: str,
        sweep_name: str,
        base_tree: dict[str, Any],
        varied: list[str],
        cpu: float,
        gpu: float,
        metric: str = "val/rsum",
        progress: bool = True,
        fresh: bool = False,
    ) -> None:
        self.target, self.parent_run_id, self.sweep_name = target, parent_run_id, sweep_name
        self.base_tree, self.varied, self.cpu, self.gpu = base_tree, varied, cpu, gpu
        self.metric, self.progress, self.fresh = metric, progress, fresh
        self.interrupted = False
        self._runs: dict[str, str] = {}  # trial id -> its child run
        self._logged: dict[str, set[int]] = {}  # trial id -> epochs already in MLflow
        self._planned: dict[str, int] = {}  # trial id -> train.epochs
        self._located: set[str] = set()  # trials whose Ray node is tagged
        self._ended: set[str] = set()  # trials that completed or failed in this driver

    def __reduce__(self):  # pickled into tuner.pkl: only the settings, never run state
        return (
            SweepTracker,
            (
                self.target,
                self.parent_run_id,
                self.sweep_name,
                self.base_tree,
                self.varied,
                self.cpu,
                self.gpu,
                self.metric,
                self.progress,
                False,
            ),
        )

    def _say(self, trial, text: str, *args) -> None:
        if self.progress:
            shown = ", ".join(f"{k}={_short(trial.config[k])}" for k in self.varied if k in trial.config)
            log.info("trial %s (%s) " + text, trial.trial_id, shown, *args)

    def _child(self, trial) -> str:
        """The trial's child run: found by its trial id (a resumed sweep) and reopened, or started."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        cfg = build_trial_config(self.base_tree, trial.config, self.cpu, self.gpu)
        self._planned[tid] = cfg.train.epochs
        existing = (
            []
            if self.fresh
            else [
                r
                for r in tracking.child_runs(self.target, self.parent_run_id, {"itr.trial_id": tid})
                if r.data.tags.get("itr.superseded") != "true"
            ]
        )
        if existing:
            run_id = existing[0].info.run_id
            for extra in existing[1:]:  # never expected; keep one
                tracking.set_tags(self.target, extra.info.run_id, {"itr.superseded": "true"})
            tracking.reopen_run(self.target, run_id)
            self._logged[tid] = {step for step, _ in tracking.metric_history(self.target, run_id, "epoch")}
            log.info("trial %s continues in MLflow run %s (%d epochs logged)", tid, run_id, len(self._logged[tid]))
        else:
            params = {k: trial.config[k] for k in self.varied if k in trial.config}
            shown = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items())
            run_id = tracking.start_run(
                self.target,
                cfg,
                run_name=f"{self.sweep_name} {tid} {shown}".strip(),
                parent_run_id=self.parent_run_id,
                extra_tags={
                    "itr.trial_id": tid,
                    "itr.trial_name": trial_name(trial),
                    "itr.sweep": self.sweep_name,
                    "itr.kind": "trial",
                    "itr.varied": json.dumps({k: _jsonable(v) for k, v in params.items()}),
                },
            )
            self._logged[tid] = set()
            if cfg.data.noise.caption_shuffle > 0:  # the trial's noisy-correspondence mask (orchestrator.data.noise)
                from orchestrator.data.noise import record_noise_mask

                record_noise_mask(cfg.data, lambda files: tracking.log_artifacts(self.target, run_id, files))
        self._runs[tid] = run_id
        return run_id

    # -- Tune's hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._child(trial)
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._child(trial)
        tid = trial.trial_id
        step = int(result.get("epoch", result.get("training_iteration", 1) - 1))
        if tid not in self._located and "itr/node_id" in result:
            tracking.set_tags(
                self.target,
                run_id,
                {
                    "itr.ray_node_id": result["itr/node_id"],
                    "itr.ray_gcs_address": result["itr/gcs_address"],
                    "itr.hostname": result.get("hostname", ""),
                },
            )
            self._located.add(tid)
        value = result.get(self.metric)
        # the epoch index as MLflow steps, itr train and the leaderboard's "best epoch" count it (from 0)
        self._say(
            trial,
            "epoch %d (%d of %s): %s %s",
            step,
            step + 1,
            self._planned.get(tid, "?"),
            self.metric,
            "-" if value is None else f"{value:.4g}",
        )
        if step in self._logged.setdefault(tid, set()):
            return
        tracking.log_metrics(self.target, run_id, metrics_of(result), step)
        self._logged[tid].add(step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        self._ended.add(trial.trial_id)
        last = trial.last_result or {}
        epochs = int(last["epoch"]) + 1 if "epoch" in last else int(last.get("training_iteration", 0))
        planned = self._planned.get(trial.trial_id, epochs)
        tags = {"itr.epochs_run": epochs, **({"itr.stopped_early": "true"} if epochs < planned else {})}
        try:  # the final evaluation's per-query ranks: what the sweep's paired comparisons resample
            comparisons.log_query_ranks(self.target, run_id, trial.checkpoint)
        except Exception as err:  # noqa: BLE001 - the trial finished; only its comparison is lost
            log.warning("trial %s: per-query ranks not logged (%s: %s)", trial.trial_id, type(err).__name__, err)
        tracking.send(
            self.target, run_id, *(tracking.tag_op(k, v) for k, v in tags.items()), tracking.end_op("FINISHED")
        )
        self._say(
            trial, "%s after %d epoch(s)", "stopped early by the scheduler" if epochs < planned else "finished", epochs
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        self._ended.add(trial.trial_id)
        reason = failure_reason(trial)
        tracking.end_run(self.target, run_id, "FAILED", reason=reason)
        log.warning("trial %s FAILED: %s", trial.trial_id, reason.splitlines()[-1] if reason else "")

    def on_experiment_end(self, trials, **info):
        # Tune's cleanup marks the trials it stops at an interruption TERMINATED (the saved state still has them
        # RUNNING, so a resume continues them): a trial started here that neither completed nor failed was cut off.
        unfinished = [
            t
            for t in trials
            if t.status not in ("TERMINATED", "ERROR") or (t.trial_id in self._runs and t.trial_id not in self._ended)
        ]
        self.interrupted = bool(unfinished)
        for trial in unfinished:
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None:
                tracking.end_run(
                    self.target,
                    run_id,
                    "KILLED",
                    reason="sweep interrupted before this trial ended (itr sweep --resume continues it)",
                )


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _jsonable(v: Any) -> Any:
    from orchestrator.search_space import plain

    v = plain(v)
    return v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)


# ------------------------------------------------------------------------------------------ the parent run
def open_parent_run(
    target: tracking.TrackingTarget, space: SearchSpace, name: str, folder: SweepFolder, point: ResumePoint
) -> tuple[str, bool]:
    """(the sweep's parent run, whether it is new with nothing for Tune to restore: no child can exist yet).

    The parent run an earlier driver recorded is reopened; when Tune had not snapshotted anything yet (the driver
    was killed before its first snapshot) the trials start over under new ids, so that run's children are
    marked superseded and ended."""
    parent = point.parent_run_id
    if parent and tracking.run_exists(target, parent):
        tracking.reopen_run(target, parent)
        if not point.restorable:
            for run in tracking.child_runs(target, parent):
                tracking.set_tags(target, run.info.run_id, {"itr.superseded": "true"})
            end_running_children(target, parent, "superseded: the sweep restarted from scratch")
        return parent, False
    return _start_parent(target, space, name, folder), not point.restorable


def check_recorded_store(
    target: tracking.TrackingTarget | None, space: SearchSpace, name: str, point: ResumePoint
) -> None:
    """Refuse to continue a sweep whose finished trials the current tracking store has never seen.

    Tune restores finished trials without running them again, so a sweep continued against another store (a new
    ``MLFLOW_TRACKING_URI``, a team server) would record an empty parent run and end with no leaderboard: a
    ``UserError`` says so and how to go on (that store, or a new sweep name) before anything is written."""
    parent, recorded = point.parent_run_id, (point.state or {}).get("tracking_uri")
    if target is None or not parent or not point.restorable or tracking.run_exists(target, parent):
        return
    raise UserError(
        f"sweep {name!r} has trials recorded in MLflow parent run {parent} of {recorded or 'another store'}, "
        f"which the tracking store {target.uri} does not hold (the finished trials would not be recorded again): "
        f"continue it against that store (MLFLOW_TRACKING_URI={recorded}), or start a new sweep with --name",
        path=str(space.path),
    )


def _start_parent(target: tracking.TrackingTarget, space: SearchSpace, name: str, folder: SweepFolder) -> str:
    """The parent run: the base config's provenance, the search settings as params, the space file and the
    resolved base config as artifacts."""
    tags = {k: v for k, v in tracking.run_tags(space.base_config).items() if k != "itr.loss_family"}
    tags.update(
        {"itr.kind": "sweep", "itr.sweep": name, "itr.space_file": str(space.path), "itr.sweep_dir": str(folder)}
    )
    run_id = tracking.create_run(target, f"sweep {name}", tags, space.settings())
    tracking.send(
        target,
        run_id,
        tracking.text_op(space.path.name, space.text),
        tracking.text_op("base_config.yaml", space.base_config.to_yaml()),
    )
    return run_id


def end_running_children(target: tracking.TrackingTarget, parent_run_id: str, reason: str) -> int:
    """End the parent's children that are still RUNNING (or SCHEDULED) as KILLED with ``reason``."""
    n = 0
    for run in tracking.child_runs(target, parent_run_id):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            tracking.end_run(target, run.info.run_id, "KILLED", reason=reason)
            n += 1
    return n


@contextlib.contextmanager
def parent_ends_on_error(
    target: tracking.TrackingTarget | None, parent_run_id: str | None, what: str, resumable: bool
) -> Iterator[None]:
    """An error (or Ctrl-C: KILLED) in the block ends the parent run FAILED with ``what: <error>``, and with
    ``resumable`` the children still running KILLED too; the error goes on."""
    try:
        yield
    except BaseException as err:
        if target is None or parent_run_id is None:
            raise
        stopped = isinstance(err, KeyboardInterrupt)
        reason = "sweep interrupted" if stopped and resumable else f"{what}: {err.__class__.__name__}: {err}"
        try:
            if resumable:
                end_running_children(target, parent_run_id, reason + " (itr sweep --resume continues it)")
            tracking.end_run(target, parent_run_id, "KILLED" if stopped else "FAILED", reason=reason)
        except Exception:  # pragma: no cover - never mask the original error
            log.exception("could not end the MLflow runs of sweep run %s", parent_run_id)
        raise


def publish_leaderboard(
    target: tracking.TrackingTarget,
    parent_run_id: str,
    space: SearchSpace,
    folder: SweepFolder,
    *,
    plots: bool = True,
) -> Leaderboard:
    """The sweep's leaderboard read back from its children; written to ``<sweep>/leaderboard`` and logged to the
    parent run (``leaderboard.csv``: one row per trial; ``leaderboard_settings.csv``: one per setting over its
    seeds; ``paired_tests.csv`` with a ``baseline``; ``leaderboard.txt``, ``plots/``, ``best/<metric>``, the best
    trial's tags, the status counts), which then ends FINISHED."""
    records = leaderboard.records_from_mlflow(target, parent_run_id, space.metric)
    table = leaderboard.rows(records, space.varied, space.metric, space.mode)
    by_setting = settings_table.setting_rows(records, space.varied, space.metric, space.mode)
    paired: list[dict[str, Any]] = []
    if space.spec.baseline:
        paired = comparisons.paired_rows(target, records, space.varied, space.spec.baseline)
    pngs: list[Path] = []
    with leaderboard_folder(folder) as out:  # object storage: drawn locally, uploaded at the end
        csv_path = leaderboard.write_csv(out.local / "leaderboard.csv", table)
        extra = [leaderboard.write_csv(out.local / "leaderboard_settings.csv", by_setting)]
        if paired:
            extra.append(leaderboard.write_csv(out.local / "paired_tests.csv", paired))
        log_scale = [k for k, d in space.distributions.items() if d.kind == "loguniform"]
        if plots:
            pngs = leaderboard.make_plots(
                records, space.varied, space.metric, space.mode, out.local / "plots", log_scale=log_scale
            )
        tracking.send(
            target,
            parent_run_id,
            tracking.artifact_op(csv_path),
            *(tracking.artifact_op(p) for p in extra),
            *(tracking.artifact_op(p, "plots") for p in pngs),
        )
    published = out.published(pngs)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    writes = [tracking.text_op("leaderboard.txt", leaderboard_text(table, by_setting, paired) + "\n")]
    best = table[0][f"best {space.metric}"] if table else None
    if isinstance(best, float) and math.isfinite(best):
        writes += [
            tracking.metrics_op({f"best/{space.metric}": best}, step=0),
            tracking.tag_op("itr.best_trial", table[0]["trial"]),
            tracking.tag_op("itr.best_run_id", table[0]["run_id"]),
        ]
    writes.append(tracking.tag_op("itr.trial_status_counts", json.dumps(counts, sort_keys=True)))
    tracking.send(target, parent_run_id, *writes)
    end_running_children(target, parent_run_id, "left running after the sweep ended")
    tracking.end_run(target, parent_run_id, "FINISHED")
    return Leaderboard(table, records, published, by_setting, paired)


@dataclass
class Leaderboard:
    """A published leaderboard: one row per trial (``table``, best first), the trials' ``records``, the plot
    files, one row per setting over its seeds (``settings``) and the paired tests against the baseline."""

    table: list[dict[str, Any]]
    records: list[leaderboard.TrialRecord]
    plots: list[Path | str]
    settings: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)


def leaderboard_text(
    table: list[dict[str, Any]], by_setting: list[dict[str, Any]], paired: list[dict[str, Any]]
) -> str:
    """The printed leaderboard: the trials, then (when a setting has several seeds) the settings over their seeds,
    then the paired tests against the baseline."""
    parts = [leaderboard.format_table(table)]
    if any(row.get("seeds", 0) > 1 for row in by_setting):
        parts += ["", "settings over seeds (mean, std, 95% t-interval):", leaderboard.format_table(by_setting)]
    if paired:
        parts += ["", "paired bootstrap over val images vs the baseline:", leaderboard.format_table(paired)]
    return "\n".join(parts)
