"""``itr reproduce RECIPE``: run a recipe's runs, compare each metric with its reference, tag the MLflow runs.

Per run: an experiment goes through ``run_experiment`` (as ``itr train``; ``evaluate: [test]`` then scores the best
checkpoint on the test split and logs ``test/...`` to the same MLflow run); a sweep goes through ``run_sweep`` (as
``itr sweep``, under a fresh name) and is measured by its best trial (``best/<metric>`` plus that trial's last
values). A run that crashes counts as a regression of every metric it owed.

Tags on each MLflow run (the sweep's parent run for a sweep): ``repro/recipe``, ``repro/run``, ``repro/status``
(``pass`` | ``regressed``), ``repro/recipe_status``, ``repro/against`` (``recipe`` | ``last-pass``), and per metric
``repro/measured/<m>``, ``repro/reference/<m>``, ``repro/delta/<m>``, ``repro/result/<m>``.
``--against-last-pass`` takes each reference from ``repro/measured/<m>`` of the newest run of the same recipe and
run tagged ``repro/status = pass`` (the recipe's own table where there is none yet), with the recipe's tolerances.
The recipe's ``notify`` URLs, ``--notify`` and ``$ITR_NOTIFY_URLS`` get an apprise message on a regression and on
the recovery after one (:mod:`orchestrator.notify`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator import tracking
from orchestrator.errors import UserError
from orchestrator.recipe import TAG_RECIPE, TAG_RUN, TAG_STATUS, Recipe, RecipeRun, Reference
from orchestrator.recipe_spec import EvaluateSpec

log = logging.getLogger(__name__)

PASS, FAIL, INFO = "pass", "FAIL", "info"
STATUS_PASS, STATUS_REGRESSED = "pass", "regressed"


@dataclass
class RunOutcome:
    """What one run measured: ``metrics`` (empty when it failed), its MLflow run and tracking target."""

    run: RecipeRun
    metrics: dict[str, float]
    run_id: str | None = None
    target: tracking.TrackingTarget | None = None
    error: str | None = None
    wall_s: float = 0.0


@dataclass
class Row:
    """One compared metric: reference (None when unknown), measured (None when not measured), result."""

    run: str
    metric: str
    reference: float | None
    measured: float | None
    tolerance: float
    direction: str
    result: str
    source: str
    interval: tuple[float, float] | None = None  # the 95% interval of the seed mean, where the verdict has one

    @property
    def delta(self) -> float | None:
        if self.reference is None or self.measured is None:
            return None
        return self.measured - self.reference


@dataclass
class Report:
    recipe: Recipe
    rows: list[Row]
    outcomes: dict[str, RunOutcome]
    against: str = "recipe"
    notes: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> list[Row]:
        return [r for r in self.rows if r.result == FAIL]

    @property
    def passed(self) -> bool:
        return not self.regressed and not any(o.error for o in self.outcomes.values())


# ------------------------------------------------------------------------------------------- comparing
def judge(reference: float, measured: float, tolerance: float, direction: str) -> bool:
    """Whether ``measured`` is within ``tolerance`` of ``reference``: not below it (``higher``), not above it
    (``lower``), or on either side (``both``)."""
    if not math.isfinite(measured):
        return False
    if direction == "higher":
        return measured >= reference - tolerance
    if direction == "lower":
        return measured <= reference + tolerance
    return abs(measured - reference) <= tolerance


def compare(
    references: list[Reference],
    measured: dict[str, dict[str, float]],
    baselines: dict[str, dict[str, tuple[float, str]]] | None = None,
) -> list[Row]:
    """One row per reference. ``measured``: run -> metric -> value; ``baselines`` (``--against-last-pass``):
    run -> metric -> (value, source) replacing the recipe's reference where present."""
    rows = []
    for ref in references:
        got = measured.get(ref.run, {}).get(ref.metric)
        source = ref.source
        value: float | None
        if baselines is not None and ref.metric in baselines.get(ref.run, {}):
            value, source = baselines[ref.run][ref.metric]
        elif ref.relative_to is not None:
            value = measured.get(ref.relative_to, {}).get(ref.metric)
            source = f"{ref.relative_to} {ref.metric} (measured); {ref.source}"
        else:
            value = ref.value
        if not ref.enforce:
            result = INFO
        elif value is None or got is None:
            result = FAIL
        else:
            result = PASS if judge(value, got, ref.tolerance, ref.direction) else FAIL
        rows.append(
            Row(
                run=ref.run,
                metric=ref.metric,
                reference=value,
                measured=got,
                tolerance=ref.tolerance,
                direction=ref.direction,
                result=result,
                source=source,
            )
        )
    return rows


