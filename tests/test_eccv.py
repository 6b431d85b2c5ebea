"""ECCV Caption / CxC / COCO 1K+5K through the eccv-caption reference package, and ``itr eval --eccv``."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("eccv_caption")

from orchestrator.cli import main  # noqa: E402
from orchestrator.evaluation import eccv as eccv_module  # noqa: E402
from orchestrator.evaluation import eccv_metrics, retrieval_metrics  # noqa: E402
from orchestrator.evaluation.eccv import eccv_rankings  # noqa: E402

EXPECTED_METRICS = ["eccv_r1", "eccv_map_at_r", "eccv_rprecision"] + [
    f"{name}_r{k}" for name in ("coco_1k", "coco_5k", "cxc") for k in (1, 5, 10)
]


def fresh_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics
    return Metrics()


@pytest.fixture(scope="module")
def ref():
    return fresh_reference()


@pytest.fixture(scope="module")
def test_split(ref):
    """The package's 5K test images in its caption order (5 consecutive captions each) and their captions."""
    cids = np.asarray(ref.coco_ids, dtype=np.int64)
    owner_ids = np.asarray([ref.coco_gts["t2i"][int(c)][0] for c in cids], dtype=np.int64)
    _, first = np.unique(owner_ids, return_index=True)
    iids = owner_ids[np.sort(first)]
    row = {int(i): r for r, i in enumerate(iids)}
    text_image = np.asarray([row[int(i)] for i in owner_ids], dtype=np.int64)
    return iids, cids, text_image


def random_rankings_with_positives(ref, rng, k=60):
    """Random ranked lists over the package's ids, each salted with a few of the query's ECCV / COCO positives at
    random positions (so every metric is far from 0)."""
    iids = np.fromiter(ref.coco_gts["i2t"].keys(), dtype=np.int64)
    cids = np.asarray(ref.coco_ids, dtype=np.int64)

    def lists(queries, pool, positives_of):
        out = {}
        for q in queries.tolist():
            items = pool[rng.choice(len(pool), k, replace=False)].tolist()
            pos = list(dict.fromkeys(positives_of(q)))
            rng.shuffle(pos)
            for p in pos[: rng.integers(0, 4)]:
                if p not in items:
                    items[int(rng.integers(0, k))] = p
            out[q] = items
        return out

    def i2t_pos(q):
        return ref.eccv_gts["i2t"].get(q, []) + ref.coco_gts["i2t"][q]

    def t2i_pos(q):
        return ref.eccv_gts["t2i"].get(q, []) + ref.cxc_gts["t2i"].get(q, []) + ref.coco_gts["t2i"][q]

    return lists(iids, cids, i2t_pos), lists(cids, iids, t2i_pos)


def test_eccv_metrics_equal_100x_package_compute_all_metrics(ref):
    rng = np.random.default_rng(0)
    i2t, t2i = random_rankings_with_positives(ref, rng)
    ours = eccv_metrics(i2t, t2i)
    theirs = fresh_reference().compute_all_metrics(
        i2t,
        t2i,
        target_metrics=(
            "eccv_r1",
            "eccv_map_at_r",
            "eccv_rprecision",
            "coco_1k_recalls",
            "coco_5k_recalls",
            "cxc_recalls",
        ),
        Ks=(1, 5, 10),
        verbose=False,
    )
    assert sorted(ours) == sorted(f"{m}/{d}" for m in EXPECTED_METRICS for d in ("i2t", "t2i"))
    for metric in EXPECTED_METRICS:
        for direction in ("i2t", "t2i"):
            assert ours[f"{metric}/{direction}"] == pytest.approx(100 * theirs[metric][direction], abs=1e-9)
    # the salted positives make every metric informative; the two directions differ
    assert all(v > 0.3 for v in ours.values())
    assert ours["eccv_map_at_r/i2t"] != ours["eccv_map_at_r/t2i"]


def test_eccv_metrics_rejects_short_and_missing_lists(ref):
    rng = np.random.default_rng(1)
    i2t, t2i = random_rankings_with_positives(ref, rng, k=50)
    short = dict(i2t)
    first = next(iter(short))
    short[first] = short[first][:49]
    with pytest.raises(ValueError, match="shorter than 50"):
        eccv_metrics(short, t2i)
    missing = dict(t2i)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="no ranking"):
        eccv_metrics(i2t, missing)


