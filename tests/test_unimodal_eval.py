"""Uni-modal evaluations: leave-one-out image R@K against sklearn, STS Spearman against scipy, input files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.neighbors import NearestNeighbors

from orchestrator.errors import UserError
from orchestrator.evaluation.unimodal import (
    average_ranks,
    image_retrieval_recall,
    load_labelled_images,
    load_sentence_pairs,
    spearman,
    sts_spearman,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_image_recall_matches_sklearn_nearest_neighbours(chunk_size):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 50)
    centres = rng.standard_normal((6, 10))
    x = centres[labels] + 1.2 * rng.standard_normal((50, 10))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = image_retrieval_recall(torch.from_numpy(x), labels, ks=(1, 2, 4, 8), chunk_size=chunk_size)
    _, nn_idx = NearestNeighbors(n_neighbors=9).fit(x).kneighbors(x)  # Euclidean; column 0 is the query itself
    assert (nn_idx[:, 0] == np.arange(50)).all()
    for k in (1, 2, 4, 8):
        want = 100.0 * np.mean([(labels[nn_idx[i, 1 : k + 1]] == labels[i]).any() for i in range(50)])
        assert got[f"image_r{k}"] == pytest.approx(want)
    assert 0 < got["image_r1"] < 100


def test_spearman_and_sts_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 6, 40).astype(float)  # STS gold scores repeat
    a = torch.randn(40, 16, dtype=torch.float64)
    b = a + 1.5 * torch.randn(40, 16, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()
    assert sts_spearman(a, b, gold) == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-9)
    assert spearman(gold, gold[::-1]) == pytest.approx(spearmanr(gold, gold[::-1]).statistic, abs=1e-12)
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_labelled_image_folder_and_sop_list_agree():
    folder = load_labelled_images(FIXTURES / "unimodal_images")
    listed = load_labelled_images(FIXTURES / "unimodal_images.txt")
    assert len(folder.paths) == 9 and folder.classes == ["blue_things", "green_things", "red_things"]
    assert np.bincount(folder.labels).tolist() == [3, 3, 3]
    by_path = dict(zip([p.resolve() for p in folder.paths], folder.labels.tolist()))
    assert set(by_path) == {p.resolve() for p in listed.paths}
    # the same grouping into classes, whatever the class names
    pairs = {(by_path[p.resolve()], lab) for p, lab in zip(listed.paths, listed.labels.tolist())}
    assert len(pairs) == 3


def test_bad_image_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such image folder"):
        load_labelled_images(tmp_path / "nope")
    (tmp_path / "only").mkdir()
    with pytest.raises(UserError, match="found 0 images"):
        load_labelled_images(tmp_path / "only")
    bad = tmp_path / "list.txt"
    bad.write_text("image_id class_id super_class_id path\n1 1 1 missing.jpg\n")
    with pytest.raises(UserError, match="line 2: image file not found"):
        load_labelled_images(bad)


def test_sentence_pair_layouts(tmp_path):
    glue = load_sentence_pairs(FIXTURES / "sts_pairs.tsv")
    assert len(glue.first) == 12 and glue.scores[0] == 4.6 and glue.first[1] == "A dog runs across the grass."
    bench = tmp_path / "sts-test.csv"  # STS benchmark: genre file year id score s1 s2
    bench.write_text(
        "main-news\tMSRvid\t2012test\t0001\t5.000\tA girl is styling her hair.\tA girl is brushing "
        "her hair.\nmain-news\tMSRvid\t2012test\t0002\t0.5\tA man sings.\tA dog barks.\n"
    )
    pairs = load_sentence_pairs(bench)
    assert pairs.first == ["A girl is styling her hair.", "A man sings."] and pairs.scores.tolist() == [5.0, 0.5]
    plain = tmp_path / "plain.tsv"
    plain.write_text("a b\tc d\t1\ne f\tg h\t2.5\n")
    assert load_sentence_pairs(plain).second == ["c d", "g h"]
    broken = tmp_path / "broken.tsv"
    broken.write_text("a\tb\t1\nc\td\tnot-a-number\n")
    with pytest.raises(UserError, match="line 2"):
        load_sentence_pairs(broken)


def test_itr_eval_bad_sts_file_exits_2_before_loading_anything(tmp_path, capsys):
    from orchestrator.cli import main

    broken = tmp_path / "broken.tsv"
    broken.write_text("a\tb\n")
    code = main(["eval", "--checkpoint", str(tmp_path / "not-there"), "--sts", str(broken)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "2 columns" in err[0]
