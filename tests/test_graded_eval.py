"""Graded-relevance evaluation: NDCG@K against sklearn, Kendall's tau-b against scipy, relevance against loops."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from sklearn.metrics import ndcg_score

from orchestrator.data.synthetic import build_synthetic_split
from orchestrator.evaluation.graded import (
    CaptionRelevance,
    ExactRelevance,
    graded_metrics,
    kendall_tau_b_rows,
    ndcg_rows,
)


def dense(matrix: np.ndarray):
    """A RelevanceFn reading a dense (N, M) matrix."""
    r = torch.from_numpy(matrix)
    return lambda im, cap: r[im][:, cap]


def scipy_tau_mean(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant rows: nan
        taus = np.array([kendalltau(a, b).statistic for a, b in zip(x, y)])
    return float(np.nanmean(taus))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_graded_metrics_match_sklearn_ndcg_and_scipy_kendall(chunk_size):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((23, 6))
    txt = rng.standard_normal((61, 6))
    rel = rng.random((23, 61)) * (rng.random((23, 61)) < 0.4)  # sparse graded gains, many exact zeros
    rel[3] = 0.0  # an image query with no relevant caption: NDCG 0 (sklearn's convention), tau undefined
    sims = img @ txt.T
    got = graded_metrics(
        torch.from_numpy(img), torch.from_numpy(txt), dense(rel), ks=(1, 10, 25), chunk_size=chunk_size
    )
    for k, key in ((1, "ndcg1"), (10, "ndcg10"), (25, "ndcg25"), (None, "ndcg_all")):
        assert got[f"i2t_{key}"] == pytest.approx(ndcg_score(rel, sims, k=k), abs=1e-12)
        assert got[f"t2i_{key}"] == pytest.approx(ndcg_score(rel.T, sims.T, k=k), abs=1e-12)
    assert got["i2t_kendall_tau"] == pytest.approx(scipy_tau_mean(sims, rel), abs=1e-12)
    assert got["t2i_kendall_tau"] == pytest.approx(scipy_tau_mean(sims.T, rel.T), abs=1e-12)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 16, 17, 100, 257])
def test_kendall_tau_b_with_ties_matches_scipy(length):
    rng = np.random.default_rng(length)
    cases = [
        (rng.integers(0, 4, (9, length)), rng.integers(0, 3, (9, length))),  # ties on both sides
        (rng.standard_normal((9, length)), rng.integers(0, 2, (9, length))),  # binary relevance
        (rng.standard_normal((9, length)), rng.standard_normal((9, length))),  # no ties
    ]
    for x, y in cases:
        x, y = x.astype(np.float32), y.astype(np.float32)
        got = kendall_tau_b_rows(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on length-1 rows (nan)
            want = np.array([kendalltau(a, b).statistic for a, b in zip(x, y)])
        np.testing.assert_allclose(got, want, atol=1e-12, equal_nan=True)


def test_ndcg_rows_whole_list_equals_sklearn_and_perfect_ranking_is_one():
    rng = np.random.default_rng(3)
    gains = rng.random((5, 40))
    scores = rng.standard_normal((5, 40))
    got = ndcg_rows(torch.from_numpy(scores), torch.from_numpy(gains)).numpy()
    want = [ndcg_score(gains[i : i + 1], scores[i : i + 1]) for i in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert ndcg_rows(torch.from_numpy(gains), torch.from_numpy(gains), 10).numpy() == pytest.approx(1.0)


def naive_caption_relevance(feats: np.ndarray, owners: np.ndarray, num_images: int, agg: str) -> np.ndarray:
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = np.zeros((num_images, len(owners)))
    for i in range(num_images):
        own = [c for c in range(len(owners)) if owners[c] == i]
        for c in range(len(owners)):
            sims = [float(np.dot(f[o], f[c])) for o in own]
            value = max(sims) if agg == "max" else sum(sims) / len(sims)
            out[i, c] = max(value, 0.0)
    return out


@pytest.mark.parametrize("agg", ["max", "mean"])
def test_caption_relevance_matches_a_loop_with_irregular_caption_counts(agg):
    rng = np.random.default_rng(4)
    counts = np.array([1, 5, 2, 6, 3, 4, 5])
    owners = rng.permutation(np.repeat(np.arange(len(counts)), counts))  # captions in any order
    feats = rng.standard_normal((len(owners), 8))
    want = naive_caption_relevance(feats, owners, len(counts), agg)
    rel = CaptionRelevance(feats, owners, len(counts), agg)
    full = rel(torch.arange(len(counts)), torch.arange(len(owners))).numpy()
    np.testing.assert_allclose(full, want, atol=1e-5)
    block = rel(torch.tensor([5, 1]), torch.tensor([9, 0, 3])).numpy()
    np.testing.assert_allclose(block, want[[5, 1]][:, [9, 0, 3]], atol=1e-5)
    if agg == "max":  # a ground-truth caption is one of the image's own captions
        assert np.allclose(full[owners, np.arange(len(owners))], 1.0, atol=1e-5)


def test_graded_metrics_with_caption_relevance_match_sklearn_on_irregular_counts():
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 7, 30)
    owners = np.repeat(np.arange(30), counts)
    teacher = rng.standard_normal((len(owners), 12))
    img = torch.nn.functional.normalize(torch.randn(30, 16, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img[owners] + torch.randn(len(owners), 16, dtype=torch.float64), dim=1)
    rel_fn = CaptionRelevance(teacher, owners, 30, "mean")
    got = graded_metrics(img, txt, rel_fn, ks=(10,), chunk_size=8)
    rel = naive_caption_relevance(teacher, owners, 30, "mean")
    sims = (img @ txt.T).numpy()
    assert got["i2t_ndcg10"] == pytest.approx(ndcg_score(rel, sims, k=10), abs=1e-6)
    assert got["t2i_ndcg_all"] == pytest.approx(ndcg_score(rel.T, sims.T), abs=1e-6)
    assert got["t2i_kendall_tau"] == pytest.approx(scipy_tau_mean(sims.T, rel.T.astype(np.float32)), abs=1e-6)


def test_exact_relevance_of_synthetic_data_and_kendall_candidate_subset():
    index = build_synthetic_split("val", num_images=24, seed=1, image_size=16, captions_per_image=(1, 3))
    full = index.relevance(np.arange(index.num_images), np.arange(index.num_captions)).astype(np.float64)
    exact = ExactRelevance(index.relevance)
    block = exact(torch.tensor([3, 0]), torch.tensor([5, 1, 2])).numpy()
    np.testing.assert_array_equal(block, full[[3, 0]][:, [5, 1, 2]])
    rng = np.random.default_rng(6)
    img = rng.standard_normal((index.num_images, 8))
    txt = rng.standard_normal((index.num_captions, 8))
    sims = img @ txt.T
    got = graded_metrics(
        torch.from_numpy(img), torch.from_numpy(txt), exact, ks=(10,), kendall_candidates=11, seed=3, chunk_size=5
    )
    assert got["i2t_ndcg10"] == pytest.approx(ndcg_score(full, sims, k=10), abs=1e-6)
    # the subset is the documented draw: randperm(seed) of the candidates, first 11, ascending
    cols = torch.randperm(index.num_captions, generator=torch.Generator().manual_seed(3))[:11].sort().values.numpy()
    rows = torch.randperm(index.num_images, generator=torch.Generator().manual_seed(3))[:11].sort().values.numpy()
    assert got["i2t_kendall_tau"] == pytest.approx(
        scipy_tau_mean(sims[:, cols], full[:, cols].astype(np.float32)), abs=1e-6
    )
    assert got["t2i_kendall_tau"] == pytest.approx(
        scipy_tau_mean(sims.T[:, rows], full.T[:, rows].astype(np.float32)), abs=1e-6
    )
