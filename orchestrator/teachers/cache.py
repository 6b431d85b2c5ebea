"""The content-addressed teacher-feature cache: per-teacher shard stores and per-split views.

Layout under ``teachers.cache_dir``::

    file-hashes.json                         sha256 of files, memoised by (path, size, mtime_ns)
    models/all-mpnet-base-v2/                the packaged mpnet, unzipped once
    <modality>-<slug>-<store hash>/          one store per (teacher identity, preprocessing)
        store.json                           identity, spec, preprocessing, dim
        shards/<time>-<pid>-<rand>.npy       append-only shards: structured (key V32, feature f4 (D,))
        views/<index content hash>/
            features.npy                     float32 (N, D), rows in the split's order (memory-mapped)
            meta.json                        content hash, identity, shape, digest of the item keys

Item keys are 32-byte sha256 digests of the item content (see :mod:`orchestrator.teachers.hashing`), so
any split that holds the same caption or the same image file reuses its features. Every file is written
to a temporary name in the same folder and renamed into place (atomic on POSIX): a killed run leaves only
complete shards, and the next run resumes from them. A view is valid only once its ``meta.json`` exists
(written last) and matches the split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_BYTES = 32


class ViewMismatch(UserError):
    """A split view that does not belong to the given split / teacher, or is damaged."""


def store_name(identity: str, preprocessing: str, modality: str, spec: str) -> str:
    """``<modality>-<slug of spec>-<sha256(format, identity, preprocessing)[:16]>``."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION}\n{identity}\n{preprocessing}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.split(":", 1)[-1].split("@", 1)[0].rstrip("/").split("/")[-1])
    return f"{modality}-{slug[:40] or 'teacher'}-{digest}"


