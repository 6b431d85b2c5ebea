"""The row store of the decoded-image cache (:mod:`orchestrator.data.image_cache`): one transform's uint8 pixel rows
and their content keys, append-only, committed under ``flock``.

A store folder holds ``store.json`` (the transform's spec and the row shape), ``pixels.u8`` (uint8 rows
(3, H, W), raw), ``keys.bin`` (the 32-byte content key of each row, in row order), ``commit.lock`` (exclusive to
append, shared to read ``keys.bin``) and ``build.lock`` (one builder per store at a time). Pixel rows are written and
fsynced before their keys; a row counts as cached only once its key is in ``keys.bin``, so a killed append leaves at
most a torn tail, which readers ignore and the next writer truncates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from orchestrator.data.pixels import PixelTransform
from orchestrator.errors import UserError

STORE_FORMAT = 1
KEY_BYTES = 32
CACHE_FIELD = "data.image_cache_dir"


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created for an exclusive lock; a shared one opens it read-only)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


class PixelStore:
    """The uint8 rows of one transform: ``pixels.u8`` (n, 3, H, W) and ``keys.bin`` (n, 32 bytes), append-only.

    ``root``: the store folder; ``shape``: (3, H, W) of a row.
    """

    def __init__(self, root: Path, shape: tuple[int, int, int], spec: str) -> None:
        self.root = Path(root)
        self.shape = tuple(int(s) for s in shape)
        self.spec = spec
        self.row_bytes = int(np.prod(self.shape))
        self.pixels_path = self.root / "pixels.u8"
        self.keys_path = self.root / "keys.bin"
        self.commit_lock = self.root / "commit.lock"
        self.build_lock_path = self.root / "build.lock"

    @classmethod
    def for_transform(cls, cache_dir: Path, transform: PixelTransform) -> PixelStore:
        h, w = transform.size
        return cls(Path(cache_dir) / f"{h}x{w}-{transform.digest[:16]}", transform.shape, transform.spec)

    @property
    def exists(self) -> bool:
        return (self.root / "store.json").is_file()

    def create(self) -> None:
        """Make the store folder and its files (a no-op when it exists); ``UserError`` naming the folder when it
        cannot be written, or when ``store.json`` describes another transform."""
        if self.exists:
            self._check_meta()
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for path in (self.pixels_path, self.keys_path, self.commit_lock, self.build_lock_path):
                with open(path, "ab"):
                    pass
            meta = {"format": STORE_FORMAT, "shape": list(self.shape), "dtype": "uint8", "spec": self.spec}
            tmp = self.root / f".store.json.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
            os.replace(tmp, self.root / "store.json")
        except OSError as err:
            raise UserError(
                f"cannot create the decoded-image cache ({err.strerror or err})",
                path=str(err.filename or self.root),
                field=CACHE_FIELD,
            ) from None

    def _check_meta(self) -> None:
        path = self.root / "store.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(
                f"unreadable store.json ({err}); delete this folder to rebuild it", path=str(path), field=CACHE_FIELD
            ) from None
        if (
            meta.get("format") != STORE_FORMAT
            or list(meta.get("shape", [])) != list(self.shape)
            or meta.get("spec") != self.spec
        ):
            raise UserError(
                f"this store holds rows of another format or transform ({meta.get('spec')!r}); delete "
                "this folder to rebuild it",
                path=str(path),
                field=CACHE_FIELD,
            )

    # ------------------------------------------------------------------------------------------ table
    def _committed_keys(self) -> np.ndarray:
        """The committed keys, ``S32`` (n,): whole records up to the first all-zero one (a torn tail), and no more
        than ``pixels.u8`` holds rows for. Call under ``commit.lock``."""
        try:
            raw = self.keys_path.read_bytes()
            pixel_rows = self.pixels_path.stat().st_size // self.row_bytes
        except FileNotFoundError:
            return np.zeros(0, dtype="S32")
        n = min(len(raw) // KEY_BYTES, pixel_rows)
        records = np.frombuffer(raw, dtype=np.uint8, count=n * KEY_BYTES).reshape(n, KEY_BYTES)
        empty = ~records.any(axis=1)
        if empty.any():
            n = int(np.argmax(empty))
        return np.frombuffer(raw, dtype="S32", count=n)

    def keys(self) -> np.ndarray:
        """The committed keys, ``S32`` (n,) in row order (read under a shared lock)."""
        if not self.commit_lock.exists():
            return np.zeros(0, dtype="S32")
        with _flock(self.commit_lock, exclusive=False):
            return self._committed_keys()

    def lookup(self, keys: Sequence[bytes]) -> tuple[np.ndarray, int]:
        """(rows int64 (N,) of ``keys``, -1 where absent; committed row count). The first row of a key wins."""
        table = self.keys()
        query = np.frombuffer(b"".join(keys), dtype="S32") if len(keys) else np.zeros(0, dtype="S32")
        rows = np.full(len(query), -1, dtype=np.int64)
        if len(table) and len(query):
            order = np.argsort(table, kind="stable")
            ordered = table[order]
            pos = np.minimum(np.searchsorted(ordered, query), len(ordered) - 1)
            hit = ordered[pos] == query
            rows[hit] = order[pos[hit]]
        return rows, len(table)

    @contextlib.contextmanager
    def build_lock(self) -> Iterator[None]:
        """One builder of this store at a time (another process or rank waits here)."""
        with _flock(self.build_lock_path, exclusive=True):
            yield

    def append(self, keys: Sequence[bytes], pixels: np.ndarray) -> int:
        """Commit ``pixels`` uint8 (n, 3, H, W) with their ``keys`` (n,): rows written and fsynced, then keys.
        Returns the first new row. A torn tail of an earlier crash is truncated first."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.shape[1:] != self.shape or len(pixels) != len(keys):
            raise ValueError(f"rows {pixels.shape} do not match {len(keys)} keys of shape {self.shape}")
        blob = b"".join(keys)
        if len(blob) != KEY_BYTES * len(keys):
            raise ValueError("every key must be 32 bytes")
        with _flock(self.commit_lock, exclusive=True):
            n = len(self._committed_keys())
            with open(self.pixels_path, "r+b") as fh:
                fh.truncate(n * self.row_bytes)
                fh.seek(n * self.row_bytes)
                fh.write(pixels.data.cast("B"))  # the contiguous array's buffer, as bytes
                fh.flush()
                os.fsync(fh.fileno())
            with open(self.keys_path, "r+b") as fh:
                fh.truncate(n * KEY_BYTES)
                fh.seek(n * KEY_BYTES)
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
        return n

    def open_rows(self, count: int) -> np.memmap:
        """The first ``count`` committed rows, read-only: ``np.memmap`` uint8 (count, 3, H, W)."""
        return np.memmap(self.pixels_path, dtype=np.uint8, mode="r", shape=(count, *self.shape))


__all__ = ["CACHE_FIELD", "KEY_BYTES", "STORE_FORMAT", "PixelStore"]
