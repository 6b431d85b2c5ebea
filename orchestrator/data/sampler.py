"""Training batch samplers: deterministic by (seed, epoch), sharded over DDP ranks, drop-last."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np


def unique_image_batches(caption_image: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of caption indices in which no image appears twice.

    Captions are taken in a random order; one whose image is already in the batch being filled is
    deferred to the front of the next batch. Batches shorter than ``batch_size`` (at the very end, when
    too few distinct images are left) are dropped.
    """
    queue: deque[int] = deque(rng.permutation(len(caption_image)).tolist())
    batches: list[np.ndarray] = []
    while len(queue) >= batch_size:
        batch: list[int] = []
        images: set[int] = set()
        skipped: list[int] = []
        while queue and len(batch) < batch_size:
            c = queue.popleft()
            img = int(caption_image[c])
            if img in images:
                skipped.append(c)
            else:
                batch.append(c)
                images.add(img)
        queue.extendleft(reversed(skipped))
        if len(batch) < batch_size:
            break
        batches.append(np.asarray(batch, dtype=np.int64))
    return batches


def random_batches(num_captions: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of caption indices (several captions of one image may share a batch)."""
    perm = rng.permutation(num_captions)
    n = num_captions // batch_size
    return [perm[k * batch_size : (k + 1) * batch_size].astype(np.int64) for k in range(n)]


class CaptionBatchSampler:
    """Yields this rank's batches (arrays of caption indices) for one epoch at a time.

    Every rank builds the same global list of ``batch_size * world_size`` batches from ``(seed, epoch)``;
    at each step rank r takes the r-th ``batch_size`` slice of that step's global batch, so ranks see
    disjoint batches, the same number of them, and the batch of one step is what one process with
    ``batch_size * world_size`` would see. ``unique_images=True`` keeps two captions of one image out of the
    whole global batch (for losses without multi-positive support), so a gathered batch
    (``scaling.gather_global_batch``) never holds one image on two ranks.
    """

    def __init__(
        self,
        caption_image: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        unique_images: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.caption_image = np.asarray(caption_image, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.unique_images = unique_images
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._cached: tuple[int, list[np.ndarray]] | None = None
        num_images = int(self.caption_image.max()) + 1 if len(self.caption_image) else 0
        if unique_images and batch_size * world_size > num_images:
            workers = f" x {world_size} workers" if world_size > 1 else ""
            raise ValueError(
                f"batch size {batch_size}{workers} is larger than the number of training images ({num_images})"
            )
        if batch_size * world_size > len(self.caption_image):
            raise ValueError(
                f"batch size {batch_size} x {world_size} workers is larger than the number of captions "
                f"({len(self.caption_image)})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches, built once per epoch (``len`` and every step reuse them)."""
        if self._cached is None or self._cached[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            size = self.batch_size * self.world_size
            if self.unique_images:
                batches = unique_image_batches(self.caption_image, size, rng)
            else:
                batches = random_batches(len(self.caption_image), size, rng)
            self._cached = (self.epoch, batches)
        return self._cached[1]

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches of caption indices, (world_size * batch_size,) each, in rank order."""
        return self._global_batches()

    def __iter__(self) -> Iterator[np.ndarray]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return iter([batch[lo:hi] for batch in self._global_batches()])

    def __len__(self) -> int:
        return len(self._global_batches())