def items_digest(keys: Sequence[bytes]) -> str:
    """sha256 (hex) over the ordered item keys of a split."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key)
    return h.hexdigest()


#: Rows per block of :func:`check_finite` (16384 x 768 float32 = 48 MiB read at a time).
FINITE_CHECK_ROWS = 16384


def count_nonfinite_rows(features: np.ndarray, block_rows: int = FINITE_CHECK_ROWS) -> tuple[int, int | None]:
    """(rows holding a NaN or an inf, the first such row or ``None``) of ``features`` (N, ...), block by block.

    Each block is summed first (NaN and inf propagate through a sum); only a block whose sum is not
    finite is scanned element-wise, so a clean memmap costs one pass of reading and adding.
    """
    n_bad, first = 0, None
    for lo in range(0, len(features), block_rows):
        block = np.asarray(features[lo : lo + block_rows])
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: no RuntimeWarning on stderr
            total = block.sum(dtype=np.float64)
        if np.isfinite(total):
            continue
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        count = int(bad.sum())
        if count and first is None:
            first = lo + int(np.argmax(bad))
        n_bad += count
    return n_bad, first


def check_finite(features: np.ndarray, *, path: Path | str, field: str | None = None, hint: str = "") -> None:
    """``UserError`` ``"<path>:<field>: N of M teacher features are not finite ..."`` unless every row of
    ``features`` (M, D) is finite; ``hint`` (what to do) ends the message."""
    n_bad, first = count_nonfinite_rows(features)
    if n_bad:
        raise UserError(
            f"{n_bad} of {len(features)} teacher features are not finite (NaN or inf; first at row "
            f"{first}){'; ' + hint if hint else ''}",
            path=str(path),
            field=field,
        )


def ensure_cache_dir(cache_dir: Path | str, field: str = "teachers.cache_dir") -> Path:
    """Create ``cache_dir`` and check that a file can be created in it, before anything is computed.

    ``UserError`` naming the folder and ``field`` when it lies under a regular file, in a read-only or
    virtual file system (``/proc``), or is not writable.
    """
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the teacher cache folder ({err.strerror or err})", path=str(path), field=field
        ) from None
    if not path.is_dir():
        raise UserError("the teacher cache folder is not a folder", path=str(path), field=field)
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "xb") as fh:
            fh.write(b"ok")
    except OSError as err:
        raise UserError(
            f"the teacher cache folder is not writable ({err.strerror or err})", path=str(path), field=field
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ShardStore:
    """Append-only (key, feature) shards of one teacher (one identity + preprocessing).

    ``root``: the store folder. Shards are ``.npy`` files of a structured dtype
    ``[("key", "V32"), ("feature", "<f4", (D,))]``, opened memory-mapped.
    """

    def __init__(self, root: Path, *, identity: str, preprocessing: str, spec: str, modality: str) -> None:
        self.root = Path(root)
        self.identity = identity
        self.preprocessing = preprocessing
        self.spec = spec
        self.modality = modality
        self.shard_dir = self.root / "shards"
        self._dim: int | None = None

    @classmethod
    def for_encoder(cls, cache_dir: Path, encoder: Any) -> ShardStore:
        """The store of ``encoder`` (a :class:`~orchestrator.teachers.encoders.TeacherEncoder`) under ``cache_dir``."""
        identity, pre = encoder.identity, encoder.preprocessing
        root = Path(cache_dir) / store_name(identity, pre, encoder.modality, encoder.spec)
        return cls(root, identity=identity, preprocessing=pre, spec=encoder.spec, modality=encoder.modality)

    # ------------------------------------------------------------------------------------------ meta
    @property
    def dim(self) -> int | None:
        """D of the stored features (``None`` while the store is empty)."""
        if self._dim is None and (self.root / "store.json").is_file():
            self._dim = int(json.loads((self.root / "store.json").read_text())["dim"])
        return self._dim

    def _ensure_meta(self, dim: int) -> None:
        if self.dim is not None:
            if self.dim != dim:
                raise UserError(
                    f"teacher features have dimension {dim} but the store holds {self.dim}", path=str(self.root)
                )
            return
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "identity": self.identity,
            "spec": self.spec,
            "modality": self.modality,
            "preprocessing": self.preprocessing,
            "dim": int(dim),
        }
        _atomic_write_text(self.root / "store.json", json.dumps(meta, indent=1))
        self._dim = int(dim)

    # ---------------------------------------------------------------------------------------- shards
    def shard_paths(self) -> list[Path]:
        """Complete shards, oldest first."""
        if not self.shard_dir.is_dir():
            return []
        return sorted(p for p in self.shard_dir.glob("*.npy") if not p.name.startswith("."))

    def _open(self, path: Path) -> np.ndarray:
        return np.load(path, mmap_mode="r")

    def key_map(self) -> tuple[dict[bytes, tuple[int, int]], list[Path]]:
        """(key -> (shard number, row), shard paths). The first shard holding a key wins."""
        paths = self.shard_paths()
        table: dict[bytes, tuple[int, int]] = {}
        for s, path in enumerate(paths):
            try:
                arr = self._open(path)
            except (OSError, ValueError) as err:
                log.warning("skipping an unreadable teacher shard %s (%s)", path, err)
                continue
            if arr.dtype.names != ("key", "feature"):
                log.warning("skipping a teacher shard of another format: %s", path)
                continue
            raw = np.ascontiguousarray(arr["key"]).tobytes()
            for row in range(len(arr)):
                table.setdefault(raw[row * KEY_BYTES : (row + 1) * KEY_BYTES], (s, row))
        return table, paths

    def append(self, keys: Sequence[bytes], features: np.ndarray) -> Path:
        """Write one shard of ``keys`` (n,) and float32 ``features`` (n, D), atomically; returns its path."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise ValueError(f"features {features.shape} do not match {len(keys)} keys")
        self._ensure_meta(features.shape[1])
        dtype = np.dtype([("key", f"V{KEY_BYTES}"), ("feature", "<f4", (features.shape[1],))])
        arr = np.empty(len(keys), dtype=dtype)
        arr["key"] = np.frombuffer(b"".join(keys), dtype=f"V{KEY_BYTES}")
        arr["feature"] = features
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        tmp = self.shard_dir / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.shard_dir / name)
        return self.shard_dir / name

    def gather(self, locations: Sequence[tuple[int, int]], paths: Sequence[Path], out: np.ndarray) -> None:
        """Fill ``out`` (len(locations), D) with the stored features at ``locations`` ((shard, row) each)."""
        loc = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
        for s in np.unique(loc[:, 0]).tolist():
            dst = np.flatnonzero(loc[:, 0] == s)
            src = loc[dst, 1]
            feats = self._open(paths[s])["feature"]
            order = np.argsort(src, kind="stable")  # read the shard front to back
            out[dst[order]] = feats[src[order]]

    # ----------------------------------------------------------------------------------------- views
    def view_dir(self, index: DatasetIndex) -> Path:
        """The split view folder of ``index`` (keyed by ``index.content_hash()``)."""
        return self.root / "views" / index.content_hash()


