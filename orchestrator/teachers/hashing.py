"""Content hashes for the teacher cache: files (memoised by path, size and mtime), strings, rendered pixels.

Every item key is the 32-byte sha256 digest of the item's content:

* a caption: ``sha256(caption.encode("utf-8"))``;
* an image file: ``sha256(file bytes)``;
* a generated image (no file): ``sha256(b"pixels:" + f"{mode}:{width}x{height}:".encode() + raw pixel bytes)``.

Hashing a file reads it whole, so file digests are memoised in the process and, where a cache folder is
given, in ``<cache_dir>/file-hashes.json`` keyed by the absolute path and checked against the file's size
and ``mtime_ns`` (a file edited in place gets a new mtime and is hashed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
#: Process-wide memo: absolute path -> (size, mtime_ns, hex digest).
_PROCESS_MEMO: dict[str, tuple[int, int, str]] = {}
_LOCK = threading.Lock()


def sha256_bytes(data: bytes) -> bytes:
    """The 32-byte sha256 digest of ``data``."""
    return hashlib.sha256(data).digest()


def text_key(text: str) -> bytes:
    """Item key of a caption: the 32-byte sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def pixels_key(image: Image.Image) -> bytes:
    """Item key of a generated image: sha256 of its mode, size and raw pixel bytes (32 bytes)."""
    h = hashlib.sha256()
    h.update(f"pixels:{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.digest()


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class FileHashMemo:
    """sha256 of files, memoised by (absolute path, size, mtime_ns) in the process and optionally on disk.

    ``path``: a JSON file (``<cache_dir>/file-hashes.json``) or ``None`` for the process memo only. Call
    :meth:`save` to persist new entries (written atomically, only when something changed).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._disk: dict[str, list] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self._disk = loaded
            except (OSError, ValueError):
                log.warning("ignoring an unreadable file-hash memo %s", self.path)

    def hexdigest(self, path: str | Path) -> str:
        """The sha256 (64 hex) of the file at ``path``; reads the file only when its size or mtime changed."""
        path = Path(path).resolve()
        st = path.stat()
        name = str(path)
        with _LOCK:
            hit = _PROCESS_MEMO.get(name)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            digest = hit[2]
        else:
            disk = self._disk.get(name)
            if isinstance(disk, list) and len(disk) == 3 and disk[0] == st.st_size and disk[1] == st.st_mtime_ns:
                digest = str(disk[2])
            else:
                digest = _hash_file(path)
            with _LOCK:
                _PROCESS_MEMO[name] = (st.st_size, st.st_mtime_ns, digest)
        if self.path is not None:
            entry = [st.st_size, st.st_mtime_ns, digest]
            if self._disk.get(name) != entry:
                self._disk[name] = entry
                self._dirty = True
        return digest

    def digest(self, path: str | Path) -> bytes:
        """The 32-byte sha256 digest of the file at ``path`` (memoised)."""
        return bytes.fromhex(self.hexdigest(path))

    def save(self) -> None:
        """Write new entries to the JSON memo (atomically); a no-op when nothing changed or no path is set."""
        if self.path is None or not self._dirty:
            return
        # Merge with what another process may have written meanwhile.
        merged: dict[str, list] = {}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    merged.update(loaded)
            except (OSError, ValueError):
                pass
        merged.update(self._disk)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)
        self._dirty = False


def files_digest(files: list[tuple[str, Path]], memo: FileHashMemo | None = None) -> str:
    """One sha256 (64 hex) over ``(name, sha256 of file)`` pairs, in the given order."""
    memo = memo or FileHashMemo()
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode() + b"\0" + memo.hexdigest(path).encode() + b"\n")
    return h.hexdigest()


__all__ = ["FileHashMemo", "files_digest", "pixels_key", "sha256_bytes", "text_key"]
