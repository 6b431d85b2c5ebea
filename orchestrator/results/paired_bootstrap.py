"""Paired bootstrap over evaluation images: is setting B better than baseline A beyond what the choice of test
images explains?

**Method.** Both settings were evaluated on the same N images and M captions (their per-query ranks are stored as
:class:`~orchestrator.results.query_ranks.QueryRanks`; the image ids and the caption -> image assignment must be
identical, else the comparison is refused). One bootstrap resample draws N images uniformly with replacement;
each drawn image brings its image->text query and the text->image queries of *all* its captions, so the captions
of one image are never resampled independently (they are not independent: they describe the same picture). On
each resample, for both settings on that very resample, Recall@K is the percentage of the resampled queries
ranked within K (i2t over the N drawn images, t2i over the drawn images' captions, an image drawn twice counting
twice) and RSUM the sum of the 2 x len(ks) recalls. With several seeds per setting, seed s of A is paired with
seed s of B (seeds present on one side only are left out) and each setting's metric on a resample is the mean
over the matched seeds. For each metric we report

* ``delta``: B - A on the full evaluation set (each side averaged over the matched seeds);
* the 95% percentile interval of the resampled deltas (``numpy.percentile``, linear interpolation);
* a two-sided p-value, ``p = min(1, 2 · min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (R + 1))`` over the R resampled
  deltas d*: twice the smaller bootstrap tail beyond zero, with the +1 that keeps a finite number of resamples
  from ever claiming p = 0 (the smallest reportable p is 2 / (R + 1)). A resample on which B and A tie counts
  in both tails (decided on exact integer hit counts, not on rounded percentages). p is small when the
  resampled deltas rarely reach zero, and 1 when B and A score the same on every resample.

Resample r (r = 0 .. R-1) draws its images as ``rng.integers(0, N, size=N)``, in that order, from
``rng = numpy.random.default_rng(seed)``, so a result is reproducible from its seed. The computation works on
per-image sums (for each image: its i2t hit, how many of its captions hit, how many captions it has) multiplied
by each resample's image counts, so R = 1000 over 5k images and 25k captions takes a fraction of a second.

The interval reflects the variation over evaluation images only; the variation over training seeds is what
:mod:`orchestrator.results.settings` reports. medr and meanr are not compared here.

Pure numpy: no Ray, MLflow or torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.results.query_ranks import QueryRanks

__all__ = ["MetricDelta", "PairedBootstrap", "metric_names", "paired_bootstrap"]

_BLOCK = 256  # resamples whose image counts are held at once: (256, N) float64


@dataclass(frozen=True)
class MetricDelta:
    """One metric of the comparison: A and B on the full set, ``delta = candidate - baseline``, its interval
    ``[ci_low, ci_high]`` over the resamples and the two-sided bootstrap p-value (see the module docstring)."""

    metric: str
    baseline: float
    candidate: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class PairedBootstrap:
    """The comparison of a candidate setting with the baseline.

    ``metrics``: metric -> :class:`MetricDelta`, ordered ``i2t_r{k}``, ``t2i_r{k}``, ``rsum``;
    ``deltas``: (R, len(metrics)) float64, the delta of each resample, columns in the order of ``metrics``;
    ``seeds``: the matched seeds; ``unmatched``: seeds present on one side only (left out)."""

    metrics: dict[str, MetricDelta]
    deltas: np.ndarray
    seeds: tuple[Any, ...]
    unmatched: tuple[Any, ...]
    resamples: int
    seed: int
    confidence: float
    n_images: int
    n_captions: int


def metric_names(ks: Sequence[int]) -> list[str]:
    """The compared metrics for these K: ``i2t_r{k}`` for each k, ``t2i_r{k}`` for each k, then ``rsum``."""
    return [f"i2t_r{int(k)}" for k in ks] + [f"t2i_r{int(k)}" for k in ks] + ["rsum"]


def _as_runs(side: QueryRanks | Mapping[Any, QueryRanks], name: str) -> dict[Any, QueryRanks]:
    if isinstance(side, QueryRanks):
        return {None: side}
    runs = dict(side)
    if not runs:
        raise ValueError(f"{name}: no query ranks given")
    for seed, qr in runs.items():
        if not isinstance(qr, QueryRanks):
            raise TypeError(f"{name} seed {seed!r}: expected QueryRanks, got {type(qr).__name__}")
    return runs


def _check_same_queries(ref: QueryRanks, ref_name: str, other: QueryRanks, other_name: str) -> None:
    """Refuse two rank sets that are not over the same images and captions."""
    if other.image_ids.shape != ref.image_ids.shape or not np.array_equal(other.image_ids, ref.image_ids):
        detail = f"{other.n_images} vs {ref.n_images} images"
        if other.n_images == ref.n_images:
            row = int(np.flatnonzero(other.image_ids != ref.image_ids)[0])
            detail += f"; first difference at row {row}: {str(other.image_ids[row])!r} vs {str(ref.image_ids[row])!r}"
        raise ValueError(
            f"cannot compare {other_name} with {ref_name}: their evaluation image ids differ ({detail}); "
            "a paired bootstrap needs both evaluated on the same images in the same order"
        )
    if not np.array_equal(other.text_image, ref.text_image):
        raise ValueError(
            f"cannot compare {other_name} with {ref_name}: same images but their captions are assigned to images "
            f"differently ({other.n_captions} vs {ref.n_captions} captions)"
        )


def _per_image(qr: QueryRanks, ks: Sequence[int]) -> np.ndarray:
    """(N, 2K) float64: per image, its i2t hit at each k (0/1), then how many of its captions hit at each k."""
    n = qr.n_images
    cols: list[np.ndarray] = [(qr.i2t <= k).astype(np.float64) for k in ks]
    cols += [np.bincount(qr.text_image, weights=(qr.t2i <= k).astype(np.float64), minlength=n) for k in ks]
    return np.stack(cols, axis=1)


def _recalls(hits: np.ndarray, n_drawn: float | np.ndarray, n_caps: float | np.ndarray, k: int) -> np.ndarray:
    """(..., 2K+1) recalls in percent and RSUM from (..., 2K) hit counts (summed over ``S`` seeds, so each
    recall is also divided by S: pass ``n_drawn = S·N`` and ``n_caps = S·captions``)."""
    i2t = 100.0 * hits[..., :k] / np.asarray(n_drawn)[..., None]
    t2i = 100.0 * hits[..., k:] / np.asarray(n_caps)[..., None]
    out = np.concatenate([i2t, t2i], axis=-1)
    return np.concatenate([out, out.sum(axis=-1, keepdims=True)], axis=-1)


def _signs(diff: np.ndarray, n_drawn: float, n_caps: np.ndarray, k: int) -> np.ndarray:
    """(R, 2K+1) exact signs of the deltas from the integer hit differences ``diff`` (R, 2K): for RSUM the sign of
    ``sum(i2t diff)·captions + sum(t2i diff)·N`` (integers, exact in float64), so a tie is a tie, not ±1e-16."""
    rsum = diff[:, :k].sum(axis=1) * n_caps + diff[:, k:].sum(axis=1) * n_drawn
    return np.sign(np.concatenate([diff, rsum[:, None]], axis=1))


def _resampled(
    hits_a: np.ndarray, hits_b: np.ndarray, caps: np.ndarray, k: int, s: int, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(R, 2K+1) deltas B - A on each resample and their exact signs.

    ``hits_*``: (N, 2K) per-image hit counts summed over the S matched seeds (integers); ``caps``: (N,)."""
    n = caps.shape[0]
    rng = np.random.default_rng(seed)
    both = np.concatenate([hits_a, hits_b, caps[:, None]], axis=1)  # (N, 4K+1)
    deltas = np.empty((resamples, 2 * k + 1), dtype=np.float64)
    signs = np.empty_like(deltas)
    counts = np.empty((min(_BLOCK, resamples), n), dtype=np.float64)
    for start in range(0, resamples, _BLOCK):
        rows = min(_BLOCK, resamples - start)
        for r in range(rows):
            counts[r] = np.bincount(rng.integers(0, n, size=n), minlength=n)
        sums = counts[:rows] @ both  # (rows, 4K+1): hits of A, hits of B, captions drawn; integers, exact
        n_caps = sums[:, -1]
        a = _recalls(sums[:, : 2 * k], s * n, s * n_caps, k)
        b = _recalls(sums[:, 2 * k : 4 * k], s * n, s * n_caps, k)
        deltas[start : start + rows] = b - a
        signs[start : start + rows] = _signs(sums[:, 2 * k : 4 * k] - sums[:, : 2 * k], n, n_caps, k)
    return deltas, signs


