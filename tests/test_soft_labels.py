"""Per-batch soft-label inputs gathered from split-level features, and every family training end to end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orchestrator.config import validate_config
from orchestrator.data.synthetic import build_synthetic_split
from orchestrator.errors import UserError
from orchestrator.session import LocalSession
from orchestrator.soft_labels import BatchInputs
from orchestrator.train_loop import train_loop
from tests.conftest import tiny_tree


@pytest.fixture(scope="module")
def split():
    return build_synthetic_split("train", num_images=30, seed=1, image_size=16, captions_per_image=(1, 4))


def test_batch_inputs_gather_rows_groups_and_exact_relevance(split):
    rng = np.random.default_rng(0)
    feats = SimpleNamespace(
        image=rng.normal(size=(split.num_images, 3)).astype(np.float32),
        text=rng.normal(size=(split.num_captions, 4)).astype(np.float32),
    )
    need = {"teacher_image", "teacher_text", "caption_group_emb", "caption_group_mask", "text_caption_emb", "relevance"}
    inputs = BatchInputs(split, feats, need)
    caps = np.array([5, 0, 17, 9])
    imgs = split.caption_image[caps]
    out = inputs(imgs, caps)
    assert torch.equal(out["teacher_image"], torch.from_numpy(feats.image[imgs]))
    assert torch.equal(out["teacher_text"], torch.from_numpy(feats.text[caps]))
    assert torch.equal(out["text_caption_emb"], out["teacher_text"])
    K = max(len(split.captions_of(i)) for i in imgs)
    assert out["caption_group_emb"].shape == (4, K, 4)
    for row, img in enumerate(imgs):
        own = split.captions_of(int(img))
        assert out["caption_group_mask"][row].sum() == len(own)
        for k in range(K):
            expected = feats.text[own[k]] if k < len(own) else np.zeros(4, np.float32)
            assert np.array_equal(out["caption_group_emb"][row, k].numpy(), expected)
    R = out["relevance"].numpy()
    for i, img in enumerate(imgs):
        for j, cap in enumerate(caps):
            assert R[i, j] == pytest.approx(float(split.relevance(np.array([img]), np.array([cap]))[0, 0]))


def test_batch_inputs_refuse_what_they_cannot_provide(split):
    with pytest.raises(UserError, match="teacher_image"):
        BatchInputs(split, None, {"teacher_image"})
    bad = SimpleNamespace(image=np.zeros((split.num_images + 1, 3), np.float32), text=None)
    with pytest.raises(UserError, match="teachers.image"):
        BatchInputs(split, bad, {"teacher_image"})


@pytest.mark.parametrize("family", ["triplet", "listwise", "bcls", "cusa"])
def test_family_trains_through_the_loop_with_its_terms(tmp_path, family):
    loss = {"family": family}
    teachers = {"cache_dir": str(tmp_path / "cache")}
    if family in {"cusa", "listwise"}:
        teachers.update(image="synthetic:attributes", text="synthetic:attributes")
    if family == "listwise":
        loss["relevance"] = "teacher"
    cfg = validate_config(tiny_tree(tmp_path, loss=loss, teachers=teachers, train={"epochs": 2}))
    session = LocalSession(tmp_path / "run")
    train_loop(cfg, session)
    last = session.history[-1]
    expected = {
        "triplet": ["triplet_hardest"],
        "listwise": ["triplet", "sndcg"],
        "bcls": ["triplet_soft_negative", "kendall"],
        "cusa": ["infonce", "csa", "usa"],
    }[family]
    for term in expected:
        assert np.isfinite(last[f"train/{term}"])
    assert np.isfinite(last["train/loss"]) and last["val/rsum"] > 0
    if family == "cusa":
        for name in ("tau", "csa_tau", "usa_image_tau", "usa_text_tau"):
            assert f"train/temperature/{name}" in last
