"""The encoding half of teacher extraction: item content keys, and encoding the rows the shard store lacks.

:func:`item_keys` gives each row of a split its 32-byte content key; :func:`encode_into_store` encodes the
missing rows (locally, or as a Ray Data job with ``backend="ray"``: :mod:`orchestrator.teachers.ray_backend`,
imported only then) and appends them to the teacher's :class:`~orchestrator.teachers.cache.ShardStore` in
shards as they complete. :mod:`orchestrator.teachers.extract` drives both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError
from orchestrator.teachers.cache import ShardStore, count_nonfinite_rows
from orchestrator.teachers.encoders import TeacherEncoder
from orchestrator.teachers.hashing import FileHashMemo, pixels_key, text_key
from orchestrator.teachers.placement import Backend

log = logging.getLogger("orchestrator.teachers.extract")  # the extraction's messages, under one logger


def item_keys(
    modality: str, index: DatasetIndex, memo: FileHashMemo | None = None, progress: bool = False
) -> list[bytes]:
    """32-byte content keys, one per row: captions (``num_captions``) or images (``num_images``)."""
    if modality == "text":
        return [text_key(c) for c in index.captions]
    from tqdm.auto import tqdm

    memo = memo or FileHashMemo()
    keys: list[bytes] = []
    bar = tqdm(
        total=index.num_images,
        desc=f"hashing {index.name} images",
        unit="img",
        disable=None if progress else True,
        leave=False,
    )  # None: only on a terminal
    for i in range(index.num_images):
        if index.image_paths is not None:
            path = index.image_paths[i]
            try:
                keys.append(memo.digest(path))
            except FileNotFoundError:
                raise UserError("image file not found", path=str(path)) from None
        else:
            keys.append(pixels_key(index.load_image(i)))
        bar.update(1)
    bar.close()
    return keys


def load_items(encoder: TeacherEncoder, index: DatasetIndex, positions: Sequence[int]) -> list[Any]:
    """The ``encode`` inputs of rows ``positions``: captions, PIL images, or the positions themselves."""
    if encoder.inputs == "index":
        return [int(p) for p in positions]
    if encoder.inputs == "text":
        return [index.captions[int(p)] for p in positions]
    return [index.load_image(int(p)) for p in positions]


def local_stream(
    encoder: TeacherEncoder, index: DatasetIndex, positions: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions (b,), float32 features (b, D)) batch by batch, in order."""
    for lo in range(0, len(positions), batch_size):
        chunk = positions[lo : lo + batch_size]
        yield chunk, encoder.encode(load_items(encoder, index, chunk.tolist()))


def encode_into_store(
    encoder: TeacherEncoder,
    index: DatasetIndex,
    missing: np.ndarray,
    keys: list[bytes],
    store: ShardStore,
    table: dict[bytes, tuple[int, int]],
    paths: list[Path],
    *,
    backend: Backend,
    num_actors: int,
    batch_size: int,
    shard_size: int,
    progress: bool,
    device: str | None,
) -> None:
    """Encode rows ``missing`` and append them to ``store`` in shards of ``shard_size``, updating ``table``
    and ``paths`` as each shard lands."""
    from tqdm.auto import tqdm

    if backend == "ray" and encoder.inputs != "index":
        from orchestrator.teachers.ray_backend import ray_stream

        stream = ray_stream(
            encoder, index, missing, batch_size=batch_size, num_actors=num_actors, device=device, progress=False
        )
    elif backend in ("ray", "local"):
        if backend == "ray":
            log.info("%s teacher %s is a lookup, not a model: encoding it locally", encoder.modality, encoder.spec)
        if device is not None:
            encoder.to(device)
        stream = local_stream(encoder, index, missing, batch_size)
    else:
        raise UserError(f"unknown teachers backend {backend!r} (local or ray)", field="teachers.backend")

    bar = tqdm(
        total=len(missing),
        desc=f"{encoder.modality} teacher {encoder.spec}",
        unit="item",
        disable=None if progress else True,
    )  # None: only on a terminal
    buf_keys: list[bytes] = []
    buf_feats: list[np.ndarray] = []

    def write(n: int) -> None:
        feats = np.concatenate(buf_feats) if len(buf_feats) > 1 else buf_feats[0]
        shard_keys = buf_keys[:n]
        path = store.append(shard_keys, feats[:n])
        paths.append(path)
        shard = len(paths) - 1
        for row, key in enumerate(shard_keys):
            table.setdefault(key, (shard, row))
        del buf_keys[:n]
        buf_feats[:] = [feats[n:]] if len(feats) > n else []

    try:
        for pos, feats in stream:
            feats = np.asarray(feats, dtype=np.float32)
            if feats.ndim != 2 or feats.shape[0] != len(pos):
                raise RuntimeError(f"teacher {encoder.spec} returned {feats.shape} for {len(pos)} items")
            n_bad, _ = count_nonfinite_rows(feats)
            if n_bad:  # never let a broken teacher poison the shared cache
                raise UserError(
                    f"teacher {encoder.spec} returned {n_bad} of {len(feats)} features that are not "
                    f"finite (NaN or inf) for {index.name}; that batch was not cached",
                    field=f"teachers.{encoder.modality}",
                )
            buf_keys.extend(keys[int(p)] for p in pos)
            buf_feats.append(feats)
            while len(buf_keys) >= shard_size:
                write(shard_size)
            bar.update(len(pos))
        if buf_keys:
            write(len(buf_keys))
    finally:
        bar.close()
        close = getattr(stream, "close", None)
        if close is not None:
            close()


__all__ = ["encode_into_store", "item_keys", "load_items", "local_stream"]
