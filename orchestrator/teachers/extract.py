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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from orchestrator.config import TeachersConfig
from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError
from orchestrator.teachers.cache import (
    ShardStore,
    ViewMismatch,
    ensure_cache_dir,
    expected_rows,
    items_digest,
    open_view,
    write_view,
)
from orchestrator.teachers.encoders import TeacherEncoder, build_image_teacher, build_text_teacher
from orchestrator.teachers.hashing import FileHashMemo
from orchestrator.teachers.placement import Backend, resolve_placement
from orchestrator.teachers.store_fill import encode_into_store, item_keys, load_items

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
        view, view_reused = _file_view(encoder, index, view_dir, rows)
        return view, (stats(rows, 0, rows, True) if view_reused else stats(rows, rows, 0, False))

    keys = item_keys(modality, index, memo, progress=progress)
    memo.save()
    digest = items_digest(keys)
    reusable = _valid_view(encoder, index, view_dir, digest)
    if reusable is not None:
        return reusable, stats(len(set(keys)), 0, rows, True)
    view, computed, reused = _build_view(
        encoder,
        index,
        store,
        view_dir,
        keys,
        digest,
        backend=backend,
        num_actors=num_actors,
        batch_size=batch_size,
        shard_size=shard_size,
        progress=progress,
        device=device,
    )
    return view, stats(len(set(keys)), computed, reused, False)


def _valid_view(encoder: TeacherEncoder, index: DatasetIndex, view_dir: Path, digest: str) -> np.memmap | None:
    """The split view at ``view_dir`` when it is valid for ``encoder`` and items ``digest``, else ``None``
    (with a warning when there was a view to rebuild)."""
    try:
        return open_view(view_dir, index, modality=encoder.modality, identity=encoder.identity, digest=digest)
    except ViewMismatch as err:
        if (view_dir / "meta.json").exists():
            log.warning("rebuilding teacher view: %s", err)
    return None


def _file_view(encoder: TeacherEncoder, index: DatasetIndex, view_dir: Path, rows: int) -> tuple[np.memmap, bool]:
    """(view, reused?) of a non-cacheable (file) teacher: its features keyed by image id, written as the view."""
    digest = items_digest([i.encode() + b"\0" for i in index.image_ids])
    view = _valid_view(encoder, index, view_dir, digest)
    if view is not None:
        return view, True
    feats = encoder.encode(list(range(rows)))
    view = write_view(
        view_dir,
        feats,
        index=index,
        modality=encoder.modality,
        identity=encoder.identity,
        spec=encoder.spec,
        preprocessing=encoder.preprocessing,
        digest=digest,
    )
    return view, False


def _missing_rows(keys: list[bytes], table: dict[bytes, tuple[int, int]]) -> tuple[np.ndarray, int]:
    """(int64 positions (m,) of the first row of each distinct key not in ``table``, ascending; rows whose key
    ``table`` holds)."""
    first: dict[bytes, int] = {}
    for pos, key in enumerate(keys):
        if key not in table:
            first.setdefault(key, pos)
    missing = np.asarray(sorted(first.values()), dtype=np.int64)
    return missing, sum(1 for key in keys if key in table)


def _build_view(
    encoder: TeacherEncoder,
    index: DatasetIndex,
    store: ShardStore,
    view_dir: Path,
    keys: list[bytes],
    digest: str,
    *,
    backend: Backend,
    num_actors: int,
    batch_size: int,
    shard_size: int,
    progress: bool,
    device: str | None,
) -> tuple[np.memmap, int, int]:
    """Encode the rows of ``keys`` that ``store`` lacks, then materialise the split view from the store:
    (view float32 (rows, D), distinct items computed, rows reused from the store)."""
    modality = encoder.modality
    rows = expected_rows(index, modality)
    table, paths = store.key_map()
    missing, reused = _missing_rows(keys, table)
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
        encode_into_store(
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
    return view, len(missing), reused


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
