"""Teacher-feature extraction for one split, through the content-addressed cache.

:func:`extract_split` computes the image teacher's features for every image of a split and the text
teacher's features for every caption, reusing whatever the cache already holds:

1. item keys: sha256 of each caption string / image file (memoised by path, size, mtime) / rendered
   image pixels;
2. if the split view of (teacher, ``index.content_hash()``) exists and its key digest matches, it is
   opened memory-mapped and nothing else happens;
3. otherwise the keys missing from the teacher's shard store are encoded (locally, or as a Ray Data job
   with ``backend="ray"``), written as shards of ``shard_size`` items each as they complete (a killed run
   resumes from them), and the split view is materialised from the store.

The training loop reads ``features.image[index.caption_image[c]]`` / ``features.text[c]``; Ray workers
should reopen the views from ``features.view_dirs`` with :func:`open_features` (a memmap pickles as a
full copy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from orchestrator.config import TeachersConfig
from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError
from orchestrator.teachers.cache import (
    ShardStore,
    ViewMismatch,
    count_nonfinite_rows,
    ensure_cache_dir,
    expected_rows,
    items_digest,
    open_view,
    write_view,
)
from orchestrator.teachers.encoders import TeacherEncoder, build_image_teacher, build_text_teacher
from orchestrator.teachers.hashing import FileHashMemo, pixels_key, text_key
from orchestrator.teachers.placement import Backend, resolve_placement

log = logging.getLogger(__name__)

Modality = Literal["image", "text"]
DEFAULT_SHARD_SIZE = 1024


@dataclass
class ExtractStats:
    """What one extraction of one side did.

    ``total``: rows of the view (images or captions); ``unique``: distinct item contents among them;
    ``computed``: distinct items encoded by this call; ``reused``: rows served from features already
    cached before this call; ``view_reused``: the split view was valid and opened as is.
    """

    modality: str
    spec: str
    identity: str
    total: int
    unique: int
    computed: int
    reused: int
    view_reused: bool
    backend: str
    seconds: float
    view_dir: Path


@dataclass
class SplitTeacherFeatures:
    """Teacher features of one split, memory-mapped and ordered like the index.

    ``image``: float32 (num_images, D_i) ``np.memmap`` in ``index.image_ids`` order, or ``None`` when no
    image teacher is configured; ``text``: float32 (num_captions, D_t) in ``index.captions`` order, or
    ``None``. Rows are L2-normalised.
    """

    index_name: str
    content_hash: str
    image: np.memmap | None = None
    text: np.memmap | None = None
    image_identity: str | None = None
    text_identity: str | None = None
    stats: dict[str, ExtractStats] = field(default_factory=dict)

    @property
    def computed(self) -> dict[str, int]:
        """Side -> distinct items encoded by the call that built this object."""
        return {k: s.computed for k, s in self.stats.items()}

    @property
    def reused(self) -> dict[str, int]:
        """Side -> rows served from the cache."""
        return {k: s.reused for k, s in self.stats.items()}

    @property
    def view_dirs(self) -> dict[str, Path]:
        """Side -> split view folder (``features.npy`` + ``meta.json``): reopen with :func:`open_features`."""
        return {k: s.view_dir for k, s in self.stats.items()}

    def pair_features(
        self, caption_indices: np.ndarray, caption_image: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(image (B, D_i), text (B, D_t)) teacher features of the pairs of captions ``caption_indices`` (B,):
        each caption's image row and its own row (in-memory float32 copies; ``None`` for a missing side)."""
        caption_indices = np.asarray(caption_indices, dtype=np.int64)
        img = None if self.image is None else np.asarray(self.image[np.asarray(caption_image)[caption_indices]])
        txt = None if self.text is None else np.asarray(self.text[caption_indices])
        return img, txt


@dataclass
class TeacherSet:
    """The configured teachers, built once (models load lazily) and reusable across splits."""

    image: TeacherEncoder | None = None
    text: TeacherEncoder | None = None


def load_teachers(cfg: TeachersConfig, device: str | None = None) -> TeacherSet:
    """Build the encoders named by ``cfg.image`` / ``cfg.text`` (``UserError`` for a bad spec, or for a
    ``cfg.cache_dir`` that cannot be written: checked first, before any model loads)."""
    ensure_cache_dir(cfg.cache_dir)
    image = text = None
    if cfg.image:
        image = build_image_teacher(cfg.image, cfg.cache_dir, device, batch_size=cfg.batch_size)
    if cfg.text:
        text = build_text_teacher(cfg.text, cfg.cache_dir, device, batch_size=cfg.batch_size)
    return TeacherSet(image=image, text=text)


