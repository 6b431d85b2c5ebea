"""Seed-aware results: trials grouped by *setting*, the mean, std and 95% t-interval over seeds, and the
reproduce verdict on a band rather than on one number.

A *setting* is the tuple of every varied parameter's value except the seed's (``train.seed`` unless told
otherwise): trials that differ only in their seed are replicates of one setting. Parameter values are compared by
their canonical JSON (``json.dumps(v, sort_keys=True)``), so ``[1, 5]`` and ``[1, 5]`` are one setting while
``1`` and ``1.0`` are two; a varied parameter a trial does not have counts as ``None``.

Per setting and metric (a metric is just a name: the best-epoch and the final-epoch view are two names, e.g.
``best/val/rsum`` and ``final/val/rsum``), over the trials' finite values (NaN / inf / missing values are left
out and counted in ``n_missing``):

* ``mean``: the arithmetic mean;
* ``std``: the sample standard deviation (``ddof=1``); NaN for n = 1;
* ``ci_low, ci_high``: the 95% confidence interval of the mean by Student's t,
  ``mean ± t_{0.975, n-1} · std / sqrt(n)``; NaN for n = 1;
* ``n``: the number of finite values (seeds).

Ordering (:func:`rank_settings`): by the mean of one metric, descending for ``mode="max"`` and ascending for
``mode="min"``; settings without a finite mean come last; ties keep the order in which the settings first appear
in the records (the sort is stable).

Verdict (:func:`verdict`): ``higher`` is better (recalls, RSUM) unless the metric is lower-is-better (``medr``,
``meanr``, losses: ``lower``), with ``threshold = reference - tolerance`` (``reference + tolerance`` for ``lower``).
With n >= 2 seeds the run has regressed if and only if the whole 95% t-interval of the seed mean lies beyond the
threshold (``ci_high < threshold``; mirrored, ``ci_low > threshold``); with one seed, if the value lies beyond it.
``both`` (within ``tolerance`` on either side) regresses when the interval lies entirely outside
``[reference - tolerance, reference + tolerance]``. A value *on* the threshold passes, as in
``orchestrator.reproduce.judge``.

Pure numpy / scipy: no Ray, MLflow or torch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SEED_KEY",
    "SeedRecord",
    "SeedStats",
    "Setting",
    "Verdict",
    "group_settings",
    "rank_settings",
    "seed_stats",
    "verdict",
]

DEFAULT_SEED_KEY = "train.seed"
CONFIDENCE = 0.95
DIRECTIONS = ("higher", "lower", "both")


class TrialLike(Protocol):
    """Anything with a trial's parameters (dotted name -> value) and its metrics (name -> value)."""

    @property
    def params(self) -> Mapping[str, Any]: ...

    @property
    def metrics(self) -> Mapping[str, float | None]: ...


@dataclass(frozen=True)
class SeedRecord:
    """One trial: its parameters (dotted name -> value, the seed among them), metrics (name -> value) and run."""

    params: Mapping[str, Any]
    metrics: Mapping[str, float | None]
    run_id: str | None = None


