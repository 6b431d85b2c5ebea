"""``itr table``: a sweep's settings as a paper table -- rows = settings (every varied value but the seed), columns =
the chosen metrics as ``mean ± std`` over seeds, the best mean per column in bold (higher is better, lower for
ranks and losses), the seeds' n in a footnote; Markdown, LaTeX (booktabs) or CSV.

Values are each trial's final-epoch metric (``view="final"``, no selection) or its value at the epoch where the
sweep's metric was best (``view="best"``, optimistic when selected on the same split), read back from the sweep's
child runs in MLflow; mean and std (ddof 1) are ``orchestrator.results.settings``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import leaderboard, tracking
from orchestrator.errors import UserError
from orchestrator.results.settings import DEFAULT_SEED_KEY, Setting, group_settings
from orchestrator.search_space import default_mode
from orchestrator.sweep.state import read_state

FORMATS = ("markdown", "latex", "csv")


@dataclass
class _Trial:
    params: dict[str, Any]
    metrics: dict[str, float]


def sweep_parent(source: str) -> tuple[tracking.TrackingTarget, str]:
    """(tracking store, parent run id) of a sweep folder (its ``itr_sweep.json``) or of a parent run id in the
    current store ($MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    from orchestrator.config import TrackingConfig

    folder = Path(source)
    if folder.is_dir():
        state = read_state(str(folder))
        if not state or not state.get("parent_run_id"):
            raise UserError("not a sweep folder with a recorded MLflow parent run (itr_sweep.json)", path=source)
        cfg = TrackingConfig(uri=state.get("tracking_uri"), experiment=state.get("experiment") or "itr")
        return tracking.resolve_target(cfg), str(state["parent_run_id"])
    target = tracking.resolve_target(TrackingConfig())
    if not tracking.run_exists(target, source):
        raise UserError(f"{source!r} is neither a sweep folder nor a run in the tracking store {target.uri}")
    return target, source


def _value_at(target: tracking.TrackingTarget, run_id: str, metric: str, step: int | None) -> float:
    """``metric`` at ``step`` of the run (``None``: its last logged step); NaN when not logged there."""
    history = dict(tracking.metric_history(target, run_id, metric))
    if not history:
        return math.nan
    return float(history[max(history)] if step is None else history.get(step, math.nan))


def trial_values(
    target: tracking.TrackingTarget, parent_run_id: str, metrics: Sequence[str], view: str, sweep_metric: str
) -> list[_Trial]:
    """Each trial of the sweep (``leaderboard.records_from_mlflow``: superseded attempts left out): its varied
    values and the chosen metrics at its last epoch, or (``view="best"``) where ``sweep_metric`` was best."""
    out = []
    for record in leaderboard.records_from_mlflow(target, parent_run_id, sweep_metric):
        if record.run_id is None:
            continue
        step = record.best(default_mode(sweep_metric))[1] if view == "best" else None
        values = {m: _value_at(target, record.run_id, m, step) for m in metrics}
        out.append(_Trial(dict(record.params), values))
    return out


def settings_of(trials: Sequence[_Trial], seed_key: str = DEFAULT_SEED_KEY) -> tuple[list[str], list[Setting]]:
    """(the varied parameters but the seed, the settings in order of first appearance)."""
    varied = list(dict.fromkeys(k for t in trials for k in t.params))
    return [k for k in varied if k != seed_key], group_settings(trials, varied, seed_key)


def _cells(settings: Sequence[Setting], metrics: Sequence[str]) -> tuple[list[list[str]], dict[str, int]]:
    """``mean ± std`` strings per setting and metric, and the row of each metric's best mean."""
    best: dict[str, int] = {}
    for m in metrics:
        means = [s.stats(m).mean for s in settings]
        finite = [i for i, v in enumerate(means) if math.isfinite(v)]
        if finite:
            pick = max if default_mode(m) == "max" else min
            best[m] = pick(finite, key=lambda i: means[i])
    rows = []
    for s in settings:
        row = []
        for m in metrics:
            st = s.stats(m)
            row.append(
                "-" if not math.isfinite(st.mean) else f"{st.mean:.2f}" + ("" if st.n < 2 else f" ± {st.std:.2f}")
            )
        rows.append(row)
    return rows, best


def _footnote(settings: Sequence[Setting], metric: str) -> str:
    ns = sorted({s.stats(metric).n for s in settings})
    return f"mean ± std over n = {ns[0]} seeds per setting" if len(ns) == 1 else f"mean ± std over n = {ns} seeds"


def render(trials: Sequence[_Trial], metrics: Sequence[str], fmt: str) -> str:
    """The table of ``trials`` grouped by setting, in ``fmt`` (markdown, latex or csv)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if not trials:
        raise UserError("the sweep has no trials to tabulate")
    keys, settings = settings_of(trials)
    labels = [[str(s.params.get(k, "")) for k in keys] for s in settings]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([*keys, *(f"{m} {x}" for m in metrics for x in ("mean", "std", "n"))])
        for label, s in zip(labels, settings):
            w.writerow([*label, *(v for m in metrics for v in (s.stats(m).mean, s.stats(m).std, s.stats(m).n))])
        return buf.getvalue()
    cells, best = _cells(settings, metrics)
    note = _footnote(settings, metrics[0])
    if fmt == "markdown":
        head = [*keys, *metrics]
        lines = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join([" --- "] * len(keys) + [" ---: "] * len(metrics)) + "|",
        ]
        for i, (label, row) in enumerate(zip(labels, cells)):
            shown = [f"**{c}**" if best.get(m) == i else c for m, c in zip(metrics, row)]
            lines.append("| " + " | ".join([*label, *shown]) + " |")
        return "\n".join(lines) + f"\n\n{note}.\n"
    return _latex(keys, metrics, labels, cells, best, note)


def _tex(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")


def _latex(keys, metrics, labels, cells, best, note) -> str:
    spec = "l" * len(keys) + "r" * len(metrics)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(_tex(h) for h in [*keys, *metrics]) + " \\\\"]
    lines.append("\\midrule")
    for i, (label, row) in enumerate(zip(labels, cells)):
        shown = []
        for m, c in zip(metrics, row):
            c = c.replace(" ± ", " $\\pm$ ")
            shown.append(f"\\textbf{{{c}}}" if best.get(m) == i else c)
        lines.append(" & ".join([*(_tex(v) for v in label), *shown]) + " \\\\")
    shown_note = _tex(note).replace("±", "$\\pm$")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\par\\footnotesize {shown_note}."]
    return "\n".join(lines) + "\n"


__all__ = ["FORMATS", "render", "settings_of", "sweep_parent", "trial_values"]
