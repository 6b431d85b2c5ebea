"""Tests for orchestrator.results: seed statistics per setting, the reproduce verdict, the QueryRanks artifact and
the paired bootstrap over images.

References are computed independently in the tests: numpy / scipy.stats for the seed statistics, and a naive
float64 loop for the bootstrap (explicit per-resample image draws from the same Generator and seed, the resampled
query lists built image by image, recall counted with plain numpy).
"""

from __future__ import annotations

import math
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from orchestrator.results import (
    QueryRanks,
    SeedRecord,
    group_settings,
    paired_bootstrap,
    rank_settings,
    seed_stats,
    verdict,
)

KS = (1, 5, 10)


# ----------------------------------------------------------------------------- seed statistics
def scipy_stats(values: Sequence[float | None]) -> tuple[float, float, float, float]:
    """mean, std (ddof=1), 95% t-interval of the mean, computed with numpy + scipy.stats.t.interval."""
    arr = np.asarray(values, dtype=np.float64)
    mean, std = float(np.mean(arr)), float(np.std(arr, ddof=1))
    low, high = stats.t.interval(0.95, len(arr) - 1, loc=mean, scale=stats.sem(arr))
    return mean, std, float(low), float(high)


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_seed_stats_equal_scipy(n: int) -> None:
    values = list(np.random.default_rng(n).normal(400.0, 15.0, size=n))
    st = seed_stats(values)
    mean, std, low, high = scipy_stats(values)
    assert st.n == n and st.n_missing == 0
    assert st.mean == pytest.approx(mean, rel=1e-12)
    assert st.std == pytest.approx(std, rel=1e-12)
    assert (st.ci_low, st.ci_high) == pytest.approx((low, high), rel=1e-12)


def test_seed_stats_one_seed_and_missing_values() -> None:
    st = seed_stats([math.nan, 3.5, None])
    assert (st.mean, st.n, st.n_missing) == (3.5, 1, 2)
    assert math.isnan(st.std) and math.isnan(st.ci_low) and math.isnan(st.ci_high)
    empty = seed_stats([None, math.inf])
    assert empty.n == 0 and math.isnan(empty.mean)


def _records() -> list[SeedRecord]:
    rng = np.random.default_rng(7)
    out = []
    for family, lr in (("cusa", 1e-3), ("infonce", 1e-3), ("cusa", 1e-4)):
        for seed in (0, 1, 2):
            out.append(
                SeedRecord(
                    params={"loss.family": family, "optim.lr": lr, "train.seed": seed, "eval.ks": [1, 5, 10]},
                    metrics={"best/val/rsum": float(rng.normal(300, 20)), "final/val/rsum": float(rng.normal(290, 20))},
                    run_id=f"{family}-{lr}-{seed}",
                )
            )
    return out


def test_grouping_ignores_the_seed_and_keeps_other_params_apart() -> None:
    records = _records()
    settings = group_settings(records, ["loss.family", "optim.lr", "train.seed", "eval.ks"])
    assert [s.params for s in settings] == [
        {"loss.family": "cusa", "optim.lr": 1e-3, "eval.ks": [1, 5, 10]},
        {"loss.family": "infonce", "optim.lr": 1e-3, "eval.ks": [1, 5, 10]},
        {"loss.family": "cusa", "optim.lr": 1e-4, "eval.ks": [1, 5, 10]},
    ]
    for i, setting in enumerate(settings):
        mine = records[3 * i : 3 * i + 3]
        assert setting.seeds == [0, 1, 2] and setting.records == mine
        for metric in ("best/val/rsum", "final/val/rsum"):  # the best-epoch and final-epoch views
            got = setting.stats(metric)
            mean, std, low, high = scipy_stats([r.metrics[metric] for r in mine])
            assert (got.mean, got.std, got.ci_low, got.ci_high, got.n) == pytest.approx((mean, std, low, high, 3))
    # a parameter left out of `varied` does not split; a missing metric is NaN for that trial, not a zero
    one = group_settings(records, ["loss.family"])
    assert [len(s.records) for s in one] == [6, 3]
    extra = [*records[:2], SeedRecord(params={"loss.family": "cusa", "train.seed": 9}, metrics={"test/rsum": 1.0})]
    (merged,) = group_settings(extra, ["loss.family"])
    assert merged.stats("test/rsum").n == 1 and merged.stats("best/val/rsum").n == 2


