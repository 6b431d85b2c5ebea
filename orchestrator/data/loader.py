"""Torch datasets over a ``DatasetIndex``: (image, caption) training pairs and per-split encoding batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from orchestrator.data.index import DatasetIndex
from orchestrator.data.sampler import CaptionBatchSampler

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def images_on_device(images: Callable, batch: torch.Tensor) -> torch.Tensor:
    """A batch of image inputs, already on the device, as the model takes it: uint8 rows of the decoded-image cache
    normalised there (``DecodedImages.on_device``); any other source's batch as it is."""
    finish = getattr(images, "on_device", None)
    return finish(batch) if finish is not None else batch


class ImageTensorCache:
    """``data.image_cache: tensor_ram``: preprocessed float32 (3, H, W) tensors memoised in this process up to
    ``max_bytes`` (preprocessing is deterministic: no augmentation). Each process (each loader worker) holds its
    own copy; ``orchestrator.data.image_cache.DecodedImages`` is the shared, uint8, on-disk cache."""

    def __init__(self, index: DatasetIndex, preprocess: Preprocess, max_bytes: int = 2 << 30) -> None:
        self.index = index
        self.preprocess = preprocess
        self.max_bytes = max_bytes
        self._store: dict[int, torch.Tensor] = {}
        self._bytes = 0

    def __call__(self, image_index: int) -> torch.Tensor:
        hit = self._store.get(image_index)
        if hit is not None:
            return hit
        tensor = self.preprocess(self.index.load_image(image_index))
        size = tensor.numel() * tensor.element_size()
        if self._bytes + size <= self.max_bytes:
            self._store[image_index] = tensor
            self._bytes += size
        return tensor

    def on_device(self, images: torch.Tensor) -> torch.Tensor:
        return images  # normalised on the CPU already


class FeatureRows:
    """Rows of a cached (N, F) feature array as float32 tensors: ``rows(i) -> (F,)``, ``rows([i, j]) -> (2, F)``.

    Stands in for ``ImageTensorCache`` (images) or for the tokenizer (captions) when a locked tower's outputs are
    cached (``orchestrator.models.tower_cache``).
    """

    def __init__(self, features: np.ndarray) -> None:
        self.features = features

    def __call__(self, rows) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[rows], dtype=np.float32))


class TextInput:
    """The text side of a batch: (caption strings, caption indices) -> (B, L) tokens of the strings, or the (B, F)
    cached text-tower features of the indices."""

    def __init__(self, tokenizer: Tokenizer | None = None, features: np.ndarray | None = None) -> None:
        if (tokenizer is None) == (features is None):
            raise ValueError("give a tokenizer or cached features")
        self.tokenizer = tokenizer
        self.rows = FeatureRows(features) if features is not None else None

    def __call__(self, texts: Sequence[str], indices: Sequence[int]) -> torch.Tensor:
        if self.rows is not None:
            return self.rows(list(indices))
        if self.tokenizer is None:  # not reached: __init__ takes exactly one of the two
            raise ValueError("TextInput has neither a tokenizer nor cached features")
        return self.tokenizer(list(texts))


@dataclass
class PairBatch:
    """One training batch: ``images`` (B, 3, H, W) pixels or (B, F) cached image-tower features, ``tokens`` (B, L)
    token ids or (B, F) cached text-tower features, ``image_index``/``caption_index`` (B,) int64; ``extras``: the
    loss's soft-label inputs of the batch (``orchestrator.soft_labels.BatchInputs``, built in the loader worker);
    ``skipped``: the unreadable image files a ``data.bad_images: skip`` policy replaced in this batch."""

    images: torch.Tensor
    tokens: torch.Tensor
    image_index: torch.Tensor
    caption_index: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    def to(self, device: torch.device) -> PairBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PairBatch(
            move(self.images),
            move(self.tokens),
            move(self.image_index),
            move(self.caption_index),
            {k: move(v) for k, v in self.extras.items()},
            self.skipped,
        )

    def pin_memory(self) -> PairBatch:
        """Page-locked copies (the DataLoader's ``pin_memory`` thread calls this), so ``to`` can overlap compute."""
        return PairBatch(
            self.images.pin_memory(),
            self.tokens.pin_memory(),
            self.image_index.pin_memory(),
            self.caption_index.pin_memory(),
            {k: v.pin_memory() for k, v in self.extras.items()},
            self.skipped,
        )