def write_view(
    view_dir: Path,
    features: np.ndarray | None,
    *,
    index: DatasetIndex,
    modality: str,
    identity: str,
    spec: str,
    preprocessing: str,
    digest: str,
    fill: Any = None,
    shape: tuple[int, int] | None = None,
) -> np.memmap:
    """Write a split view atomically: ``features.npy`` float32 (N, D), then ``meta.json``; return it memory-mapped.

    Either ``features`` (N, D) is given, or ``shape`` and ``fill(out)`` which fills a writable memmap ``out``
    in place (so an N x D view never has to fit in memory).
    """
    view_dir.mkdir(parents=True, exist_ok=True)
    if features is not None:
        shape = (int(features.shape[0]), int(features.shape[1]))
    assert shape is not None
    tag = uuid.uuid4().hex[:8]
    tmp = view_dir / f".features.{tag}.npy.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    if features is not None:
        out[:] = features
    else:
        fill(out)
    out.flush()
    del out
    os.replace(tmp, view_dir / "features.npy")
    meta = {
        "format": FORMAT_VERSION,
        "index_name": index.name,
        "content_hash": index.content_hash(),
        "modality": modality,
        "identity": identity,
        "spec": spec,
        "preprocessing": preprocessing,
        "shape": list(shape),
        "items_digest": digest,
    }
    _atomic_write_text(view_dir / "meta.json", json.dumps(meta, indent=1))
    return open_view(view_dir, index, modality=modality, identity=identity)


def expected_rows(index: DatasetIndex, modality: str) -> int:
    """Rows of a view of ``index``: ``num_images`` (image side) or ``num_captions`` (text side)."""
    return index.num_images if modality == "image" else index.num_captions


def read_view_meta(view_dir: Path) -> dict[str, Any]:
    """The ``meta.json`` of a split view; :class:`ViewMismatch` when absent or unreadable."""
    path = Path(view_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ViewMismatch(
            "no meta.json beside the teacher features (an incomplete or foreign cache folder)", path=str(path)
        ) from None
    except (OSError, ValueError) as err:
        raise ViewMismatch(f"unreadable meta.json ({err})", path=str(path)) from None
    if not isinstance(meta, dict):
        raise ViewMismatch("meta.json is not an object", path=str(path))
    return meta


def open_view(
    view_dir: Path, index: DatasetIndex, *, modality: str, identity: str | None = None, digest: str | None = None
) -> np.memmap:
    """The split view in ``view_dir`` as a read-only ``np.memmap`` float32 (N, D), verified against ``index``.

    Raises :class:`ViewMismatch` (a ``UserError``) when the features belong to another dataset (content
    hash), another teacher (``identity``) or other item content (``digest``), or have the wrong shape; a
    plain ``UserError`` naming ``features.npy`` when any row holds a NaN or an inf (checked here, once).
    """
    view_dir = Path(view_dir)
    meta = read_view_meta(view_dir)
    path = view_dir / "features.npy"
    if meta.get("content_hash") != index.content_hash():
        raise ViewMismatch(
            f"these teacher features belong to another dataset ({meta.get('index_name')!r}, content "
            f"hash {meta.get('content_hash')}), not {index.name!r} (content hash "
            f"{index.content_hash()})",
            path=str(path),
        )
    if meta.get("modality") != modality:
        raise ViewMismatch(f"these are {meta.get('modality')} features, not {modality} features", path=str(path))
    if identity is not None and meta.get("identity") != identity:
        raise ViewMismatch(
            f"these features come from teacher {meta.get('identity')!r}, not {identity!r}", path=str(path)
        )
    if digest is not None and meta.get("items_digest") != digest:
        raise ViewMismatch("the split's item contents changed since these features were computed", path=str(path))
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ViewMismatch("features.npy is missing", path=str(path)) from None
    except (OSError, ValueError) as err:
        raise ViewMismatch(f"unreadable teacher features ({err})", path=str(path)) from None
    rows = expected_rows(index, modality)
    if (
        arr.dtype != np.float32
        or arr.ndim != 2
        or arr.shape[0] != rows
        or list(arr.shape) != list(meta.get("shape", []))
    ):
        raise ViewMismatch(
            f"teacher features have shape {arr.shape} ({arr.dtype}); expected float32 ({rows}, "
            f"{(meta.get('shape') or [None, 'D'])[1]}) for {index.name!r}",
            path=str(path),
        )
    check_finite(
        arr,
        path=path,
        field=f"teachers.{modality}",  # once per open, in blocks: never per batch
        hint="delete this teacher's cache folder to recompute them",
    )
    return arr


__all__ = [
    "FORMAT_VERSION",
    "ShardStore",
    "ViewMismatch",
    "check_finite",
    "count_nonfinite_rows",
    "ensure_cache_dir",
    "expected_rows",
    "items_digest",
    "open_view",
    "read_view_meta",
    "store_name",
    "write_view",
]