def test_rank_settings_orders_by_mean_with_nan_last_and_ties_stable() -> None:
    def rec(name: str, values: list[float | None]) -> list[SeedRecord]:
        return [SeedRecord({"name": name, "train.seed": s}, {"m": v}) for s, v in enumerate(values)]

    records = rec("a", [1.0, 3.0]) + rec("b", [None]) + rec("c", [5.0, 5.0]) + rec("d", [2.0]) + rec("e", [1.5, 2.5])
    settings = group_settings(records, ["name", "train.seed"])
    assert [s.params["name"] for s in rank_settings(settings, "m", "max")] == ["c", "a", "d", "e", "b"]
    assert [s.params["name"] for s in rank_settings(settings, "m", "min")] == ["a", "d", "e", "c", "b"]
    with pytest.raises(ValueError, match="mode"):
        rank_settings(settings, "m", "best")


# ----------------------------------------------------------------------------- reproduce verdict
def test_verdict_passes_when_the_interval_reaches_the_threshold() -> None:
    values = [392.0, 398.0, 401.0]  # mean 397 < 400 - 2 = 398, but the t-interval reaches above 398
    _, _, low, high = scipy_stats(values)
    v = verdict(values, reference=400.0, tolerance=2.0, direction="higher")
    assert not v.regressed and (v.low, v.high) == pytest.approx((low, high)) and high > 398.0 > v.mean
    assert v.threshold == 398.0 and f"{high:.4g}" in v.describe() and v.describe().startswith("pass")


def test_verdict_regresses_when_the_whole_interval_lies_beyond() -> None:
    values = [390.0, 391.0, 392.0]
    _, _, low, high = scipy_stats(values)
    v = verdict(values, reference=400.0, tolerance=2.0)
    assert v.regressed and high < 398.0 and (v.low, v.high) == pytest.approx((low, high))
    assert v.describe().startswith("REGRESSED")


def test_verdict_mirrored_for_lower_is_better() -> None:
    # medr: reference 3, tolerance 1 -> regressed only if the interval lies entirely above 4
    assert verdict([5.0, 5.5, 6.0], 3.0, 1.0, "lower").regressed
    assert not verdict([3.0, 4.0, 6.0], 3.0, 1.0, "lower").regressed  # interval reaches below 4
    assert not verdict([1.0, 1.5, 1.2], 3.0, 1.0, "lower").regressed  # much better is never a regression
    assert verdict([1.0, 1.5, 1.2], 3.0, 1.0, "higher").regressed  # the same seeds, read as a recall
    assert verdict([10.0, 10.5], 3.0, 1.0, "both").regressed and not verdict([3.1, 3.3], 3.0, 1.0, "both").regressed


def test_verdict_one_seed_uses_the_value() -> None:
    assert verdict([397.9], 400.0, 2.0).regressed
    v = verdict([398.0], 400.0, 2.0)  # on the threshold: a pass, as reproduce.judge
    assert not v.regressed and (v.low, v.high, v.n) == (398.0, 398.0, 1)
    assert verdict([4.5], 3.0, 1.0, "lower").regressed and not verdict([4.0], 3.0, 1.0, "lower").regressed
    with pytest.raises(ValueError, match="no finite"):
        verdict([math.nan], 400.0, 2.0)
    with pytest.raises(ValueError, match="direction"):
        verdict([1.0], 400.0, 2.0, "up")