class PairDataset(Dataset):
    """Item ``c`` = (image input of caption ``c``'s image, caption text, image index, caption index)."""

    def __init__(self, index: DatasetIndex, images: Callable[[int], torch.Tensor]) -> None:
        self.index = index
        self.images = images

    def __len__(self) -> int:
        return self.index.num_captions

    def __getitem__(self, caption_index: int):
        image_index = int(self.index.caption_image[caption_index])
        return self.images(image_index), self.index.captions[caption_index], image_index, int(caption_index)


def make_pair_collate(text: TextInput | Tokenizer) -> Callable[[list], PairBatch]:
    """Collate (image, caption, image index, caption index) items; ``text``: a ``TextInput`` or a tokenizer."""
    if not isinstance(text, TextInput):
        text = TextInput(tokenizer=text)

    def collate(items: list) -> PairBatch:
        images, texts, img_idx, cap_idx = zip(*items)
        return PairBatch(
            images=torch.stack(images),
            tokens=text(texts, cap_idx),
            image_index=torch.as_tensor(img_idx, dtype=torch.long),
            caption_index=torch.as_tensor(cap_idx, dtype=torch.long),
        )

    return collate


def train_loader(
    index: DatasetIndex,
    images: Callable[[int], torch.Tensor],
    text: TextInput | Tokenizer,
    sampler: CaptionBatchSampler,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of ``sampler``; ``images``: an ``ImageTensorCache`` or ``FeatureRows``; ``text``: see
    ``make_pair_collate``."""
    return DataLoader(
        PairDataset(index, images),
        # torch's stub wants lists of indices; DataLoader indexes the dataset with any sequence (numpy batches here)
        batch_sampler=sampler,  # type: ignore[arg-type]
        collate_fn=make_pair_collate(text),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def iter_image_batches(index: DatasetIndex, images: Callable[[int], torch.Tensor], batch_size: int):
    """(B, 3, H, W) tensors (uint8 rows of the decoded-image cache: finish them on the device with
    ``images_on_device``; or (B, F) cached features, ``images`` = ``FeatureRows``) of the split's images, in
    index order."""
    gather = getattr(images, "batch", None)  # DecodedImages: one read of consecutive rows
    for start in range(0, index.num_images, batch_size):
        stop = min(start + batch_size, index.num_images)
        if gather is not None:
            yield gather(np.arange(start, stop))
        else:
            yield torch.stack([images(i) for i in range(start, stop)])


def iter_caption_batches(index: DatasetIndex, text: TextInput | Tokenizer, batch_size: int):
    """(B, L) token tensors (or (B, F) cached features, ``text`` = ``TextInput(features=...)``) of the split's
    captions, in index order."""
    if not isinstance(text, TextInput):
        text = TextInput(tokenizer=text)
    for start in range(0, index.num_captions, batch_size):
        stop = min(start + batch_size, index.num_captions)
        yield text(index.captions[start:stop], range(start, stop))


def caption_groups(index: DatasetIndex, image_indices: np.ndarray, max_captions: int | None = None):
    """Caption indices of each given image, padded: (B, K) int64 and a (B, K) bool mask of real entries."""
    groups = [index.captions_of(int(i)) for i in image_indices]
    k = max(len(g) for g in groups) if max_captions is None else max_captions
    out = np.zeros((len(groups), k), dtype=np.int64)
    mask = np.zeros((len(groups), k), dtype=bool)
    for row, g in enumerate(groups):
        g = g[:k]
        out[row, : len(g)] = g
        mask[row, : len(g)] = True
    return out, mask