# -------------------------------------------------------------------------------------------- running
def evaluate_recipe_checkpoint(checkpoint: str, spec: EvaluateSpec) -> dict[str, float]:
    """``itr eval``'s metrics (recall; ECCV Caption and folds when asked) of the model in ``checkpoint`` (a folder
    with model.pt and its embedded config) on ``spec.split``, keyed ``split/...``."""
    from orchestrator.evaluation.suite import EvalOptions
    from orchestrator.evaluation.suite import evaluate_checkpoint as evaluate_suite

    result = evaluate_suite(checkpoint, EvalOptions(split=spec.split, eccv=spec.eccv, folds=spec.folds))
    return {f"{spec.split}/{k}": float(v) for k, v in result.metrics.items()}


def _run_experiment(run: RecipeRun, recipe: Recipe) -> RunOutcome:
    from orchestrator.run import run_experiment

    cfg = run.config
    assert cfg is not None
    result = run_experiment(cfg, config_source=f"{recipe.path} (runs.{run.name})")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    target = tracking.resolve_target(cfg.tracking) if cfg.tracking.enabled else None
    for spec in run.evaluate:
        if not result.best_checkpoint:
            raise RuntimeError(f"run {run.name} left no checkpoint to evaluate on {spec.split}")
        scores = evaluate_recipe_checkpoint(result.best_checkpoint, spec)
        log.info(
            "run %s: %s rsum %.2f (best checkpoint)", run.name, spec.split, scores.get(f"{spec.split}/rsum", math.nan)
        )
        metrics.update(scores)
        if target is not None and result.run_id:
            tracking.log_metrics(target, result.run_id, scores, int(metrics.get("epoch", 0)))
    return RunOutcome(run=run, metrics=metrics, run_id=result.run_id, target=target)


def _run_sweep(run: RecipeRun, recipe: Recipe) -> RunOutcome:
    from orchestrator.sweep import run_sweep

    space = run.space
    assert space is not None
    name = f"{recipe.name}-{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_sweep(space, name=name, progress=True)
    target = tracking.resolve_target(space.base_config.tracking) if space.base_config.tracking.enabled else None
    metrics: dict[str, float] = {}
    best = result.best
    if best is not None:
        value = best.get(f"best {space.metric}")
        if isinstance(value, float) and math.isfinite(value):
            metrics[f"best/{space.metric}"] = value
        if target is not None and best.get("run_id"):
            metrics.update(tracking.latest_metrics(target, best["run_id"]))
    return RunOutcome(run=run, metrics=metrics, run_id=result.parent_run_id, target=target)


def execute(run: RecipeRun, recipe: Recipe) -> RunOutcome:
    """Run one recipe run; a crash (anything but bad input or Ctrl-C) becomes an outcome with ``error`` set."""
    t0 = time.perf_counter()
    log.info("recipe %s: run %s (%s)", recipe.name, run.name, run.kind)
    try:
        outcome = _run_sweep(run, recipe) if run.space is not None else _run_experiment(run, recipe)
    except UserError:
        raise
    except Exception as err:  # the run itself failed: a regression, reported with its reason
        log.error("run %s failed: %s: %s", run.name, err.__class__.__name__, err)
        outcome = RunOutcome(run=run, metrics={}, error=f"{err.__class__.__name__}: {err}"[:500])
    outcome.wall_s = time.perf_counter() - t0
    return outcome


# ------------------------------------------------------------------------------------- MLflow: history
def last_passing_run(target: tracking.TrackingTarget, recipe: str, run: str):
    """The newest MLflow run tagged ``repro/status = pass`` for (recipe, run), or None."""
    found = tracking.find_runs(target, {TAG_RECIPE: recipe, TAG_RUN: run, TAG_STATUS: STATUS_PASS}, max_results=1)
    return found[0] if found else None