# --------------------------------------------------------------------------------------------- items
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


def _local_stream(
    encoder: TeacherEncoder, index: DatasetIndex, positions: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions (b,), float32 features (b, D)) batch by batch, in order."""
    for lo in range(0, len(positions), batch_size):
        chunk = positions[lo : lo + batch_size]
        yield chunk, encoder.encode(load_items(encoder, index, chunk.tolist()))


# ------------------------------------------------------------------------------------------- extract
def extract_modality(
    encoder: TeacherEncoder,
    index: DatasetIndex,
    cache_dir: Path | str,
    *,
    backend: Backend = "local",
    num_actors: int = 1,
    batch_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    device: str | None = None,
    memo: FileHashMemo | None = None,
) -> tuple[np.memmap, ExtractStats]:
    """One side of :func:`extract_split`: (memmap float32 (rows, D) in index order, stats)."""
    start = time.perf_counter()
    modality = encoder.modality
    memo = memo or FileHashMemo(Path(cache_dir) / "file-hashes.json")
    encoder = encoder.bind(index)
    store = ShardStore.for_encoder(Path(cache_dir), encoder)
    view_dir = store.view_dir(index)
    rows = expected_rows(index, modality)

    def stats(unique: int, computed: int, reused: int, view_reused: bool) -> ExtractStats:
        return ExtractStats(
            modality=modality,
            spec=encoder.spec,
            identity=encoder.identity,
            total=rows,
            unique=unique,
            computed=computed,
            reused=reused,
            view_reused=view_reused,
            backend=backend,
            seconds=time.perf_counter() - start,
            view_dir=view_dir,
        )

    if not encoder.cacheable:  # file: the features are already on disk, keyed by image id
        digest = items_digest([i.encode() + b"\0" for i in index.image_ids])
        try:
            view = open_view(view_dir, index, modality=modality, identity=encoder.identity, digest=digest)
            return view, stats(rows, 0, rows, True)
        except ViewMismatch as err:
            if (view_dir / "meta.json").exists():
                log.warning("rebuilding teacher view: %s", err)
        feats = encoder.encode(list(range(rows)))
        view = write_view(
            view_dir,
            feats,
            index=index,
            modality=modality,
            identity=encoder.identity,
            spec=encoder.spec,
            preprocessing=encoder.preprocessing,
            digest=digest,
        )
        return view, stats(rows, rows, 0, False)

    keys = item_keys(modality, index, memo, progress=progress)
    memo.save()
    digest = items_digest(keys)
    try:
        view = open_view(view_dir, index, modality=modality, identity=encoder.identity, digest=digest)
        return view, stats(len(set(keys)), 0, rows, True)
    except ViewMismatch as err:
        if (view_dir / "meta.json").exists():
            log.warning("rebuilding teacher view: %s", err)

    table, paths = store.key_map()
    first: dict[bytes, int] = {}
    for pos, key in enumerate(keys):
        if key not in table:
            first.setdefault(key, pos)
    missing = np.asarray(sorted(first.values()), dtype=np.int64)
    reused = sum(1 for key in keys if key in table)
    if len(missing):
        log.info(
            "%s teacher %s: encoding %d of %d %s items (%s)",
            modality,
            encoder.spec,
            len(missing),
            rows,
            index.name,
            backend,
        )
        _encode_into_store(
            encoder,
            index,
            missing,
            keys,
            store,
            table,
            paths,
            backend=backend,
            num_actors=num_actors,
            batch_size=batch_size,
            shard_size=shard_size,
            progress=progress,
            device=device,
        )
    if store.dim is None:
        raise RuntimeError("empty teacher store after encoding")  # unreachable: rows >= 1
    locations = [table[key] for key in keys]
    view = write_view(
        view_dir,
        None,
        index=index,
        modality=modality,
        identity=encoder.identity,
        spec=encoder.spec,
        preprocessing=encoder.preprocessing,
        digest=digest,
        shape=(rows, store.dim),
        fill=lambda out: store.gather(locations, paths, out),
    )
    return view, stats(len(set(keys)), len(missing), reused, False)


def _encode_into_store(
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
        stream = _local_stream(encoder, index, missing, batch_size)
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


def extract_split(
    teachers_cfg: TeachersConfig,
    index: DatasetIndex,
    *,
    progress: bool = True,
    backend: Backend | Literal["auto"] | None = None,
    device: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    teachers: TeacherSet | None = None,
) -> SplitTeacherFeatures:
    """Teacher features of every image and caption of ``index``, through the cache.

    Args:
        teachers_cfg: ``teachers`` config (specs, ``cache_dir``, ``batch_size``, ``backend``, ``num_actors``).
        index: the split.
        progress: show tqdm bars (on a terminal only: never in a captured or logged stderr).
        backend: ``"local"``, ``"ray"`` (a Ray Data actor pool) or ``"auto"``; default ``teachers_cfg.backend``
            (:mod:`orchestrator.teachers.placement` decides ``auto``, and the device where ``device`` is None).
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        shard_size: items per cache shard (the unit a killed run resumes from).
        teachers: encoders from :func:`load_teachers`, to reuse loaded models across splits.

    Returns:
        :class:`SplitTeacherFeatures`: ``image`` float32 (num_images, D_i) and ``text`` float32
        (num_captions, D_t) memmaps in index order (``None`` for an unconfigured side), with counts of what
        was computed and reused.
    """
    if teachers is None:
        teachers = load_teachers(teachers_cfg, device)
    else:
        ensure_cache_dir(teachers_cfg.cache_dir)
        for side in ("image", "text"):
            encoder, spec = getattr(teachers, side), getattr(teachers_cfg, side)
            if (encoder.spec if encoder is not None else None) != spec:
                raise ValueError(
                    f"teachers.{side} is {spec!r} but the given {side} encoder is "
                    f"{encoder.spec if encoder is not None else None!r}"
                )
    placement = resolve_placement(backend or teachers_cfg.backend, teachers_cfg.num_actors)
    device = device or placement.device
    cache_dir = Path(teachers_cfg.cache_dir)
    memo = FileHashMemo(cache_dir / "file-hashes.json")
    result = SplitTeacherFeatures(index_name=index.name, content_hash=index.content_hash())
    for modality, encoder in (("image", teachers.image), ("text", teachers.text)):
        if encoder is None:
            continue
        view, st = extract_modality(
            encoder,
            index,
            cache_dir,
            backend=placement.backend,
            num_actors=placement.num_actors,
            batch_size=teachers_cfg.batch_size,
            shard_size=shard_size,
            progress=progress,
            device=device,
            memo=memo,
        )
        setattr(result, modality, view)
        setattr(result, f"{modality}_identity", st.identity)
        result.stats[modality] = st
        log.info(
            "%s teacher %s on %s: %d rows (%d distinct), %d computed, %d reused%s, D=%d, %.1f s",
            modality,
            st.spec,
            index.name,
            st.total,
            st.unique,
            st.computed,
            st.reused,
            " (split view reused)" if st.view_reused else "",
            view.shape[1],
            st.seconds,
        )
    memo.save()
    return result


# ---------------------------------------------------------------------------------------- validation
def check_features(features: SplitTeacherFeatures, index: DatasetIndex) -> None:
    """``UserError`` unless ``features`` belong to ``index`` (content hash) with one row per image / caption."""
    if features.content_hash != index.content_hash():
        raise UserError(
            f"teacher features were computed for another dataset ({features.index_name!r}, content hash "
            f"{features.content_hash}), not {index.name!r} ({index.content_hash()})",
            field="teachers",
        )
    for modality in ("image", "text"):
        arr = getattr(features, modality)
        if arr is None:
            continue
        rows = expected_rows(index, modality)
        if arr.ndim != 2 or arr.shape[0] != rows:
            where = features.stats[modality].view_dir if modality in features.stats else None
            raise UserError(
                f"{modality} teacher features have shape {tuple(arr.shape)}, expected ({rows}, D) for {index.name!r}",
                path=str(where) if where else None,
                field="teachers",
            )


def open_features(
    index: DatasetIndex, *, image_view: Path | str | None = None, text_view: Path | str | None = None
) -> SplitTeacherFeatures:
    """Reopen split views (e.g. in a Ray worker, from ``features.view_dirs``) memory-mapped, verified against
    ``index``; ``UserError`` for a view of another dataset or of the wrong shape."""
    from orchestrator.teachers.cache import read_view_meta

    result = SplitTeacherFeatures(index_name=index.name, content_hash=index.content_hash())
    for modality, view_dir in (("image", image_view), ("text", text_view)):
        if view_dir is None:
            continue
        view = open_view(Path(view_dir), index, modality=modality)
        setattr(result, modality, view)
        setattr(result, f"{modality}_identity", read_view_meta(Path(view_dir)).get("identity"))
    return result


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ExtractStats",
    "SplitTeacherFeatures",
    "TeacherSet",
    "check_features",
    "extract_modality",
    "extract_split",
    "item_keys",
    "load_items",
    "load_teachers",
    "open_features",
]