# ----------------------------------------------------------------------------- QueryRanks artifact
def make_ranks(rng: np.random.Generator, caps: list[int], quality: float, shuffle: bool = True) -> QueryRanks:
    """Random per-query ranks over len(caps) images with caps[i] captions each (caption order shuffled)."""
    n = len(caps)
    text_image = np.repeat(np.arange(n), caps)
    if shuffle:
        text_image = rng.permutation(text_image)
    m = text_image.size
    i2t = np.minimum(m, rng.geometric(quality, size=n))
    t2i = np.minimum(n, rng.geometric(quality, size=m))
    ids = np.asarray([f"coco_{1000 + i}" for i in range(n)])
    return QueryRanks.create(i2t, t2i, text_image, ids, KS)


def test_query_ranks_round_trip_from_recall_ranks(tmp_path: Path) -> None:
    import torch

    from orchestrator.evaluation.recall import ranks

    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 8, generator=gen), torch.randn(30, 8, generator=gen)
    text_image = np.arange(30) % 12
    i2t, t2i = ranks(img, txt, text_image)
    qr = QueryRanks.create(i2t, t2i, text_image, [f"im{i}" for i in range(12)], (1, 5))
    path = qr.write(tmp_path / "ranks" / "query_ranks.npz")
    assert path == tmp_path / "ranks" / "query_ranks.npz" and path.is_file()
    back = QueryRanks.read(path)
    for name in ("i2t", "t2i", "text_image", "image_ids"):
        assert np.array_equal(getattr(back, name), getattr(qr, name))
    assert back.i2t.dtype == np.int64 and back.image_ids.dtype.kind == "U" and back.ks == (1, 5)
    assert [p.name for p in path.parent.iterdir()] == ["query_ranks.npz"]  # no temp file left behind


def test_query_ranks_corrupt_and_wrong_files_name_the_file(tmp_path: Path) -> None:
    good = make_ranks(np.random.default_rng(0), [2, 3, 1], 0.5)
    path = good.write(tmp_path / "q.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"query ranks file .*corrupt\.npz"):
        QueryRanks.read(corrupt)
    fields = {"i2t": good.i2t, "t2i": good.t2i, "text_image": good.text_image, "image_ids": good.image_ids}
    as_objects = good.image_ids.astype(object)  # saved pickled: refused by allow_pickle=False
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "missing": ({**fields}, "missing \\['ks', 'version'\\]"),
        "float": ({**fields, "i2t": good.i2t.astype(float), "ks": np.array(KS), "version": 1}, "i2t must be"),
        "shape": ({**fields, "t2i": good.t2i[:-1], "ks": np.array(KS), "version": 1}, "text_image has"),
        "range": ({**fields, "t2i": good.t2i * 0, "ks": np.array(KS), "version": 1}, "t2i ranks must lie"),
        "ids": ({**fields, "image_ids": np.arange(3), "ks": np.array(KS), "version": 1}, "image_ids must be"),
        "object": (
            {**fields, "image_ids": as_objects, "ks": np.array(KS), "version": 1},
            "cannot be read",
        ),
        "version": ({**fields, "ks": np.array(KS), "version": 2}, "format version"),
    }
    for name, (arrays, message) in cases.items():
        bad = tmp_path / f"{name}.npz"
        with open(bad, "wb") as fh:
            np.savez(fh, **arrays)
        with pytest.raises(ValueError, match=message) as err:
            QueryRanks.read(bad)
        assert str(bad) in str(err.value), name
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(
            f"{k}.npy" for k in ("i2t", "t2i", "text_image", "image_ids", "ks", "version")
        )


# ----------------------------------------------------------------------------- paired bootstrap
def captions_by_image(qr: QueryRanks) -> dict[int, list[int]]:
    """Image row -> its caption rows, by a plain scan of ``text_image``."""
    out: dict[int, list[int]] = {i: [] for i in range(qr.n_images)}
    for j, i in enumerate(qr.text_image.tolist()):
        out[i].append(j)
    return out