def paired_bootstrap(
    baseline: QueryRanks | Mapping[Any, QueryRanks],
    candidate: QueryRanks | Mapping[Any, QueryRanks],
    *,
    resamples: int = 1000,
    seed: int = 0,
    ks: Sequence[int] | None = None,
    confidence: float = 0.95,
) -> PairedBootstrap:
    """Compare ``candidate`` (B) with ``baseline`` (A) by a paired bootstrap over images (module docstring).

    Args:
        baseline, candidate: one :class:`QueryRanks`, or training seed -> QueryRanks (seeds matched by key).
        resamples: R, the number of bootstrap resamples (>= 1).
        seed: seed of the resampling Generator.
        ks: the K of the compared Recall@K (default: the baseline's ``ks``).
        confidence: the interval's coverage.

    Raises:
        ValueError: no matched seed, different evaluation images or caption assignments, bad arguments.
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    runs_a, runs_b = _as_runs(baseline, "baseline"), _as_runs(candidate, "candidate")
    matched = tuple(s for s in runs_a if s in runs_b)
    if not matched:
        raise ValueError(
            f"no matched seeds: baseline has {sorted(map(repr, runs_a))}, candidate {sorted(map(repr, runs_b))}"
        )
    unmatched = tuple(s for s in runs_a if s not in runs_b) + tuple(s for s in runs_b if s not in runs_a)
    ref = runs_a[matched[0]]
    for s in matched:
        _check_same_queries(ref, f"baseline seed {matched[0]!r}", runs_a[s], f"baseline seed {s!r}")
        _check_same_queries(ref, f"baseline seed {matched[0]!r}", runs_b[s], f"candidate seed {s!r}")
    ks = tuple(int(k) for k in (ref.ks if ks is None else ks))
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    hits_a = np.sum([_per_image(runs_a[s], ks) for s in matched], axis=0)  # (N, 2K) integer counts
    hits_b = np.sum([_per_image(runs_b[s], ks) for s in matched], axis=0)
    caps = np.bincount(ref.text_image, minlength=ref.n_images).astype(np.float64)  # (N,)
    k, s = len(ks), len(matched)
    full_a = _recalls(hits_a.sum(axis=0), s * ref.n_images, s * ref.n_captions, k)
    full_b = _recalls(hits_b.sum(axis=0), s * ref.n_images, s * ref.n_captions, k)
    deltas, signs = _resampled(hits_a, hits_b, caps, k, s, resamples, seed)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(deltas, [tail, 100.0 - tail], axis=0)
    below, above = (signs <= 0).sum(axis=0), (signs >= 0).sum(axis=0)
    p = np.minimum(1.0, 2.0 * (1.0 + np.minimum(below, above)) / (resamples + 1.0))
    names = metric_names(ks)
    metrics = {
        name: MetricDelta(
            metric=name,
            baseline=float(full_a[j]),
            candidate=float(full_b[j]),
            delta=float(full_b[j] - full_a[j]),
            ci_low=float(low[j]),
            ci_high=float(high[j]),
            p_value=float(p[j]),
        )
        for j, name in enumerate(names)
    }
    return PairedBootstrap(
        metrics=metrics,
        deltas=deltas,
        seeds=matched,
        unmatched=unmatched,
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        n_images=ref.n_images,
        n_captions=ref.n_captions,
    )
