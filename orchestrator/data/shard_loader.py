"""Training batches streamed from webdataset shards (:mod:`orchestrator.data.shards`), per rank and loader worker.

Per epoch, rank ``r`` of ``W`` reads :func:`~orchestrator.data.shards.rank_shards` (the shard list shuffled by
``(seed, epoch)`` alike on every rank, then every ``W``-th), and loader worker ``k`` of ``K`` every ``K``-th of
those: the readers' shards are disjoint. Each worker streams its shards through a shuffle buffer of
``data.shuffle_buffer`` samples (the encoded bytes; images are decoded after it, in the worker, every epoch) and
fills whole batches of distinct keys: one sample = one image with one caption, drawn per ``(seed, epoch, key)``, so
a batch never holds two captions of one image. The image id of a pair is a stable 63-bit hash of its key (no
global index exists); the caption index is -1.

Epoch length: ``steps = samples // (batch_size * W)`` for every rank (DDP needs the same step count everywhere).
The steps are dealt to the workers round-robin, as the DataLoader collects them (step ``i`` from worker
``i % K``), and each worker builds exactly its share. A worker whose shards run out first reads them again (a new
pass, reshuffled, logged), so no rank runs dry when shard sizes differ; one whose shards hold less than a batch
stops the run with a ``UserError``.

Resume mid-epoch (step checkpoints): ``run_steps`` sets ``loader.batch_sampler.skip`` (a ``ResumableBatches``);
each worker then re-reads the samples of the batches done, without decoding them, and worker ``k`` takes the role
of worker ``(k + skip) % K``, so the remaining steps are the uninterrupted epoch's.

A bad shard or image in a worker process reaches the training loop as the ``UserError`` it raised (exit 2, one line
naming the shard), not as the DataLoader's multi-line wrapper.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator.data.images import to_rgb
from orchestrator.data.loader import PairBatch
from orchestrator.data.pipeline import BatchFailure, resolve_loader_workers
from orchestrator.data.shards import FIELD, Sample, ShardSet, check_split, iter_samples, rank_shards, worker_shards
from orchestrator.errors import UserError
from orchestrator.training_state import ResumableBatches

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config import ExperimentConfig

log = logging.getLogger(__name__)

#: Debug hook: a folder where each reader appends the shards it opens (``rank<r>.txt``: "epoch worker path").
TRACE_ENV = "ITR_SHARD_TRACE"
_ID_MASK = (1 << 63) - 1


def key_id(key: str) -> int:
    """A stable non-negative int64 id of a sample key (blake2b, 63 bits): the image id of its pairs."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & _ID_MASK


def caption_choice(seed: int, epoch: int, key: str, num_captions: int) -> int:
    """Which of a sample's ``num_captions`` captions epoch ``epoch`` trains on: uniform, fixed per (seed, epoch,
    key) (a blake2b digest, the same in every process)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_captions


def steps_share(steps: int, worker: int, num_workers: int) -> int:
    """How many of steps ``0 .. steps - 1`` are worker ``worker``'s when step ``i`` is worker ``i % num_workers``'s."""
    return max(0, (steps - worker + num_workers - 1) // num_workers)


def shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` through a shuffle buffer of ``size`` (webdataset's ``shuffle``): each arriving item replaces a
    uniformly drawn buffered one, which is yielded; the rest is yielded shuffled at the end. ``size <= 1``: as is."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def distinct_batches(samples: Iterable[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Consecutive batches of ``batch_size`` samples with distinct keys: a sample whose key is already in the batch
    being filled waits for the next one (as ``sampler.unique_image_batches`` defers captions). Drop-last."""
    stream = iter(samples)
    waiting: deque[Sample] = deque()
    while True:
        batch: list[Sample] = []
        keys: set[str] = set()
        deferred: list[Sample] = []
        while len(batch) < batch_size:
            sample = waiting.popleft() if waiting else next(stream, None)
            if sample is None:
                return
            if sample.key in keys:
                deferred.append(sample)
            else:
                batch.append(sample)
                keys.add(sample.key)
        waiting.extendleft(reversed(deferred))
        yield batch