def naive_recalls(qr: QueryRanks, images: np.ndarray, captions_of: dict[int, list[int]]) -> np.ndarray:
    """Recalls + RSUM on the resample ``images`` (drawn image rows): the query lists built image by image."""
    i2t = [int(qr.i2t[i]) for i in images]
    t2i = [int(qr.t2i[j]) for i in images for j in captions_of[int(i)]]
    row = [100.0 * np.mean(np.asarray(i2t) <= k) for k in KS] + [100.0 * np.mean(np.asarray(t2i) <= k) for k in KS]
    return np.asarray([*row, sum(row)], dtype=np.float64)


def naive_per_caption(qr: QueryRanks, images: np.ndarray, captions: np.ndarray) -> np.ndarray:
    """The WRONG scheme, for comparison: captions drawn independently of their images."""
    row = [100.0 * np.mean(qr.i2t[images] <= k) for k in KS] + [100.0 * np.mean(qr.t2i[captions] <= k) for k in KS]
    return np.asarray([*row, sum(row)], dtype=np.float64)


def naive_bootstrap(runs_a: dict, runs_b: dict, resamples: int, seed: int, per_caption: bool = False) -> np.ndarray:
    """(R, 2K+1) deltas B - A, each setting's metrics averaged over the matched seeds on each resample."""
    matched = [s for s in runs_a if s in runs_b]
    ref = runs_a[matched[0]]
    captions_of = captions_by_image(ref)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(resamples):
        images = rng.integers(0, ref.n_images, size=ref.n_images)
        if per_caption:
            captions = rng.integers(0, ref.n_captions, size=ref.n_captions)
            a = np.mean([naive_per_caption(runs_a[s], images, captions) for s in matched], axis=0)
            b = np.mean([naive_per_caption(runs_b[s], images, captions) for s in matched], axis=0)
        else:
            a = np.mean([naive_recalls(runs_a[s], images, captions_of) for s in matched], axis=0)
            b = np.mean([naive_recalls(runs_b[s], images, captions_of) for s in matched], axis=0)
        out.append(b - a)
    return np.asarray(out)


def test_paired_bootstrap_equals_a_naive_loop_pooled_over_matched_seeds() -> None:
    rng = np.random.default_rng(3)
    caps = list(rng.integers(1, 6, size=40))
    base = make_ranks(rng, caps, 0.2)
    text_image, ids = base.text_image, base.image_ids

    def like(quality: float) -> QueryRanks:
        r = make_ranks(rng, caps, quality)
        return QueryRanks.create(r.i2t, r.t2i, text_image, ids, KS)

    runs_a = {0: base, 1: like(0.2), 2: like(0.2), 7: like(0.2)}  # seed 7: no partner, left out
    runs_b = {2: like(0.3), 0: like(0.3), 1: like(0.3), 5: like(0.3)}  # seed 5: no partner
    got = paired_bootstrap(runs_a, runs_b, resamples=200, seed=11)
    want = naive_bootstrap(runs_a, runs_b, 200, 11)
    assert got.seeds == (0, 1, 2) and set(got.unmatched) == {5, 7}
    np.testing.assert_allclose(got.deltas, want, rtol=0, atol=1e-9)
    everything, captions_of = np.arange(base.n_images), captions_by_image(base)
    full_a = np.mean([naive_recalls(runs_a[s], everything, captions_of) for s in (0, 1, 2)], axis=0)
    full_b = np.mean([naive_recalls(runs_b[s], everything, captions_of) for s in (0, 1, 2)], axis=0)
    names = [f"i2t_r{k}" for k in KS] + [f"t2i_r{k}" for k in KS] + ["rsum"]
    assert list(got.metrics) == names
    for j, name in enumerate(names):
        m = got.metrics[name]
        low, high = np.percentile(want[:, j], [2.5, 97.5])
        d = want[:, j]  # float noise aside (|d| < 1e-9 is a tie: a real delta is a multiple of 100 / (3 M))
        p = min(1.0, 2 * (1 + min(np.sum(d <= 1e-9), np.sum(d >= -1e-9))) / 201)
        assert (m.baseline, m.candidate, m.delta) == pytest.approx(
            (full_a[j], full_b[j], full_b[j] - full_a[j]), abs=1e-9
        )
        assert (m.ci_low, m.ci_high, m.p_value) == pytest.approx((low, high, p), abs=1e-9)


