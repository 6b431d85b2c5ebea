"""A sweep's leaderboard: one row per trial (varied params, best metric, epochs run, status), a CSV, a printed
table, and matplotlib (Agg) plots: the metric against each varied parameter and every trial's learning curve.

The rows are read back from MLflow (the sweep's nested child runs), so a resumed sweep's leaderboard covers
every trial however many driver processes it took.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

STATUS_FINISHED = "finished"
STATUS_STOPPED = "stopped early"
STATUS_FAILED = "failed"
STATUS_KILLED = "killed"
STATUS_RUNNING = "running"


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    curve: list[tuple[int, float]]  # (epoch, metric) in epoch order
    epochs_run: int
    status: str
    run_id: str | None = None
    failure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self, mode: str) -> tuple[float, int | None]:
        """(best value, its epoch); NaN when the metric was never reported."""
        values = [(v, e) for e, v in self.curve if v is not None and math.isfinite(v)]
        if not values:
            return math.nan, None
        pick = max if mode == "max" else min
        return pick(values, key=lambda ve: ve[0])


def _status(run) -> str:
    tags = run.data.tags
    status = run.info.status
    if tags.get("itr.stopped_early") == "true":
        return STATUS_STOPPED
    return {"FINISHED": STATUS_FINISHED, "FAILED": STATUS_FAILED, "KILLED": STATUS_KILLED}.get(status, STATUS_RUNNING)


def records_from_mlflow(target, parent_run_id: str, metric: str) -> list[TrialRecord]:
    """One record per child run of the sweep (superseded attempts left out)."""
    from orchestrator import tracking

    out = []
    for run in tracking.child_runs(target, parent_run_id):
        tags = run.data.tags
        if tags.get("itr.superseded") == "true" or "itr.trial_id" not in tags:
            continue
        curve = sorted(tracking.metric_history(target, run.info.run_id, metric))
        epochs = {step for step, _ in tracking.metric_history(target, run.info.run_id, "epoch")}
        params = json.loads(tags.get("itr.varied", "{}"))
        out.append(
            TrialRecord(
                trial_id=tags["itr.trial_id"],
                params=params,
                curve=curve,
                epochs_run=len(epochs),
                status=_status(run),
                run_id=run.info.run_id,
                failure=tags.get("itr.failure"),
            )
        )
    return out


def rank(records: Sequence[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best first; trials that never reported the metric last (in trial order)."""

    def key(r: TrialRecord):
        value, _ = r.best(mode)
        missing = not math.isfinite(value)
        return (missing, 0.0 if missing else (-value if mode == "max" else value), r.trial_id)

    return sorted(records, key=key)


def rows(records: Sequence[TrialRecord], varied: Sequence[str], metric: str, mode: str) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rank(records, mode), 1):
        value, epoch = r.best(mode)
        row: dict[str, Any] = {"rank": i, "trial": r.trial_id}
        for k in varied:
            row[k] = r.params.get(k, "")
        row[f"best {metric}"] = value
        row["best epoch"] = "" if epoch is None else epoch
        row["epochs"] = r.epochs_run
        row["status"] = r.status
        row["run_id"] = r.run_id or ""
        out.append(row)
    return out


