"""The decoded-image cache: every image decoded and resized once ever, kept as uint8 rows in one memory-mapped file.

The student's preprocessing is deterministic (no augmentation), so the pixels it feeds the model depend only on
the image file and the transform. They are stored once per (file content, transform) and read back by every
epoch, loader worker, sweep trial and run on the node, through the page cache; normalisation runs on the device
(:class:`~orchestrator.data.pixels.PixelTransform`). Layout under ``data.image_cache_dir``::

    file-hashes.json                    sha256 of image files, memoised by (path, size, mtime_ns)
    <H>x<W>-<transform digest[:16]>/    one store per transform (resize, crop, interpolation, Pillow version)
        store.json                      the transform's spec and the row shape
        pixels.u8                       uint8 rows (3, H, W), raw, appended
        keys.bin                        the 32-byte content key of each row, in row order, appended
        commit.lock                     flock: exclusive to append, shared to read keys.bin
        build.lock                      flock: one builder per store at a time (a second waits, then finds the rows)

A row's key is the sha256 of its file's bytes (:mod:`orchestrator.teachers.hashing`; a generated image: of its
pixels), so a changed image gets a new key and only its row is decoded again (the old row stays, unused), and any
split or dataset holding the same file shares the row. Appends are committed in chunks: the pixel rows are written
and fsynced first, then their keys; a row counts as cached only once its key is in ``keys.bin``. A killed build
leaves at most a torn tail, which readers ignore and the next writer truncates, and resumes from the rows
committed. A decode failure stops the build with a ``UserError`` naming the file; the chunk holding it is not
committed. The row store itself is :class:`~orchestrator.data.pixel_store.PixelStore`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orchestrator.data.index import DatasetIndex
from orchestrator.data.pixel_store import CACHE_FIELD, PixelStore
from orchestrator.data.pixels import PixelTransform, split_preprocess
from orchestrator.errors import UserError
from orchestrator.teachers.hashing import FileHashMemo, pixels_key

if TYPE_CHECKING:
    from orchestrator.data.splits import SplitRole

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sources
class DecodedImages:
    """Image ``i`` of a split -> its cached uint8 (3, H, W) pixels; :meth:`on_device` normalises a batch.

    ``rows``: int64 (num_images,) store row of each image. Picklable without its pixels: each process (a
    DataLoader worker, a Ray worker) opens the memory map itself on first use, so all share the page cache.
    """

    def __init__(self, store: PixelStore, rows: np.ndarray, transform: PixelTransform) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.extent = int(self.rows.max()) + 1 if len(self.rows) else 0
        self._array: np.memmap | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _pixels(self) -> np.memmap:
        if self._array is None or self._pid != os.getpid():
            self._array, self._pid = self.store.open_rows(self.extent), os.getpid()
        return self._array

    def __call__(self, image_index: int) -> torch.Tensor:
        """uint8 (3, H, W) of image ``image_index`` (a copy: the map stays read-only)."""
        return torch.from_numpy(np.array(self._pixels()[self.rows[image_index]]))

    def batch(self, image_indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, H, W) of the given images, read in one gather."""
        return torch.from_numpy(self._pixels()[self.rows[np.asarray(image_indices, dtype=np.int64)]])

    def on_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) where the model runs -> normalised float32 (B, 3, H, W)."""
        return self.transform.normalise(images)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"], state["_pid"] = None, None
        return state


class DecodeImages:
    """``data.image_cache: none``: image ``i`` decoded and preprocessed on every call -> float32 (3, H, W)."""

    def __init__(self, index: DatasetIndex, preprocess: Callable) -> None:
        self.index = index
        self.preprocess = preprocess

    def __call__(self, image_index: int) -> torch.Tensor:
        return self.preprocess(self.index.load_image(image_index))

    def on_device(self, images: torch.Tensor) -> torch.Tensor:
        return images


# ----------------------------------------------------------------------------------------------- keys
def image_keys(index: DatasetIndex, memo: FileHashMemo, progress: bool = False) -> list[bytes]:
    """32-byte content key per image of ``index``: sha256 of the file (memoised by path, size, mtime), or of the
    rendered pixels of a generated image."""
    from tqdm.auto import tqdm

    keys: list[bytes] = []
    with tqdm(
        total=index.num_images,
        desc=f"hashing {index.name} images",
        unit="img",
        leave=False,
        disable=None if progress else True,
    ) as bar:  # None: only on a terminal
        for i in range(index.num_images):
            if index.image_paths is None:
                keys.append(pixels_key(index.load_image(i)))
            else:
                path = index.image_paths[i]
                try:
                    keys.append(memo.digest(path))
                except OSError as err:
                    raise UserError(f"cannot read image ({err.strerror or err})", path=str(path)) from None
            bar.update(1)
    return keys


@dataclass
class ImageCacheStats:
    """One split's pass through the cache: ``images`` rows, ``distinct`` contents, ``computed`` decoded now,
    ``reused`` rows found cached, ``backend`` that decoded (``""`` when nothing was), ``store`` folder."""

    split: str
    images: int
    distinct: int
    computed: int
    reused: int
    backend: str
    seconds: float
    store: Path


def decoded_images(
    index: DatasetIndex,
    transform: PixelTransform,
    cache_dir: Path | str,
    *,
    workers: int | None = None,
    backend: str = "local",
    progress: bool = False,
    chunk_rows: int | None = None,
) -> tuple[DecodedImages, ImageCacheStats]:
    """The cached pixels of every image of ``index``, decoding (in parallel) only those not cached yet.

    ``workers``: decoding processes for the local backend (``None``: every CPU); ``backend``: ``"local"`` (a
    process pool) or ``"ray"`` (Ray tasks on the connected cluster); ``chunk_rows``: rows per commit (default
    :data:`~orchestrator.data.image_cache_build.DEFAULT_CHUNK_ROWS`). Nothing is written when every row is cached.
    """
    from orchestrator.data.image_cache_build import DEFAULT_CHUNK_ROWS, build_rows

    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    store = PixelStore.for_transform(cache_dir, transform)
    memo = FileHashMemo(cache_dir / "file-hashes.json")
    keys = image_keys(index, memo, progress=progress)
    rows, _ = store.lookup(keys) if store.exists else (np.full(len(keys), -1, dtype=np.int64), 0)
    reused, computed, used = int((rows >= 0).sum()), 0, ""
    if (rows < 0).any():
        _ensure_dir(cache_dir)
        memo.save()
        store.create()
        with store.build_lock():
            rows, _ = store.lookup(keys)  # another builder may have committed them meanwhile
            first: dict[bytes, int] = {}
            for pos in np.flatnonzero(rows < 0).tolist():
                first.setdefault(keys[pos], pos)
            if first:
                positions = np.asarray(sorted(first.values()), dtype=np.int64)
                log.info(
                    "decoded-image cache: decoding %d of %d %s images (%s) into %s",
                    len(positions),
                    index.num_images,
                    index.name,
                    backend,
                    store.root,
                )
                build_rows(
                    store,
                    index,
                    transform,
                    positions,
                    keys,
                    workers=workers,
                    backend=backend,
                    progress=progress,
                    chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS,
                )
                computed, used = len(positions), backend
            rows, _ = store.lookup(keys)
    else:
        memo.save()  # a no-op unless a file was hashed again (a new mtime)
    if (rows < 0).any():  # unreachable unless the store was deleted while this ran
        raise UserError(
            "rows are missing from the decoded-image cache after building it", path=str(store.root), field=CACHE_FIELD
        )
    stats = ImageCacheStats(
        split=index.name,
        images=index.num_images,
        distinct=len(set(keys)),
        computed=computed,
        reused=reused,
        backend=used,
        seconds=time.perf_counter() - start,
        store=store.root,
    )
    return DecodedImages(store, rows, transform), stats


def _ensure_dir(cache_dir: Path) -> None:
    """``cache_dir`` made and writable, or a ``UserError`` naming it and ``data.image_cache_dir``."""
    from orchestrator.teachers.cache import ensure_cache_dir

    try:
        ensure_cache_dir(cache_dir, field=CACHE_FIELD)
    except UserError as err:
        raise UserError(
            err.detail.replace("teacher cache", "decoded-image cache"), path=err.path, field=err.field
        ) from None


# -------------------------------------------------------------------------------------------- configs
def image_cache_root(data_cfg: Any) -> Path:
    """``data.image_cache_dir``, by default ``$XDG_CACHE_HOME/itr/images`` (``~/.cache/itr/images``): one per user
    and node, outside any run folder, so every run on the node shares it."""
    if data_cfg.image_cache_dir is not None:
        return Path(data_cfg.image_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "itr" / "images"


def image_input(cfg: Any, index: DatasetIndex, preprocess: Callable, *, progress: bool = False):
    """The image side of a split per ``data.image_cache`` of the experiment ``cfg``: ``decoded`` ->
    :class:`DecodedImages` (its missing rows built here if the driver did not build them), ``tensor_ram`` -> float32
    tensors memoised in this process, ``none`` -> decoded and preprocessed on every call."""
    from orchestrator.data.loader import ImageTensorCache

    mode = cfg.data.image_cache
    if mode == "tensor_ram":
        return ImageTensorCache(index, preprocess)
    if mode == "none":
        return DecodeImages(index, preprocess)
    transform = split_preprocess(preprocess, cfg.model.name)
    workers = build_workers(cfg.data) if cfg.scaling.backend == "local" else max(1, int(cfg.scaling.cpus_per_worker))
    images, stats = decoded_images(index, transform, image_cache_root(cfg.data), workers=workers, progress=progress)
    if stats.computed:
        log.warning(
            "decoded-image cache: %d %s images were decoded by the training process; itr train's driver "
            "and `itr prepare` decode them beforehand, in parallel",
            stats.computed,
            index.name,
        )
    return images


def build_workers(data_cfg: Any) -> int:
    """Decoding processes of a driver-side build: ``data.image_cache_workers`` (``auto``: every CPU)."""
    value = data_cfg.image_cache_workers
    return max(1, os.cpu_count() or 1) if value == "auto" else int(value)


def prepare_image_cache(
    cfg: Any, roles: Sequence[SplitRole] = ("train", "val"), *, progress: bool = True
) -> dict[str, ImageCacheStats]:
    """On the driver, before any worker starts: decode every image of each split ``role`` not cached yet.

    A no-op unless ``data.image_cache`` is ``decoded`` and the image tower reads pixels (a locked, cached image
    tower reads its cached features instead); with ``data.augment`` or streamed (webdataset) training pairs the
    train split is not cached. Decodes in a local process pool, or as Ray tasks when
    ``scaling.backend`` is ``ray`` and a cluster is connected (``RAY_ADDRESS``). A split the data lacks is skipped.
    """
    from orchestrator.data.splits import load_split
    from orchestrator.models.student import build_student

    if cfg.data.image_cache != "decoded" or (cfg.model.lock_image and cfg.model.cache_locked_towers):
        return {}
    if cfg.data.augment != "none" or cfg.data.resolved_format == "webdataset":  # train: decoded every epoch
        roles = [r for r in roles if r != "train"]
    model_cfg = cfg.model.model_copy(
        update={"pretrained": None, "lock_image": False, "lock_text": False, "grad_checkpointing": False}
    )
    transform = split_preprocess(build_student(model_cfg).preprocess, cfg.model.name)
    backend = _build_backend(cfg)
    out: dict[str, ImageCacheStats] = {}
    for role in roles:
        try:
            index = load_split(cfg.data, role)
        except UserError as err:
            if role == "train":
                raise
            log.info("decoded-image cache: skipping split %s (%s)", role, err)
            continue
        _, stats = decoded_images(
            index,
            transform,
            image_cache_root(cfg.data),
            workers=build_workers(cfg.data),
            backend=backend,
            progress=progress,
        )
        log.info(
            "decoded-image cache: %s: %d images, %d decoded, %d cached (%.1f s) in %s",
            index.name,
            stats.images,
            stats.computed,
            stats.reused,
            stats.seconds,
            stats.store,
        )
        out[role] = stats
    return out


def _build_backend(cfg: Any) -> str:
    """``ray`` when the run uses Ray and a cluster is there to decode on; ``local`` otherwise."""
    if cfg.scaling.backend != "ray":
        return "local"
    import ray

    if ray.is_initialized():
        return "ray"
    if os.environ.get("RAY_ADDRESS"):
        from orchestrator.run import init_ray

        init_ray()
        return "ray"
    return "local"


__all__ = [
    "DecodeImages",
    "DecodedImages",
    "ImageCacheStats",
    "PixelStore",
    "build_workers",
    "decoded_images",
    "image_cache_root",
    "image_input",
    "image_keys",
    "prepare_image_cache",
]
