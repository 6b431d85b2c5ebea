"""The training input pipeline: batches (images, tokens, soft-label inputs) built in DataLoader workers, pinned.

What a step receives from :func:`build_train_loader` is a finished :class:`~orchestrator.data.loader.PairBatch`:

- ``images``: the image side (decoded-image cache rows, augmented decodes, or a locked tower's cached features),
- ``tokens``: token ids (or a locked text tower's cached features),
- ``extras``: the loss family's soft-label inputs of the batch (teacher rows, caption groups, relevance), built by
  :class:`~orchestrator.soft_labels.BatchInputs` in the loader worker, not on the step's critical path,

all pinned when the device is a GPU (``pin_memory``), so ``batch.to(device, non_blocking=True)`` overlaps compute.
With ``scaling.gather_global_batch`` each rank builds the row-wise inputs of its own rows only (the loop gathers
them with the embeddings); pairwise relevance is built for the global batch from the sampler's global ids.

Unreadable images (``data.bad_images``): ``fail`` stops the run naming the file (exit 2); ``skip`` replaces the
pair by another caption whose image is in no batch of that step and decodes, counts it, and names the file in a
WARNING; the count is logged per epoch as ``train/skipped_images``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from orchestrator.data.index import DatasetIndex
from orchestrator.data.loader import PairBatch, TextInput
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: How many other captions a ``skip`` policy tries before it gives up on a batch.
MAX_SUBSTITUTES = 64
#: Soft-label inputs that pair every image of the batch with every caption (not row-wise).
PAIRWISE_INPUTS = frozenset({"relevance"})


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_loader_workers(setting: int | str, *, backend: str, cpus_per_worker: float) -> int:
    """``data.loader_workers``: a number as given; ``auto`` = the CPUs of one training process minus one (the
    process itself): ``scaling.cpus_per_worker`` on Ray, this machine's available CPUs on the local backend."""
    if setting != "auto":
        return int(setting)
    cpus = int(cpus_per_worker) if backend == "ray" else available_cpus()
    return max(0, cpus - 1)


@dataclass(frozen=True)
class BatchIds:
    """What the sampler hands the loader for one step: this rank's caption indices (B,) and the whole step's
    (W * B,) in rank order (every rank's sampler builds the same global batch)."""

    local: np.ndarray
    global_: np.ndarray