def baselines_from_last_pass(recipe: Recipe) -> tuple[dict[str, dict[str, tuple[float, str]]], list[str]]:
    """run -> metric -> (value, source) from each run's last passing reproduction, and notes for the report."""
    out: dict[str, dict[str, tuple[float, str]]] = {}
    notes = []
    for run in recipe.runs:
        cfg = run.tracking_config
        if not cfg.enabled:
            raise UserError(
                "--against-last-pass needs MLflow tracking (tracking.enabled is false)",
                path=run.line,
                field=f"runs.{run.name}",
            )
        target = tracking.resolve_target(cfg)
        found = last_passing_run(target, recipe.name, run.name)
        if found is None:
            notes.append(f"{run.name}: no passing run in {target.uri} yet; compared with the recipe's reference")
            continue
        tags = found.data.tags
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(found.info.start_time / 1000))
        commit = tags.get("mlflow.source.git.commit", "")[:10]
        source = f"last pass {found.info.run_id[:8]} ({when}{', ' + commit if commit else ''})"
        values = {}
        for ref in run.references:
            raw = tags.get(f"repro/measured/{ref.metric}")
            if raw is not None:
                values[ref.metric] = (float(raw), source)
        out[run.name] = values
        notes.append(f"{run.name}: reference = {source}, MLflow run {found.info.run_id}")
    return out, notes


def tag_runs(report: Report) -> None:
    """Write the verdict onto each run's MLflow run (see the module docstring for the tag names)."""
    overall = STATUS_PASS if report.passed else STATUS_REGRESSED
    for name, outcome in report.outcomes.items():
        if outcome.target is None or outcome.run_id is None:
            continue
        rows = [r for r in report.rows if r.run == name]
        failed = [r.metric for r in rows if r.result == FAIL]
        tags = {
            TAG_RECIPE: report.recipe.name,
            TAG_RUN: name,
            "repro/against": report.against,
            TAG_STATUS: STATUS_REGRESSED if failed or outcome.error else STATUS_PASS,
            "repro/recipe_status": overall,
            "repro/recipe_file": str(report.recipe.path),
        }
        if failed:
            tags["repro/regressed"] = ", ".join(failed)
        for row in rows:
            tags[f"repro/result/{row.metric}"] = row.result.lower()
            if row.measured is not None:
                tags[f"repro/measured/{row.metric}"] = repr(row.measured)
            if row.reference is not None:
                tags[f"repro/reference/{row.metric}"] = repr(row.reference)
            if row.delta is not None:
                tags[f"repro/delta/{row.metric}"] = f"{row.delta:+.4f}"
        tracking.set_tags(outcome.target, outcome.run_id, tags)


def reproduce(recipe: Recipe, *, against_last_pass: bool = False, notify: Sequence[str] = ()) -> Report:
    """Run every run of ``recipe``, compare, tag MLflow, tell the recipe's ``notify`` URLs and ``notify`` (apprise
    URLs, checked before anything runs) of a regression or a recovery; ``report.passed`` is the verdict."""
    from orchestrator.notify import destinations, notify_report

    sinks = destinations(recipe, notify)
    baselines, notes = baselines_from_last_pass(recipe) if against_last_pass else (None, [])
    outcomes = {run.name: execute(run, recipe) for run in recipe.runs}
    measured = {name: o.metrics for name, o in outcomes.items()}
    rows = compare(recipe.references, measured, baselines)
    report = Report(
        recipe=recipe, rows=rows, outcomes=outcomes, notes=notes, against="last-pass" if against_last_pass else "recipe"
    )
    try:
        tag_runs(report)
    finally:  # told even when the store refuses the tags
        notify_report(report, sinks)
    return report


# -------------------------------------------------------------------------------------------- display
def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def report_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Table rows for display: run, metric, reference, measured, delta, tolerance, result."""
    arrow = {"higher": "≥", "lower": "≤", "both": "±"}
    out = []
    for r in rows:
        delta = "-" if r.delta is None else f"{r.delta:+.2f}"
        out.append(
            {
                "run": r.run,
                "metric": r.metric,
                "reference": _num(r.reference),
                "measured": _num(r.measured),
                "delta": delta,
                "tolerance": f"{arrow[r.direction]}{r.tolerance:g}",
                "result": r.result,
            }
        )
    return out


REPORT_COLUMNS = ["run", "metric", "reference", "measured", "delta", "tolerance", "result"]