@dataclass(frozen=True)
class SeedStats:
    """Mean, sample std (ddof=1), 95% Student-t interval of the mean and n over a setting's seeds."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    n_missing: int = 0

    @property
    def half_width(self) -> float:
        """Half the width of the 95% interval (NaN for n < 2)."""
        return (self.ci_high - self.ci_low) / 2.0


def seed_stats(values: Iterable[float | None], confidence: float = CONFIDENCE) -> SeedStats:
    """Statistics of one metric over seeds.

    Args:
        values: one value per seed; None and non-finite values are left out (counted in ``n_missing``).
        confidence: the interval's coverage (0.95).

    Returns:
        :class:`SeedStats`; everything NaN when no value is finite, ``std`` and the interval NaN when n = 1.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    raw = list(values)
    kept = np.asarray([float(v) for v in raw if v is not None and math.isfinite(float(v))], dtype=np.float64)
    n = int(kept.size)
    missing = len(raw) - n
    nan = math.nan
    if n == 0:
        return SeedStats(nan, nan, nan, nan, 0, missing)
    mean = float(kept.mean())
    if n == 1:
        return SeedStats(mean, nan, nan, nan, 1, missing)
    std = float(kept.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    return SeedStats(mean, std, mean - half, mean + half, n, missing)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass
class Setting:
    """One setting: the varied parameters' values (seed excluded), its trials, their seeds and per-metric values.

    ``values[metric]`` holds one entry per trial, in record order (NaN where the trial lacks the metric)."""

    params: dict[str, Any]
    seeds: list[Any] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name=value, ...`` in the order the varied parameters were given ("(all trials)" when none is)."""
        return ", ".join(f"{k}={_canonical(v)}" for k, v in self.params.items()) or "(all trials)"

    @property
    def n(self) -> int:
        """Number of trials (seeds) in the setting."""
        return len(self.records)

    def stats(self, metric: str, confidence: float = CONFIDENCE) -> SeedStats:
        """:func:`seed_stats` of ``metric`` over this setting's trials (all NaN when no trial reports it)."""
        return seed_stats(self.values.get(metric, [math.nan] * self.n), confidence)

    def summary(self, metrics: Sequence[str] | None = None) -> dict[str, SeedStats]:
        """Metric -> :class:`SeedStats`, for ``metrics`` (default: every metric any trial reported)."""
        return {m: self.stats(m) for m in (self.values if metrics is None else metrics)}


def _metric_value(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def group_settings(
    records: Iterable[TrialLike], varied: Sequence[str], seed_key: str = DEFAULT_SEED_KEY
) -> list[Setting]:
    """Group trials by setting: the values of ``varied`` except ``seed_key``.

    Args:
        records: trials with ``.params`` (dotted name -> value; the seed under ``seed_key``) and ``.metrics``
            (name -> value), e.g. :class:`SeedRecord`.
        varied: the varied parameters' names (the sweep's axes); ``seed_key`` among them is ignored.
        seed_key: the seed parameter.

    Returns:
        Settings in the order of their first trial. Each metric any trial of the setting reports gets one value
        per trial (NaN for the trials that lack it). Two trials of one setting with the same seed are both kept
        (logged as a warning: the n then counts a seed twice).
    """
    keys = [k for k in dict.fromkeys(varied) if k != seed_key]
    by_key: dict[tuple[str, ...], Setting] = {}
    for rec in records:
        params = dict(rec.params)
        values = {k: params.get(k) for k in keys}
        ident = tuple(_canonical(values[k]) for k in keys)
        setting = by_key.get(ident)
        if setting is None:
            setting = by_key[ident] = Setting(params=values)
        seed = params.get(seed_key)
        if seed is not None and any(_canonical(s) == _canonical(seed) for s in setting.seeds):
            log.warning("setting %s has two trials with %s=%s", setting.label, seed_key, seed)
        before = setting.n
        for metric in rec.metrics:
            if metric not in setting.values:
                setting.values[metric] = [math.nan] * before
        for metric, column in setting.values.items():
            column.append(_metric_value(rec.metrics.get(metric)))
        setting.seeds.append(seed)
        setting.records.append(rec)
    return list(by_key.values())


def rank_settings(settings: Iterable[Setting], metric: str, mode: str = "max") -> list[Setting]:
    """Settings ordered by the seed mean of ``metric``: descending (``mode="max"``) or ascending (``"min"``).

    Settings with no finite mean come last; ties keep their input order (stable sort)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0

    def key(s: Setting) -> tuple[int, float]:
        mean = s.stats(metric).mean
        return (1, 0.0) if math.isnan(mean) else (0, sign * mean)

    return sorted(settings, key=key)


@dataclass(frozen=True)
class Verdict:
    """The reproduce verdict of one metric: regressed or not, and the band it was decided on.

    ``low, high``: the 95% t-interval of the seed mean (n >= 2), or the single value twice (n = 1);
    ``threshold``: ``reference - tolerance`` (``higher``), ``reference + tolerance`` (``lower``), or for
    ``both`` the lower bound (the upper is ``reference + tolerance``)."""

    regressed: bool
    mean: float
    low: float
    high: float
    n: int
    reference: float
    tolerance: float
    direction: str
    threshold: float

    def describe(self) -> str:
        """One line for the console, e.g. ``mean 401.2, 95% CI [398.1, 404.3] (n=3) vs >= 400 - 5``."""
        band = f"95% CI [{self.low:.4g}, {self.high:.4g}] (n={self.n})" if self.n >= 2 else "(n=1)"
        rule = {"higher": ">=", "lower": "<=", "both": "within"}[self.direction]
        sign = "±" if self.direction == "both" else ("-" if self.direction == "higher" else "+")
        result = "REGRESSED" if self.regressed else "pass"
        return f"{result}: mean {self.mean:.4g}, {band} vs {rule} {self.reference:g} {sign} {self.tolerance:g}"


def verdict(
    values: Iterable[float | None],
    reference: float,
    tolerance: float,
    direction: str = "higher",
    confidence: float = CONFIDENCE,
) -> Verdict:
    """Whether the measured seeds regress against ``reference`` (see the module docstring for the rule).

    Args:
        values: the metric of each seed (non-finite ones left out).
        reference: the reference value; ``tolerance``: the allowed shortfall (>= 0).
        direction: ``higher`` (higher is better), ``lower`` (medr, meanr, losses) or ``both``.

    Raises:
        ValueError: no finite value, a negative or non-finite tolerance, or an unknown direction.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not math.isfinite(tolerance) or tolerance < 0 or not math.isfinite(reference):
        raise ValueError(f"need a finite reference and tolerance >= 0, got {reference!r} and {tolerance!r}")
    st = seed_stats(values, confidence)
    if st.n == 0:
        raise ValueError("no finite value to judge")
    low, high = (st.ci_low, st.ci_high) if st.n >= 2 else (st.mean, st.mean)
    lower_bound, upper_bound = reference - tolerance, reference + tolerance
    if direction == "higher":
        regressed, threshold = high < lower_bound, lower_bound
    elif direction == "lower":
        regressed, threshold = low > upper_bound, upper_bound
    else:
        regressed, threshold = high < lower_bound or low > upper_bound, lower_bound
    return Verdict(bool(regressed), st.mean, low, high, st.n, reference, tolerance, direction, threshold)
