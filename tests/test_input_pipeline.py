"""The training input pipeline (issue 15, items 2 and 6): batches built in loader workers with their soft-label
inputs, the augmented path and its unreadable-image policy, and the starvation metrics in the MLflow record."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import validate_config
from orchestrator.data.loader import TextInput
from orchestrator.data.pipeline import (
    AugmentedImages,
    StepClock,
    TrainPairs,
    WithGlobalIds,
    build_train_loader,
    gather_row_inputs,
    resolve_loader_workers,
    train_transform,
)
from orchestrator.data.sampler import CaptionBatchSampler
from orchestrator.data.splits import load_split
from orchestrator.data.synthetic import build_synthetic_split
from orchestrator.distributed import gather_no_grad
from orchestrator.session import LocalSession
from orchestrator.soft_labels import BatchInputs
from orchestrator.train_loop import train_loop
from tests.conftest import tiny_tree
from tests.test_bad_input import assert_one_line_error, run_cli

TEACHER_INPUTS = {"teacher_image", "teacher_text", "caption_group_emb", "caption_group_mask"}


def synthetic_index(images: int = 48):
    return build_synthetic_split("train", num_images=images, seed=3, image_size=16, captions_per_image=(2, 4))


def fake_features(index, seed: int = 0) -> SimpleNamespace:
    """Teacher features of ``index``: (num_images, 6) and (num_captions, 5) float32 rows."""
    rng = np.random.default_rng(seed)
    return SimpleNamespace(
        image=rng.standard_normal((index.num_images, 6)).astype(np.float32),
        text=rng.standard_normal((index.num_captions, 5)).astype(np.float32),
    )


class PidRecordingInputs(BatchInputs):
    """``BatchInputs`` that also says which process built the batch (``_pid``)."""

    def __call__(self, image_index, caption_index):
        out = super().__call__(image_index, caption_index)
        out["_pid"] = torch.tensor([os.getpid()])
        return out


def tokens(texts, indices):
    return torch.as_tensor(list(indices), dtype=torch.long)[:, None]


# ------------------------------------------------------------------------------------------ loader workers
def test_loader_workers_auto_is_the_training_process_cpus_minus_one():
    assert resolve_loader_workers("auto", backend="ray", cpus_per_worker=8.0) == 7
    assert resolve_loader_workers("auto", backend="ray", cpus_per_worker=1.0) == 0
    assert resolve_loader_workers("auto", backend="local", cpus_per_worker=1.0) == len(os.sched_getaffinity(0)) - 1
    assert resolve_loader_workers(3, backend="ray", cpus_per_worker=8.0) == 3
    assert validate_config({}).data.loader_workers == "auto"


def test_soft_label_inputs_are_built_in_the_loader_workers_and_equal_the_direct_lookup():
    """Every batch from 2 worker processes carries the teacher rows and caption groups ``BatchInputs`` gives for
    its ids in this process, and was built in a worker (not on the training process's critical path)."""
    index = synthetic_index()
    features = fake_features(index)
    inputs = PidRecordingInputs(index, features, TEACHER_INPUTS)
    direct = BatchInputs(index, features, TEACHER_INPUTS)
    sampler = CaptionBatchSampler(index.caption_image, 8, seed=1)
    pairs = TrainPairs(
        index,
        lambda i: torch.full((3, 4, 4), float(i)),
        TextInput(tokenizer=lambda t: None),
        inputs,
        need=TEACHER_INPUTS,
    )
    pairs.text = tokens  # (B, 1) caption indices as "tokens"
    loader = build_train_loader(pairs, WithGlobalIds(sampler), workers=2, pin_memory=False)
    seen = 0
    for batch, expected_ids in zip(loader, sampler):
        np.testing.assert_array_equal(batch.caption_index.numpy(), expected_ids)
        np.testing.assert_array_equal(batch.image_index.numpy(), index.caption_image[expected_ids])
        assert batch.images[:, 0, 0, 0].tolist() == index.caption_image[expected_ids].astype(float).tolist()
        assert int(batch.extras.pop("_pid")) != os.getpid()
        want = direct(index.caption_image[expected_ids], expected_ids)
        assert set(batch.extras) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(batch.extras[k], v, rtol=0, atol=0)
        seen += 1
    assert seen == len(sampler) > 3


def _gather_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        index = synthetic_index()
        features = fake_features(index)
        need = TEACHER_INPUTS | {"relevance"}
        sampler = CaptionBatchSampler(index.caption_image, 6, seed=2, rank=rank, world_size=2)
        pairs = TrainPairs(
            index,
            lambda i: torch.zeros(3, 2, 2),
            TextInput(tokenizer=lambda t: None),
            BatchInputs(index, features, need),
            need=need,
            gather=True,
        )
        pairs.text = tokens
        direct = BatchInputs(index, features, need)
        for step, ids in enumerate(WithGlobalIds(sampler)):
            batch = pairs.__getitems__(ids)
            gathered = gather_row_inputs(batch.extras, gather_no_grad)
            glob = ids.global_
            want = direct(index.caption_image[glob], glob)
            for k, v in want.items():
                torch.testing.assert_close(gathered[k], v, rtol=0, atol=0, msg=f"{k} at step {step}")
        Path(out, f"ok{rank}").write_text(str(step + 1))
    finally:
        dist.destroy_process_group()


def test_gathered_row_inputs_equal_those_of_the_global_batch(tmp_path):
    """With ``gather_global_batch``: each rank builds its own rows' inputs; gathered, they equal the inputs of the
    concatenated global batch, and the pairwise relevance is the global batch's (2 gloo processes)."""
    context = mp.start_processes(
        _gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    while not context.join(timeout=60):
        pass
    assert int((tmp_path / "ok0").read_text()) > 2 and (tmp_path / "ok1").is_file()


def test_loader_workers_train_exactly_like_the_main_process(tmp_path):
    """The same run with the batches (and the listwise caption groups) built in 1 worker process or in the
    training process: the same losses, bit for bit."""

    def run(workers: int) -> dict[str, float]:
        tree = tiny_tree(
            tmp_path / str(workers),
            data={"loader_workers": workers},
            loss={"family": "listwise", "relevance": "teacher", "kernel": "torch"},
            train={"epochs": 1, "eval_at_start": False, "max_steps_per_epoch": 4},
            teachers={
                "image": "synthetic:attributes",
                "text": "synthetic:attributes",
                "cache_dir": str(tmp_path / "cache"),
            },
        )
        return train_loop(validate_config(tree), LocalSession(tmp_path / str(workers) / "session"))

    main, worker = run(0), run(1)
    for key in ("train/loss", "val/rsum"):
        assert worker[key] == main[key], key


# ------------------------------------------------------------------------------------------ augmentation
def test_augmented_images_are_open_clips_train_transform_and_differ_per_draw():
    import open_clip
    from open_clip.transform import AugmentationCfg

    from orchestrator.config import ModelConfig
    from orchestrator.models.student import build_student

    student = build_student(ModelConfig(name="itr-tiny-vit"))
    index = synthetic_index(8)
    images = AugmentedImages(index, train_transform(student.model, (0.5, 1.0)))
    pp = open_clip.get_model_preprocess_cfg(student.model)
    reference = open_clip.image_transform(
        pp["size"],
        is_train=True,
        mean=pp["mean"],
        std=pp["std"],
        interpolation=pp["interpolation"],
        resize_mode=pp["resize_mode"],
        aug_cfg=AugmentationCfg(scale=(0.5, 1.0)),
    )
    torch.manual_seed(5)
    ours = images(3)
    torch.manual_seed(5)
    theirs = reference(index.load_image(3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(images(3), images(3))  # a new crop every draw


def mini_coco(tmp_path: Path, coco_mini: Path, images: int = 24, broken: int | None = None) -> Path:
    """A captions_json copy of the first ``images`` coco-mini train images (symlinks) and 8 val images; image
    ``broken`` truncated after its header (the header check passes, decoding fails)."""
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    records = json.loads((coco_mini / "train.json").read_text())
    order = list(dict.fromkeys(r["image_id"] for r in records))
    train_ids, val_ids = set(order[:images]), set(order[images : images + 8])
    for split, ids in (("train", train_ids), ("val", val_ids)):
        keep = [r for r in records if r["image_id"] in ids]
        (root / f"{split}.json").write_text(json.dumps(keep))
    for image_id in train_ids | val_ids:
        rec = next(r for r in records if r["image_id"] == image_id)
        src, dst = coco_mini / rec["image"], root / rec["image"]
        if broken is not None and image_id == order[broken]:
            data = src.read_bytes()
            dst.write_bytes(data[: len(data) // 3])
        else:
            dst.symlink_to(src)
    return root


def augmented_tree(tmp_path: Path, root: Path, **data) -> dict:
    tree = tiny_tree(
        tmp_path,
        data={
            "format": "captions_json",
            "root": str(root),
            "augment": "open_clip",
            "verify_images": "header",
            "loader_workers": 1,
            **data,
        },
        train={"epochs": 1, "batch_size": 8, "eval_at_start": False, "max_steps_per_epoch": None},
        tracking={"system_metrics_interval_s": 0.5},
    )
    tree["data"].pop("synthetic")
    return tree


def test_an_unreadable_image_mid_epoch_fails_naming_the_file_by_default(tmp_path, coco_mini):
    import yaml

    root = mini_coco(tmp_path, coco_mini, broken=5)
    bad = next(p for p in (root / "images").iterdir() if not p.is_symlink())
    config = tmp_path / "config.yaml"
    tree = augmented_tree(tmp_path, root)
    tree["tracking"] = {"enabled": False}  # stderr: only our line (a new SQLite store logs its creation)
    config.write_text(yaml.safe_dump(tree))
    rc, lines, _ = run_cli(["train", str(config)], tmp_path)
    assert_one_line_error(rc, lines, bad.name)


def test_skip_policy_replaces_unreadable_images_counts_them_and_logs_the_pipeline_metrics(tmp_path, coco_mini, caplog):
    """``data.bad_images: skip`` on the augmented path: the run finishes, the skipped image is named in a WARNING
    and counted in ``train/skipped_images``; the run's MLflow record holds ``train/pairs_per_s``,
    ``train/data_wait_fraction`` and system metrics."""
    import logging

    from mlflow.tracking import MlflowClient

    from orchestrator.run import run_experiment

    root = mini_coco(tmp_path, coco_mini, broken=5)
    bad = next(p for p in (root / "images").iterdir() if not p.is_symlink())
    cfg = validate_config(augmented_tree(tmp_path, root, bad_images="skip"))
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        result = run_experiment(cfg)
    named = [r for r in caplog.records if bad.name in r.getMessage() and "skipped" in r.getMessage()]
    assert len(named) == 1  # once per file
    # the broken image's captions among the epoch's batches (the sampler drops the last, short one)
    index = load_split(cfg.data, "train", verify=False)
    sampler = CaptionBatchSampler(index.caption_image, 8, seed=cfg.train.seed)
    broken = list(index.image_ids).index(bad.stem)
    drawn = sum(int((index.caption_image[b] == broken).sum()) for b in sampler)
    assert drawn >= 3
    assert result.metrics["train/skipped_images"] == drawn
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    metrics = run.data.metrics
    assert metrics["train/skipped_images"] == drawn
    assert metrics["train/pairs_per_s"] > 0
    assert 0.0 <= metrics["train/data_wait_fraction"] <= 1.0
    system = [k for k in metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system


# ------------------------------------------------------------------------------------------ starvation
def test_step_clock_sees_a_starved_step():
    """A loader that takes 40 ms per batch before a 10 ms step waits about 80 % of the time; a warm one ~0 %."""

    def measure(delay: float) -> StepClock:
        clock = StepClock()
        for _ in range(5):
            time.sleep(delay)  # the batch being built
            clock.arrived()
            time.sleep(0.01)  # the step
            clock.done()
        return clock

    starved, fed = measure(0.04), measure(0.0)
    assert 0.65 < starved.data_wait_fraction < 0.95, starved.data_wait_fraction
    assert fed.data_wait_fraction < 0.2, fed.data_wait_fraction
    assert fed.pairs_per_s(256) > 2 * starved.pairs_per_s(256)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