def test_rankings_from_embeddings_match_a_float64_argsort():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((37, 8))
    txt = rng.standard_normal((90, 8))
    iids, cids = rng.permutation(1000)[:37] + 5, rng.permutation(10**6)[:90] + 7
    i2t, t2i = eccv_rankings(
        torch.from_numpy(img), torch.from_numpy(txt), iids.tolist(), cids.tolist(), k=20, chunk_size=6
    )
    sims = img @ txt.T
    for r, i in enumerate(iids):
        assert i2t[int(i)] == cids[np.argsort(-sims[r], kind="stable")[:20]].tolist()
    for c, j in enumerate(cids):
        assert t2i[int(j)] == iids[np.argsort(-sims[:, c], kind="stable")[:20]].tolist()


def standin_embeddings(test_split, noise: float, seed: int = 0):
    """A synthetic stand-in for a model's COCO 5K test embeddings: random image vectors, each caption its image's
    vector plus noise (so retrieval is informative but imperfect)."""
    iids, cids, text_image = test_split
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(len(iids), 32, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(
        img[torch.from_numpy(text_image)] + noise * torch.randn(len(cids), 32, generator=gen), dim=1
    )
    return img, txt


def test_itr_eval_eccv_on_a_synthetic_5k_standin(tmp_path, test_split, capsys):
    iids, cids, text_image = test_split
    img, txt = standin_embeddings(test_split, noise=0.3)
    npz = tmp_path / "coco5k_standin.npz"
    np.savez(
        npz,
        image_emb=img.numpy(),
        text_emb=txt.numpy(),
        image_ids=iids,
        text_image_ids=iids[text_image],
        caption_ids=cids,
    )
    out = tmp_path / "m.json"
    assert main(["eval", "--embeddings", str(npz), "--eccv", "--folds", "5", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert {f"{m}/{d}" for m in EXPECTED_METRICS for d in ("i2t", "t2i")} <= set(metrics)
    # the package's COCO 5K recalls are the plain recalls of the same embeddings (our chunked ranks):
    # an independent check of the id bookkeeping in both directions
    plain = retrieval_metrics(img, txt, text_image)
    for k in (1, 5, 10):
        assert metrics[f"coco_5k_r{k}/i2t"] == pytest.approx(plain[f"i2t_r{k}"], abs=1e-9)
        assert metrics[f"coco_5k_r{k}/t2i"] == pytest.approx(plain[f"t2i_r{k}"], abs=1e-9)
        assert metrics[f"i2t_r{k}"] == pytest.approx(plain[f"i2t_r{k}"])
    assert 5 < plain["t2i_r1"] < 95  # informative, not saturated
    # COCO 1K: the package folds by its caption order, ours by consecutive images of the same order; they agree
    # up to queries whose fold-level ground truth lies beyond the top-100 lists the package sees
    for k in (1, 5, 10):
        for d in ("i2t", "t2i"):
            assert metrics[f"coco_1k_r{k}/{d}"] == pytest.approx(metrics[f"folds/{d}_r{k}"], abs=0.2)
    assert "eccv_map_at_r/i2t" in capsys.readouterr().out


def test_itr_eval_eccv_missing_test_images_exits_2(tmp_path, test_split, capsys):
    iids, cids, text_image = test_split
    img, txt = standin_embeddings(test_split, noise=1.0)
    keep_img = np.arange(len(iids)) != 3
    keep_txt = keep_img[text_image]
    remap = np.cumsum(keep_img) - 1
    npz = tmp_path / "partial.npz"
    np.savez(
        npz,
        image_emb=img.numpy()[keep_img],
        text_emb=txt.numpy()[keep_txt],
        image_ids=iids[keep_img],
        text_image_ids=iids[keep_img][remap[text_image[keep_txt]]],
        caption_ids=cids[keep_txt],
    )
    assert main(["eval", "--embeddings", str(npz), "--eccv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(npz) in err[0] and "1 of the 5000 COCO 5K test images are missing" in err[0]


def test_missing_package_is_a_one_line_user_error(tmp_path, monkeypatch, capsys):
    npz = tmp_path / "e.npz"
    np.savez(
        npz,
        image_emb=np.eye(2, dtype=np.float32),
        text_emb=np.eye(2, dtype=np.float32),
        image_ids=np.array(["1", "2"]),
        text_image_ids=np.array(["1", "2"]),
    )
    eccv_module.eccv_reference.cache_clear()
    monkeypatch.setitem(sys.modules, "eccv_caption", None)  # import fails
    try:
        assert main(["eval", "--embeddings", str(npz), "--eccv"]) == 2
    finally:
        eccv_module.eccv_reference.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eccv-caption" in err[0] and "pip install" in err[0]