def test_full_set_values_equal_recall_from_ranks() -> None:
    from orchestrator.evaluation.recall import recall_from_ranks

    rng = np.random.default_rng(5)
    a, b = make_ranks(rng, [3] * 20, 0.3), make_ranks(rng, [3] * 20, 0.3)
    b = QueryRanks.create(b.i2t, b.t2i, a.text_image, a.image_ids, KS)
    got = paired_bootstrap(a, b, resamples=10, seed=0)
    ref_a, ref_b = recall_from_ranks(a.i2t, a.t2i, KS), recall_from_ranks(b.i2t, b.t2i, KS)
    for name, m in got.metrics.items():
        assert (m.baseline, m.candidate) == pytest.approx((ref_a[name], ref_b[name]), abs=1e-9)


def test_images_are_resampled_with_all_their_captions() -> None:
    """Captions of an image hit or miss together; resampling them independently would understate the spread."""
    rng = np.random.default_rng(9)
    n, per = 120, 5
    text_image = np.repeat(np.arange(n), per)
    ids = np.asarray([f"im{i}" for i in range(n)])
    good_a, good_b = rng.random(n) < 0.5, rng.random(n) < 0.6
    a = QueryRanks.create(np.ones(n, int), np.where(good_a[text_image], 1, 50), text_image, ids, KS)
    b = QueryRanks.create(np.ones(n, int), np.where(good_b[text_image], 1, 50), text_image, ids, KS)
    got = paired_bootstrap(a, b, resamples=300, seed=1)
    np.testing.assert_allclose(got.deltas, naive_bootstrap({None: a}, {None: b}, 300, 1), rtol=0, atol=1e-9)
    wrong = naive_bootstrap({None: a}, {None: b}, 300, 1, per_caption=True)
    t2i_r1 = KS.index(1) + len(KS)
    width = np.subtract(*np.percentile(got.deltas[:, t2i_r1], [97.5, 2.5]))
    width_wrong = np.subtract(*np.percentile(wrong[:, t2i_r1], [97.5, 2.5]))
    assert width > 1.5 * width_wrong  # ~sqrt(5) wider: 5 captions per image carry one image's worth of evidence


def test_identical_settings_give_zero_delta_and_p_one() -> None:
    a = make_ranks(np.random.default_rng(2), [2] * 30, 0.4)
    got = paired_bootstrap({0: a}, {0: a}, resamples=50, seed=0)
    assert not got.deltas.any()
    assert all(m.delta == 0 and m.p_value == 1.0 and m.ci_low == m.ci_high == 0 for m in got.metrics.values())


def test_paired_bootstrap_refuses_other_images_or_captions_or_no_matched_seed() -> None:
    rng = np.random.default_rng(4)
    a = make_ranks(rng, [2, 2, 2, 2], 0.4, shuffle=False)
    other_ids = QueryRanks.create(a.i2t, a.t2i, a.text_image, np.asarray(["coco_1000", "x", "y", "z"]), KS)
    with pytest.raises(ValueError, match="image ids differ .*row 1: 'x' vs 'coco_1001'"):
        paired_bootstrap(a, other_ids)
    fewer = make_ranks(rng, [2, 2, 2], 0.4)
    with pytest.raises(ValueError, match="3 vs 4 images"):
        paired_bootstrap({0: a}, {0: fewer})
    moved = QueryRanks.create(a.i2t, a.t2i, a.text_image[::-1].copy(), a.image_ids, KS)
    with pytest.raises(ValueError, match="captions are assigned to images differently"):
        paired_bootstrap(a, moved)
    with pytest.raises(ValueError, match="no matched seeds"):
        paired_bootstrap({0: a}, {1: a})
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(a, a, resamples=0)


def test_results_package_imports_no_torch_ray_or_mlflow() -> None:
    import subprocess

    code = "import sys, orchestrator.results; print(sorted({'torch','ray','mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