class WithGlobalIds:
    """A batch sampler yielding :class:`BatchIds` over a :class:`~orchestrator.data.sampler.CaptionBatchSampler`
    (``set_epoch``/``len`` are the sampler's)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        lo, hi = self.sampler.rank * self.sampler.batch_size, (self.sampler.rank + 1) * self.sampler.batch_size
        for batch in self.sampler.global_batches():
            yield BatchIds(local=batch[lo:hi], global_=batch)


def train_transform(model: torch.nn.Module, scale: tuple[float, float]) -> Callable:
    """open_clip's train transform for ``model`` (its preprocess config: size, mean, std, interpolation) with a
    random resized crop of area share ``scale``: PIL image -> (3, H, W) float32, normalised."""
    import open_clip
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    base = getattr(model, "base", model)  # a HeadedDualEncoder wraps the open_clip model
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(base))
    return image_transform_v2(cfg, is_train=True, aug_cfg=AugmentationCfg(scale=tuple(scale)))


class AugmentedImages:
    """``(image index) -> (3, H, W)`` float32: image ``i`` decoded from its file and augmented, on every call (in
    the loader workers; the torch RNG of the worker draws the crop). A file that cannot be decoded raises
    ``UserError`` naming it (``DatasetIndex.load_image``)."""

    def __init__(self, index: DatasetIndex, transform: Callable) -> None:
        self.index = index
        self.transform = transform

    def __call__(self, image_index: int) -> torch.Tensor:
        image = self.index.load_image(image_index)
        try:
            return self.transform(image)
        except (OSError, ValueError) as err:  # a lazily decoded file that fails in the crop
            path = None if self.index.image_paths is None else str(self.index.image_paths[image_index])
            raise UserError(f"cannot decode image ({err.__class__.__name__}: {err})", path=path) from None


class BadImages:
    """Counts the unreadable images a ``skip`` policy replaced; names each file once in a WARNING."""

    def __init__(self) -> None:
        self.count = 0
        self.paths: set[str] = set()

    def add(self, names: Sequence[str]) -> None:
        for name in names:
            self.count += 1
            if name not in self.paths:
                self.paths.add(name)
                log.warning(
                    "unreadable image skipped (data.bad_images: skip; counted in train/skipped_images): %s", name
                )


@dataclass(frozen=True)
class BatchFailure:
    """A batch that could not be built in a loader worker because of bad input (``UserError``), handed to the
    training process as a value: the DataLoader would re-raise it with its worker traceback as the message."""

    message: str
    path: str | None = None
    field: str | None = None

    def error(self) -> UserError:
        return UserError(self.message, path=self.path, field=self.field)


class TrainPairs(Dataset):
    """Training batches of one rank: ``__getitems__(BatchIds) -> PairBatch`` (the DataLoader's batch fetch).

    ``images(image_index) -> tensor``: the image input of one image (cache row, decoded/augmented pixels or
    cached features); ``text``: tokens or cached text features; ``inputs``: the soft-label builder (or None);
    ``gather``: the global batch is gathered, so pairwise inputs are built over the global ids.
    """

    def __init__(
        self,
        index: DatasetIndex,
        images: Callable[[int], torch.Tensor],
        text: TextInput,
        inputs: Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]] | None = None,
        *,
        need: frozenset[str] | set[str] = frozenset(),
        gather: bool = False,
        bad_images: str = "fail",
        seed: int = 0,
    ) -> None:
        self.index = index
        self.images = images
        self.text = text
        self.inputs = inputs
        self.pairwise = bool(set(need) & PAIRWISE_INPUTS)
        self.gather = gather
        self.bad_images = bad_images
        self.seed = seed

    def __len__(self) -> int:
        return self.index.num_captions

    def __getitem__(self, caption_index: int):  # pragma: no cover - the loader fetches whole batches
        raise TypeError("TrainPairs is fetched a batch at a time (__getitems__)")

    def _image(self, caption: int, taken: set[int], skipped: list[str]) -> tuple[int, int, torch.Tensor]:
        """(caption, image index, image input) for ``caption``, or (``skip``) a substitute's."""
        image = int(self.index.caption_image[caption])
        try:
            return caption, image, self.images(image)
        except UserError as err:
            if self.bad_images != "skip":
                raise
            skipped.append(err.path or str(err))
        rng = np.random.default_rng([self.seed, caption])
        for _ in range(MAX_SUBSTITUTES):
            other = int(rng.integers(self.index.num_captions))
            other_image = int(self.index.caption_image[other])
            if other_image in taken:
                continue
            try:
                pixels = self.images(other_image)
            except UserError as err:
                skipped.append(err.path or str(err))
                continue
            taken.add(other_image)
            return other, other_image, pixels
        raise UserError(
            f"{len(skipped)} unreadable images and no readable substitute in {MAX_SUBSTITUTES} tries "
            "(data.bad_images: skip)",
            path=self.index.source or self.index.name,
        )

    def __getitems__(self, ids: BatchIds | np.ndarray) -> PairBatch | BatchFailure:
        """The batch of ``ids``, or a :class:`BatchFailure` naming the file that stopped it."""
        try:
            return self._batch(ids)
        except UserError as err:
            return BatchFailure(err.detail, err.path, err.field)

    def _batch(self, ids: BatchIds | np.ndarray) -> PairBatch:
        if not isinstance(ids, BatchIds):
            ids = BatchIds(local=np.asarray(ids, dtype=np.int64), global_=np.asarray(ids, dtype=np.int64))
        skipped: list[str] = []
        gather = getattr(self.images, "batch", None)
        if gather is not None:  # decoded-image cache rows: one read for the batch, and none can fail to decode
            cap_idx = np.asarray(ids.local, dtype=np.int64)
            img_idx = self.index.caption_image[cap_idx]
            captions, stacked = cap_idx.tolist(), gather(img_idx)
        else:
            taken = set(self.index.caption_image[ids.global_].tolist())
            captions, images, pixels = [], [], []
            for c in ids.local.tolist():
                cap, img, px = self._image(int(c), taken, skipped)
                captions.append(cap)
                images.append(img)
                pixels.append(px)
            cap_idx = np.asarray(captions, dtype=np.int64)
            img_idx = np.asarray(images, dtype=np.int64)
            stacked = torch.stack(pixels)
        extras: dict[str, torch.Tensor] = {}
        if self.inputs is not None:
            extras = self.inputs(img_idx, cap_idx)
            if self.pairwise and self.gather:  # image x caption over the whole step: from the global ids
                glob = ids.global_
                extras.update(
                    {k: v for k, v in self.inputs(self.index.caption_image[glob], glob).items() if k in PAIRWISE_INPUTS}
                )
        return PairBatch(
            images=stacked,
            tokens=self.text([self.index.captions[c] for c in captions], captions),
            image_index=torch.from_numpy(img_idx),
            caption_index=torch.from_numpy(cap_idx),
            extras=extras,
            skipped=tuple(skipped),
        )


def _whole_batch(batch: PairBatch | BatchFailure) -> PairBatch | BatchFailure:
    """The DataLoader's ``collate_fn``: ``TrainPairs.__getitems__`` already collated the batch."""
    return batch


def build_train_loader(
    dataset: TrainPairs, batch_sampler, *, workers: int, pin_memory: bool, prefetch_factor: int = 2
) -> DataLoader:
    """A DataLoader over whole-batch fetches: ``workers`` processes (persistent, ``prefetch_factor`` batches
    each in flight), pinned batches when ``pin_memory`` (a CUDA device)."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        # torch's stub says collate_fn takes a list of items; with the dataset's __getitems__ it takes what that
        # returns (a whole PairBatch or BatchFailure here)
        collate_fn=_whole_batch,  # type: ignore[arg-type]
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,  # None: DataLoader's default, required at 0
    )


def gather_row_inputs(
    extras: dict[str, torch.Tensor], gather_rows: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """With a gathered batch: every row-wise input gathered like the ids (``gather_rows``: (B, ...) ->
    (W * B, ...)); pairwise inputs (relevance) were built over the global batch already."""
    return {k: v if k in PAIRWISE_INPUTS else gather_rows(v) for k, v in extras.items()}


class StepClock:
    """Host-side time of one epoch's steps: waiting for the next batch vs running the step.

    ``arrived()`` when a batch is in hand, ``done()`` when the step's host work ends; ``paused()`` brackets time
    that is neither (a step checkpoint). ``data_wait_fraction`` = wait / (wait + step)."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.step_s = 0.0
        self.steps = 0
        self._mark = time.perf_counter()

    def arrived(self) -> None:
        now = time.perf_counter()
        self.wait_s += now - self._mark
        self._mark = now

    def done(self) -> None:
        now = time.perf_counter()
        self.step_s += now - self._mark
        self.steps += 1
        self._mark = now

    def resume(self) -> None:
        """Restart the wait clock (after time that is not waiting for data, e.g. a checkpoint)."""
        self._mark = time.perf_counter()

    @property
    def data_wait_fraction(self) -> float:
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    def pairs_per_s(self, pairs_per_step: int) -> float:
        """Pairs per second through the steps (``pairs_per_step``: the global batch, all ranks)."""
        total = self.wait_s + self.step_s
        return self.steps * pairs_per_step / total if total > 0 else 0.0
