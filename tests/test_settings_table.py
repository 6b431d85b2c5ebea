"""The seed-aware leaderboard rows (orchestrator.sweep.settings_table) against numpy / scipy on the trials' values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.leaderboard import TrialRecord
from orchestrator.sweep.settings_table import setting_rows, view_column


def _record(trial: str, lr: float, seed: int, curve: list[float], status: str = "finished") -> TrialRecord:
    return TrialRecord(trial, {"train.lr": lr, "train.seed": seed}, list(enumerate(curve)), len(curve), status)


def _interval(values: list[float]) -> tuple[float, float, float, float]:
    a = np.asarray(values, dtype=np.float64)
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    return float(a.mean()), float(a.std(ddof=1)), float(lo), float(hi)


def test_rows_group_by_setting_without_the_seed_and_match_scipy():
    rng = np.random.default_rng(3)
    records, truth = [], {}
    for lr in (1e-3, 1e-4):
        best, final = [], []
        for seed in (0, 1, 2):
            curve = list(rng.uniform(20, 60, size=4) + (30 if lr == 1e-3 else 0))
            records.append(_record(f"t{lr}-{seed}", lr, seed, curve))
            best.append(max(curve))
            final.append(curve[-1])
        truth[lr] = (_interval(best), _interval(final))
    rows = setting_rows(records, ["train.lr", "train.seed"], "val/rsum", "max")
    assert [r["train.lr"] for r in rows] == [1e-3, 1e-4]  # best mean first
    best_col, final_col = view_column("val/rsum", "best"), view_column("val/rsum", "final")
    assert best_col == "best-epoch val/rsum (optimistic)" and final_col == "final val/rsum"
    for row in rows:
        assert "train.seed" not in row and row["seeds"] == 3 and row["missing"] == 0
        for col, (mean, std, lo, hi) in zip((best_col, final_col), truth[row["train.lr"]]):
            assert row[f"{col} mean"] == pytest.approx(mean, rel=1e-12)
            assert row[f"{col} std"] == pytest.approx(std, rel=1e-12)
            assert row[f"{col} ci95"] == f"{lo:.2f}..{hi:.2f}"
        assert len(row["trials"].split()) == 3


def test_a_failed_trial_is_counted_missing_and_lower_is_better_ranks_ascending():
    records = [
        _record("a0", 1.0, 0, [5.0, 3.0]),
        _record("a1", 1.0, 1, [4.0, 2.0]),
        _record("a2", 1.0, 2, [], status="failed"),
        _record("b0", 2.0, 0, [1.0, 1.5]),
    ]
    rows = setting_rows(records, ["train.lr", "train.seed"], "val/t2i_medr", "min")
    assert [r["train.lr"] for r in rows] == [2.0, 1.0]
    b, a = rows
    assert b["seeds"] == 1 and math.isnan(b[f"{view_column('val/t2i_medr', 'best')} std"])
    assert b[f"{view_column('val/t2i_medr', 'best')} ci95"] == ""
    assert a["seeds"] == 2 and a["missing"] == 1
    assert a[f"{view_column('val/t2i_medr', 'best')} mean"] == pytest.approx(2.5)  # min of each curve: 3, 2
    assert a[f"{view_column('val/t2i_medr', 'final')} mean"] == pytest.approx(2.5)  # last epoch: 3, 2
