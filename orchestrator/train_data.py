"""What the training loop reads: the splits, each side's model input, and this rank's training batches.

- :func:`load_train_data`: the train split (a map-style index, or the webdataset shard set) and the val split,
  checked (leakage, size) on rank 0, with each split's image and text inputs: rows of the decoded-image cache (or
  the float cache), a locked tower's cached outputs, augmented decodes, or the tokenizer.
- :func:`train_batches`: this rank's batches of one epoch (a DataLoader whose workers build each whole batch with
  its soft-label inputs) and the sampler that orders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.config import ExperimentConfig
from orchestrator.data.image_cache import image_input
from orchestrator.data.index import DatasetIndex
from orchestrator.data.leakage import check_leakage
from orchestrator.data.loader import FeatureRows, TextInput
from orchestrator.data.pipeline import (
    AugmentedImages,
    TrainPairs,
    WithGlobalIds,
    build_train_loader,
    resolve_loader_workers,
    train_transform,
)
from orchestrator.data.sampler import CaptionBatchSampler
from orchestrator.data.shard_loader import shard_train_loader
from orchestrator.data.shards import open_shards
from orchestrator.data.splits import load_split
from orchestrator.errors import UserError
from orchestrator.evaluation.embed import warn_small_split
from orchestrator.models.locked_towers import TowerSplit
from orchestrator.models.student import Student
from orchestrator.models.tower_cache import TowerFeatures, experiment_tower_features
from orchestrator.session import Session
from orchestrator.soft_labels import BatchInputs
from orchestrator.training_state import ResumableBatches


@dataclass
class TrainData:
    """The splits and their model inputs. ``train_images`` is None on the streaming (webdataset) path, whose
    loader decodes; ``val_*`` are None without a val split in ``eval.splits``."""

    train_index: Any
    val_index: Any
    train_images: Any
    train_text: TextInput | None
    val_images: Any
    val_text: TextInput | None
    streaming: bool


def load_train_data(
    cfg: ExperimentConfig, session: Session, student: Student, cached: dict[str, TowerSplit], device: torch.device
) -> TrainData:
    """The train and val splits with their inputs (``cached``: the sides whose locked tower's outputs are read
    from the tower cache)."""
    streaming = cfg.data.resolved_format == "webdataset"  # train pairs streamed from tar shards; eval map-style
    train_index = open_shards(cfg.data) if streaming else load_split(cfg.data, "train")
    val_index = load_split(cfg.data, "val") if "val" in cfg.eval.splits else None
    # map-style (not streamed) train vs val/test: a WARNING, or UserError with data.leakage: error
    if session.rank == 0 and isinstance(train_index, DatasetIndex):
        check_leakage(cfg.data, {"train": train_index, **({"val": val_index} if val_index is not None else {})})
    if session.rank == 0 and val_index is not None:  # a WARNING (once) for a val split too small to rank models
        warn_small_split(val_index.num_images, "val split", cfg.eval.ks)

    def inputs(index: DatasetIndex, augmented: bool = False) -> tuple[Any, TextInput]:
        """(image input, text input) of a split: pixels (``data.image_cache``: uint8 rows of the decoded-image
        cache, normalised on the device)/tokens, or a locked tower's cached outputs; ``augmented``: no cache."""
        feats = experiment_tower_features(cfg, student, index, cached, device=device.type) if cached else None
        images: Any = None  # FeatureRows, the data.image_cache input, or None (augmented: decoded in the workers)
        if "image" in cached:
            images = FeatureRows(_cached_side(feats, "image"))
        elif not augmented:
            images = image_input(cfg, index, student.preprocess)
        if "text" in cached:
            text = TextInput(features=_cached_side(feats, "text"))
        else:
            text = TextInput(tokenizer=student.tokenizer)
        return images, text

    augment = cfg.data.augment != "none"
    train_images, train_text = (
        inputs(train_index, augmented=augment) if isinstance(train_index, DatasetIndex) else (None, None)
    )
    if augment and isinstance(train_index, DatasetIndex):  # decoded and augmented in the loader workers, every epoch
        if "image" in cached:
            raise UserError(
                "a locked image tower with cached features sees no pixels to augment (set "
                "model.cache_locked_towers: false, or data.augment: none)",
                field="data.augment",
            )
        train_images = AugmentedImages(train_index, train_transform(student.model, cfg.data.augment_scale))
    val_images, val_text = inputs(val_index) if val_index is not None else (None, None)
    return TrainData(train_index, val_index, train_images, train_text, val_images, val_text, streaming)


def _cached_side(feats: TowerFeatures | None, side: str) -> np.ndarray:
    """The ``side`` ("image"/"text") outputs of a locked tower, read from the tower cache."""
    view = None if feats is None else feats.image if side == "image" else feats.text
    if view is None:
        raise RuntimeError(f"the tower cache gave no {side} features for a cached {side} tower")
    return view


def caption_sampler(cfg: ExperimentConfig, index, session: Session) -> CaptionBatchSampler:
    """This rank's sampler over the captions of ``index``: batches of B·K with ``accum_steps`` K (the sampler's
    guarantees hold over all of it); a batch larger than the data is a ``UserError`` on ``train.batch_size``."""
    try:
        return CaptionBatchSampler(
            index.caption_image,
            cfg.train.batch_size * cfg.train.accum_steps,
            seed=cfg.train.seed,
            unique_images=cfg.train.batch_sampler == "unique_images",
            rank=session.rank,
            world_size=session.world_size,
        )
    except ValueError as err:
        accum = f" (train.batch_size x train.accum_steps {cfg.train.accum_steps})" if cfg.train.accum_steps > 1 else ""
        raise UserError(f"{err}{accum}", path=index.source or index.name, field="train.batch_size") from None


def train_batches(
    cfg: ExperimentConfig,
    data: TrainData,
    session: Session,
    student: Student,
    batch_inputs: BatchInputs,
    *,
    gather: bool,
    device: torch.device,
) -> tuple[Any, Any]:
    """(loader, sampler) of this rank's training batches.

    Map-style data: whole batches (pixels, tokens, soft-label inputs) built in the loader workers and pinned for
    the copy, over ``ResumableBatches`` (a resume mid-epoch skips the batches done without loading them).
    Streaming: this rank's shards, decoded (and augmented) in its loader workers every epoch."""
    pin = device.type == "cuda"
    if data.streaming:
        augment = cfg.data.augment != "none"
        return shard_train_loader(
            cfg,
            data.train_index,
            rank=session.rank,
            world_size=session.world_size,
            pin_memory=pin,
            tokenizer=student.tokenizer,
            preprocess=train_transform(student.model, cfg.data.augment_scale) if augment else student.preprocess,
        )
    if data.train_text is None:  # load_train_data sets it for map-style data
        raise RuntimeError("map-style training data without a text input")
    sampler = caption_sampler(cfg, data.train_index, session)
    pairs = TrainPairs(
        data.train_index,
        data.train_images,
        data.train_text,
        batch_inputs if batch_inputs.need else None,
        need=batch_inputs.need,
        gather=gather,
        bad_images=cfg.data.bad_images,
        seed=cfg.train.seed,
    )
    workers = resolve_loader_workers(
        cfg.data.loader_workers, backend=cfg.scaling.backend, cpus_per_worker=cfg.scaling.cpus_per_worker
    )
    loader = build_train_loader(
        pairs,
        ResumableBatches(WithGlobalIds(sampler)),
        workers=workers,
        pin_memory=pin,
        prefetch_factor=cfg.data.prefetch_factor,
    )
    return loader, sampler