def write_csv(path: Path, table: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(table[0]) if table else ["rank", "trial"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in table:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if (abs(v) < 0.01 or abs(v) >= 1e5) and v != 0 else f"{v:.2f}"
    return str(v)


def format_table(table: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An aligned plain-text table (the run id column is left out of the printed version)."""
    if not table:
        return "(no trials)"
    columns = list(columns or [c for c in table[0] if c != "run_id"])
    body = [[_cell(r.get(c, "")) for c in columns] for r in table]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _is_numeric(values: Sequence[Any]) -> TypeGuard[Sequence[int | float]]:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _label(r: TrialRecord, varied: Sequence[str]) -> str:
    parts = [
        f"{k.split('.')[-1]}={_cell(r.params[k]) if isinstance(r.params.get(k), float) else r.params.get(k)}"
        for k in varied
        if k in r.params
    ]
    return ", ".join(parts) or r.trial_id


def make_plots(
    records: Sequence[TrialRecord],
    varied: Sequence[str],
    metric: str,
    mode: str,
    out_dir: Path,
    log_scale: Sequence[str] = (),
) -> list[Path]:
    """PNG files in ``out_dir``: ``<metric>_vs_<param>.png`` for each varied parameter (a strip plot with the mean
    as a bar for categorical values, a scatter for numeric ones; log x for ``log_scale`` params) and
    ``learning_curves.png`` (the metric per epoch of every trial; dashed: stopped early, x: failed/killed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    scored = [(r, r.best(mode)[0]) for r in sorted(records, key=lambda r: r.trial_id)]  # grid order
    scored = [(r, v) for r, v in scored if math.isfinite(v)]
    best_word = "best" if mode == "max" else "lowest"

    for key in varied:
        points = [(r.params.get(key), v, r) for r, v in scored if key in r.params]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        xs = [p[0] for p in points]
        if (
            _is_numeric(xs)
            and len(set(xs)) > 1
            and not (len(set(xs)) <= 4 and all(float(x).is_integer() for x in xs) and key.endswith("seed"))
        ):
            colors = ["tab:orange" if p[2].status == STATUS_STOPPED else "tab:blue" for p in points]
            ax.scatter(xs, [p[1] for p in points], c=colors, alpha=0.8, edgecolors="black", linewidths=0.5)
            if key in log_scale or (min(xs) > 0 and max(xs) / min(xs) >= 100):
                ax.set_xscale("log")
        else:
            cats = []
            for x in xs:
                if str(x) not in cats:
                    cats.append(str(x))
            pos = {c: i for i, c in enumerate(cats)}
            means = [
                sum(p[1] for p in points if str(p[0]) == c) / sum(1 for p in points if str(p[0]) == c) for c in cats
            ]
            ax.bar(range(len(cats)), means, color="lightsteelblue", edgecolor="steelblue", label="mean")
            n = len(points)
            for i, (x, v, r) in enumerate(points):
                jitter = ((i % 5) - 2) * 0.06 if n > 1 else 0.0
                ax.scatter(
                    pos[str(x)] + jitter,
                    v,
                    color="tab:orange" if r.status == STATUS_STOPPED else "black",
                    s=22,
                    zorder=3,
                )
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=20 if max(len(c) for c in cats) > 8 else 0)
            lo = min(p[1] for p in points)
            hi = max(p[1] for p in points)
            pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
            ax.set_ylim(lo - pad if lo - pad > 0 or lo < 0 else 0, hi + pad)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{best_word} {metric}")
        ax.set_title(f"{best_word} {metric} per trial vs {key}\n(orange: stopped early)", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{_slug(metric)}_vs_{_slug(key)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)

    paths.append(learning_curves_figure(records, varied, metric, mode, out_dir / "learning_curves.png"))
    return paths


def curve_styles(
    records: Sequence[TrialRecord], varied: Sequence[str], mode: str
) -> list[tuple[TrialRecord, int, str | None]]:
    """(trial, colour index, legend label or None) in drawing order for ``learning_curves_figure``.

    A colour per setting (the varied parameters other than the seed), numbered in leaderboard order of each
    setting's best trial; a setting's first finished curve carries its label (with its trial count), the others
    none; stopped-early, failed and killed trials are labelled each and drawn last so their short curves show."""
    setting = [k for k in varied if k.split(".")[-1] != "seed"] or list(varied)
    count_word = "seeds" if len(setting) < len(varied) else "trials"
    ranked = [r for r in rank(records, mode) if r.curve]
    groups: dict[str, list[TrialRecord]] = {}
    for r in ranked:
        groups.setdefault(_label(r, setting), []).append(r)
    index = {g: i for i, g in enumerate(groups)}
    note = {STATUS_STOPPED: " (stopped early)", STATUS_FAILED: " (failed)", STATUS_KILLED: " (killed)"}
    ordered = [r for r in ranked if r.status != STATUS_STOPPED] + [r for r in ranked if r.status == STATUS_STOPPED]
    out: list[tuple[TrialRecord, int, str | None]] = []
    labelled: set[str] = set()
    for r in ordered:
        group = _label(r, setting)
        if r.status in note:
            label: str | None = f"{_label(r, varied)}{note[r.status]}"
        elif group not in labelled:
            n = len(groups[group])
            label = group + (f" ({n} {count_word})" if n > 1 else "")
            labelled.add(group)
        else:
            label = None
        out.append((r, index[group], label))
    return out


def learning_curves_figure(
    records: Sequence[TrialRecord], varied: Sequence[str], metric: str, mode: str, path: Path
) -> Path:
    """``metric`` per epoch of every trial, styled by ``curve_styles``: one colour per setting, so the seeds of
    one setting read as a band; dashed with diamonds: stopped early; x: failed / killed. The legend sits right of
    the axes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = curve_styles(records, varied, mode)
    cmap = plt.get_cmap("tab10" if len({c for _, c, _ in styles}) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=100)
    for r, colour, label in styles:
        stopped = r.status == STATUS_STOPPED
        marker = "x" if r.status in (STATUS_FAILED, STATUS_KILLED) else ("D" if stopped else "o")
        ax.plot(
            [e for e, _ in r.curve],
            [v for _, v in r.curve],
            color=cmap(colour % cmap.N),
            linestyle="--" if stopped else "-",
            marker=marker,
            markersize=6 if stopped else 3,
            linewidth=1.2,
            alpha=0.85,
            zorder=3 if stopped else 2,
            label=label,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"learning curves ({metric}; one colour per setting; dashed, diamonds: stopped early)", fontsize=10)
    ax.grid(alpha=0.3)
    if styles:
        locator = ax.xaxis.get_major_locator()
        if isinstance(locator, MaxNLocator):  # the default (AutoLocator) is one; integer epochs on the x axis
            locator.set_params(integer=True)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
