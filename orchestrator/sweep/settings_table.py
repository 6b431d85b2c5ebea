"""The seed-aware leaderboard: one row per *setting* (every varied value except the seed), with the mean, std,
95% t-interval and n over its seeds, for the best-epoch and the final-epoch value of the sweep's metric.

The best-epoch view picks each trial's best epoch by the metric and reports that same metric: on a sweep that
selects and reports on one split (the val split, as on coco-mini, which has no test split) it is optimistic,
and its columns say so. The final-epoch view is the value after the last epoch (no selection).

The statistics are ``orchestrator.results.settings`` (Student's t over seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.results.settings import DEFAULT_SEED_KEY, Setting, group_settings, rank_settings

BEST, FINAL = "best", "final"


class TrialLike(Protocol):
    """What a leaderboard row is built from (``orchestrator.leaderboard.TrialRecord``)."""

    trial_id: str
    params: dict[str, Any]
    curve: list[tuple[int, float]]

    def best(self, mode: str) -> tuple[float, int | None]: ...


@dataclass
class SeedView:
    """One trial as ``group_settings`` reads it: its parameters and its best- and final-epoch values."""

    trial: TrialLike
    params: dict[str, Any]
    metrics: dict[str, float]


def _final(curve: Sequence[tuple[int, float]]) -> float:
    """The value of the last epoch that reported a finite one (NaN when none did)."""
    for _, value in reversed(curve):
        if value is not None and math.isfinite(value):
            return float(value)
    return math.nan


def is_optimistic(metric: str) -> bool:
    """Whether the best-epoch view of ``metric`` is selected and reported on the same split (val)."""
    return metric.startswith("val/") or metric.startswith("best/val/")


def view_column(metric: str, view: str) -> str:
    """The column name of one view of ``metric``: ``best-epoch val/rsum (optimistic)``, ``final val/rsum``."""
    if view == BEST:
        return f"best-epoch {metric}" + (" (optimistic)" if is_optimistic(metric) else "")
    return f"final {metric}"


def settings(
    records: Sequence[TrialLike], varied: Sequence[str], metric: str, mode: str, seed_key: str = DEFAULT_SEED_KEY
) -> list[Setting]:
    """The sweep's settings, best first by the seed mean of the best-epoch value (``mode``: max or min).

    Each setting's ``values`` hold ``best`` and ``final`` per trial (NaN where a trial never reported)."""
    views = [SeedView(r, dict(r.params), {BEST: r.best(mode)[0], FINAL: _final(r.curve)}) for r in records]
    return rank_settings(group_settings(views, varied, seed_key), BEST, mode)


def setting_rows(
    records: Sequence[TrialLike], varied: Sequence[str], metric: str, mode: str, seed_key: str = DEFAULT_SEED_KEY
) -> list[dict[str, Any]]:
    """One row per setting: rank, the varied values (seed left out), ``seeds`` (n with a value), then per view
    ``mean``, ``std``, ``ci95`` (``low..high``) and the trial ids. Failed trials count in ``missing``."""
    out = []
    for i, setting in enumerate(settings(records, varied, metric, mode, seed_key), 1):
        row: dict[str, Any] = {"rank": i, **{k: _plain(v) for k, v in setting.params.items()}}
        best, final = setting.stats(BEST), setting.stats(FINAL)
        row["seeds"] = best.n
        for view, st in ((BEST, best), (FINAL, final)):
            name = view_column(metric, view)
            row[f"{name} mean"] = st.mean
            row[f"{name} std"] = st.std
            row[f"{name} ci95"] = "" if math.isnan(st.ci_low) else f"{st.ci_low:.2f}..{st.ci_high:.2f}"
        row["missing"] = best.n_missing
        row["trials"] = " ".join(str(v.trial.trial_id) for v in setting.records)
        out.append(row)
    return out


def _plain(value: Any) -> Any:
    return "" if value is None else value


__all__ = ["BEST", "FINAL", "SeedView", "is_optimistic", "setting_rows", "settings", "view_column"]