def decode_image(sample: Sample, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The sample's image through ``preprocess`` (8-bit RGB first, as ``DatasetIndex.load_image``); a file that does
    not decode raises ``UserError`` naming the shard and the member."""
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            rgb = to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(
            f"cannot decode image {sample.image_member} ({err.__class__.__name__}: {err})",
            path=str(sample.shard),
            field=FIELD,
        ) from None
    return preprocess(rgb)


class ShardSchedule:
    """The epochs of a streamed train set: ``len`` = steps per epoch (``num_samples // (batch_size *
    world_size)``), ``set_epoch`` picks the epoch's shard order and captions. Stands where the map path's
    ``CaptionBatchSampler`` does; iterating it gives the step numbers (``ResumableBatches`` wraps it)."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int) -> None:
        self.steps = num_samples // (batch_size * world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.steps))


class ShardPairs(IterableDataset):
    """One epoch of this rank's training batches, each ``(images (B, 3, H, W) float32, tokens (B, L) int64,
    image ids (B,) int64, caption indices (B,) int64 = -1)`` -- or a ``BatchFailure``. ``epoch`` and ``skip`` are
    set before each epoch's iterator is made (workers are started per epoch and copy them)."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        batch_size: int,
        steps: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        clean_captions: bool,
    ) -> None:
        self.shards, self.preprocess, self.tokenizer = shards, preprocess, tokenizer
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.clean_captions = shuffle_buffer, clean_captions
        self.epoch, self.skip = 0, 0

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self.skip) % workers  # after a resume, step i is still read by role i % workers
        return self._batches(self.epoch, role, workers, self.skip, in_worker=info is not None)

    def _batches(self, epoch: int, role: int, workers: int, skip: int, in_worker: bool) -> Iterator:
        quota, done = steps_share(self.steps, role, workers), steps_share(skip, role, workers)
        try:
            mine = worker_shards(
                rank_shards(self.shards.paths, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size),
                role,
                workers,
            )
            rng = np.random.default_rng([self.seed, epoch, self.rank, role])
            batches = distinct_batches(self._passes(mine, epoch, role, rng), self.batch_size)
            for n, batch in enumerate(itertools.islice(batches, quota)):
                if n >= done:  # the batches of the steps done before a resume are read, not decoded
                    yield self._collate(batch, epoch)
        except UserError as err:
            if not in_worker:
                raise
            yield BatchFailure(err.detail, err.path, err.field)

    def _passes(self, shards: list[Path], epoch: int, role: int, rng: np.random.Generator) -> Iterator[Sample]:
        """The samples of ``shards`` through the shuffle buffer, then (a new pass, the shards reshuffled) again
        for as long as more are wanted. The buffer drains at the end of each pass, so filling it never starts one."""
        trace = _tracer(self.rank)
        for n in itertools.count():
            if n:
                log.info(
                    "rank %d loader worker %d reads its %d shard(s) again in epoch %d (pass %d: the epoch "
                    "needs more samples than they hold)",
                    self.rank,
                    role,
                    len(shards),
                    epoch,
                    n + 1,
                )
            order = shards if n == 0 else [shards[i] for i in rng.permutation(len(shards))]
            read = 0
            for sample in shuffled(self._read(order, epoch, role, trace), self.shuffle_buffer, rng):
                read += 1
                yield sample
            if read < self.batch_size:
                raise UserError(
                    f"rank {self.rank}'s loader worker {role} got {len(shards)} shard(s) with {read} "
                    f"samples in epoch {epoch}, fewer than a batch ({self.batch_size}): write more "
                    "or larger shards, or use fewer loader workers",
                    field=FIELD,
                )

    def _read(self, shards: list[Path], epoch: int, role: int, trace: Callable) -> Iterator[Sample]:
        for path in shards:
            trace(epoch, role, path)
            yield from iter_samples(path, clean=self.clean_captions, expected=self.shards.counts.get(path))

    def _collate(self, batch: list[Sample], epoch: int) -> tuple[torch.Tensor, ...]:
        images = torch.stack([decode_image(s, self.preprocess) for s in batch])
        texts = [s.captions[caption_choice(self.seed, epoch, s.key, len(s.captions))] for s in batch]
        ids = torch.tensor([key_id(s.key) for s in batch], dtype=torch.long)
        return images, self.tokenizer(texts), ids, torch.full((len(batch),), -1, dtype=torch.long)


class ShardLoader:
    """This rank's ``PairBatch`` es of the current epoch, from a DataLoader over ``ShardPairs`` (``num_workers``
    processes, started per epoch). ``batch_sampler`` is the ``ResumableBatches`` that ``run_steps`` sets ``skip``
    on to resume mid-epoch."""

    def __init__(
        self,
        dataset: ShardPairs,
        schedule: ShardSchedule,
        *,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int = 2,
    ) -> None:
        self.dataset, self.schedule = dataset, schedule
        self.batch_sampler = ResumableBatches(schedule)
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,  # None: DataLoader's default, required at 0
        )

    def __iter__(self) -> Iterator[PairBatch]:
        self.dataset.epoch = self.schedule.epoch
        self.dataset.skip = self.batch_sampler.skip
        return self._checked(iter(self.loader))  # the workers start (and copy epoch and skip) here

    @staticmethod
    def _checked(items: Iterator) -> Iterator[PairBatch]:
        for item in items:
            if isinstance(item, BatchFailure):
                raise item.error()
            yield PairBatch(*item)

    def __len__(self) -> int:
        return len(self.batch_sampler)


def shard_workers(cfg: ExperimentConfig, num_shards: int, world_size: int) -> int:
    """Loader workers per rank: ``data.loader_workers`` (``auto``: the CPUs, but never more readers than shards);
    refuses (``UserError``) fewer shards than ``world_size`` x workers."""
    workers = resolve_loader_workers(
        cfg.data.loader_workers, backend=cfg.scaling.backend, cpus_per_worker=cfg.scaling.cpus_per_worker
    )
    if cfg.data.loader_workers == "auto":
        workers = min(workers, num_shards // world_size)
    check_split(num_shards, world_size, workers)
    return workers


def check_streamable(cfg: ExperimentConfig, shards: ShardSet, world_size: int) -> int:
    """Refuse (``UserError``) a shard set that cannot feed ``world_size`` ranks (too few shards for the readers,
    fewer samples than one global batch); returns the steps per epoch."""
    shard_workers(cfg, len(shards.paths), world_size)
    batch_size = cfg.train.batch_size * cfg.train.accum_steps
    steps = shards.num_samples // (batch_size * world_size)
    if steps == 0:
        accum = f" x train.accum_steps {cfg.train.accum_steps}" if cfg.train.accum_steps > 1 else ""
        raise UserError(
            f"batch size {cfg.train.batch_size}{accum} x {world_size} workers is larger than the number "
            f"of training samples ({shards.num_samples})",
            path=shards.name,
            field="train.batch_size",
        )
    return steps


def shard_train_loader(
    cfg: ExperimentConfig,
    shards: ShardSet,
    *,
    preprocess: Callable,
    tokenizer: Callable,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
) -> tuple[ShardLoader, ShardSchedule]:
    """The loader of this rank's training batches from ``shards`` (an ``ExperimentConfig`` ``cfg``: batch size x
    ``train.accum_steps``, ``data.loader_workers``, ``data.shuffle_buffer``, ``train.seed``) and its schedule."""
    check_streamable(cfg, shards, world_size)
    batch_size = cfg.train.batch_size * cfg.train.accum_steps
    schedule = ShardSchedule(shards.num_samples, batch_size, world_size)
    dataset = ShardPairs(
        shards,
        preprocess=preprocess,
        tokenizer=tokenizer,
        batch_size=batch_size,
        steps=len(schedule),
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        clean_captions=cfg.data.clean_captions,
    )
    workers = shard_workers(cfg, len(shards.paths), world_size)
    return ShardLoader(
        dataset, schedule, num_workers=workers, pin_memory=pin_memory, prefetch_factor=cfg.data.prefetch_factor
    ), schedule


def _tracer(rank: int) -> Callable[[int, int, Path], None]:
    """Appends ``epoch worker path`` lines to ``$ITR_SHARD_TRACE/rank<rank>.txt`` when that is set (tests)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return lambda epoch, worker, path: None

    def trace(epoch: int, worker: int, path: Path) -> None:
        with open(Path(folder) / f"rank{rank}.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{epoch} {worker} {path}\n")

    return trace
