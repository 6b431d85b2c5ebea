"""Verify images once per dataset: a cached manifest of each file's size, times, inode and check status.

``data.verify_images`` (``header`` / ``full``) parses or decodes every image of a split before training. Done in
the preflight, again in every Ray Train rank and in every later run, that is minutes of I/O on a full dataset. The
manifest records what was checked, so a later process pays one ``os.stat`` per file and parses only the files that
changed.

Where: ``data.manifest_dir``, by default ``$XDG_CACHE_HOME/itr/manifests`` (``~/.cache/itr/manifests``), outside
the dataset (which may be read-only) and outside the run folder. One ``images-<digest>-<mode>.npz`` per image list
and mode: ``digest`` is sha256 of the split's image paths (root and normalised relative paths, in order), so splits
with the same images share one manifest and a caption edit does not invalidate it. Columns, ``N`` = images:
``relative`` (UTF-8 buffer + int64 offsets, checked equal on load) and ``root``; ``size``, ``mtime_ns``,
``ctime_ns``, ``inode`` (int64 ``(N,)``, from ``os.stat``); ``status`` (uint8 ``(N,)``: 0 not checked, 1 passed,
2 failed, with ``reason``); ``checked_ns`` (int64 ``(N,)``: wall clock just before the file's ``stat``).

A row is trusted (its file not parsed again) only when it passed in this mode, ``os.stat`` now gives the same size,
mtime, ctime and inode (a rewrite, a ``touch -d`` that restores the mtime, or a file replaced by a rename all change
one of them), and the file had not changed within ``RACY_NS`` before it was checked (a rewrite inside the same
timestamp tick would keep its mtime; 2 s covers FAT and coarse NFS servers). ``exists`` mode needs no manifest: the
``stat`` is the whole check.

Writes are atomic (a temp file in the folder, then ``os.replace``); a process that has files to check holds an
advisory ``flock`` on ``<name>.lock`` meanwhile, so ranks starting together check the files once and the others
read the result. A manifest that cannot be read is ignored; one that cannot be written is logged and the check
still happens. The first failing file stops the check with a ``UserError`` naming it, after the rows that passed
are saved.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from orchestrator.data.columns import PathColumn
from orchestrator.data.images import check_image_file
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: A file changed this close before its check is checked again next time (same-tick rewrites keep the mtime).
RACY_NS = 2_000_000_000
#: Modes whose checks the manifest records (``exists`` is one ``stat``, nothing to skip).
CACHED_MODES = ("header", "full")
NOT_CHECKED, PASSED, FAILED = 0, 1, 2
#: A progress bar is shown from this many files to parse.
PROGRESS_MIN = 2000


def default_manifest_dir() -> Path:
    """``$XDG_CACHE_HOME/itr/manifests``, else ``~/.cache/itr/manifests``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "itr" / "manifests"


def manifest_name(paths: PathColumn, mode: str) -> str:
    """``images-<digest>-<mode>.npz``: digest = sha256 over the root and the packed relative paths (24 hex)."""
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}\0{paths.root}\0".encode("utf-8", "surrogatepass"))
    h.update(paths.relative.offsets.tobytes())
    h.update(paths.relative.buffer)
    return f"images-{h.hexdigest()[:24]}-{mode}.npz"


@dataclass
class VerifyReport:
    """What one check did: ``trusted`` files skipped on the manifest's word, ``parsed`` files opened by PIL,
    ``manifest`` the file read/written (``None`` when none is used)."""

    images: int
    trusted: int
    parsed: int
    manifest: Path | None


@dataclass
class _Stats:
    """``os.stat`` of every file: int64 (N,) columns (-1 from the first problem on); ``problem`` = (row, path,
    reason) of the first file that is not a readable regular file, or ``None``."""

    size: np.ndarray
    mtime_ns: np.ndarray
    ctime_ns: np.ndarray
    inode: np.ndarray
    problem: tuple[int, str, str] | None


def _stat_all(paths: PathColumn) -> _Stats:
    size: list[int] = []
    mtime: list[int] = []
    ctime: list[int] = []
    inode: list[int] = []
    problem = None
    is_reg = stat.S_ISREG
    for i, path in enumerate(paths.strings()):
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not is_reg(st.st_mode):  # the reason, in the words of check_image_file
            problem = (i, path, check_image_file(Path(path)) or "image file changed while it was checked")
            break
        size.append(st.st_size)
        mtime.append(st.st_mtime_ns)
        ctime.append(st.st_ctime_ns)
        inode.append(st.st_ino)
    n = len(paths)

    def column(values: list[int]) -> np.ndarray:
        out = np.full(n, -1, dtype=np.int64)
        out[: len(values)] = np.asarray(values, dtype=np.uint64).astype(np.int64)  # inodes may exceed 2**63
        return out

    return _Stats(column(size), column(mtime), column(ctime), column(inode), problem)


def parse_problem(path: str, mode: str) -> str | None:
    """Why PIL cannot read ``path`` (``header``: ``Image.verify``; ``full``: ``Image.load``), or ``None``."""
    try:
        with Image.open(path) as img:
            if mode == "full":
                img.load()
            else:
                img.verify()
    except Exception as err:  # PIL raises many types for bad files
        return f"not a readable image ({err.__class__.__name__}: {err})"
    return None


class ManifestFile:
    """The manifest of one image list and mode in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, paths: PathColumn, mode: str) -> None:
        self.folder = Path(folder)
        self.paths = paths
        self.mode = mode
        self.path = self.folder / manifest_name(paths, mode)

    def load(self) -> dict[str, np.ndarray] | None:
        """The columns of a readable manifest of exactly these paths and mode, else ``None``."""
        try:
            with np.load(self.path, allow_pickle=False) as data:
                cols = {k: data[k] for k in data.files}
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
            log.info("ignoring unreadable image manifest %s (%s)", self.path, err)
            return None
        rel = self.paths.relative
        n = len(rel)
        try:
            same = (
                int(cols["version"]) == FORMAT_VERSION
                and str(cols["mode"]) == self.mode
                and str(cols["root"]) == self.paths.root
                and np.array_equal(cols["offsets"], rel.offsets)
                and cols["buffer"].tobytes() == rel.buffer
                and all(
                    cols[k].shape == (n,) for k in ("size", "mtime_ns", "ctime_ns", "inode", "status", "checked_ns")
                )
            )
        except (KeyError, ValueError, TypeError):
            same = False
        if not same:
            log.info("ignoring image manifest %s: written for other files or by another version", self.path)
            return None
        return cols

    def trusted(self, cols: dict[str, np.ndarray] | None, now: _Stats) -> np.ndarray:
        """bool (N,): rows that passed before and whose file is unchanged (see the module docstring)."""
        if cols is None:
            return np.zeros(len(self.paths), dtype=bool)
        changed_late = np.maximum(cols["mtime_ns"], cols["ctime_ns"]) >= cols["checked_ns"] - RACY_NS
        return (
            (cols["status"] == PASSED)
            & ~changed_late
            & (cols["size"] == now.size)
            & (cols["mtime_ns"] == now.mtime_ns)
            & (cols["ctime_ns"] == now.ctime_ns)
            & (cols["inode"] == now.inode)
            & (now.size >= 0)
        )

    def save(self, now: _Stats, status: np.ndarray, checked_ns: np.ndarray, reason: str) -> None:
        """Write the manifest atomically; a folder that cannot be written is logged, not fatal."""
        rel = self.paths.relative
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{self.path.stem}-", suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    version=np.int64(FORMAT_VERSION),
                    mode=np.str_(self.mode),
                    root=np.str_(self.paths.root),
                    offsets=rel.offsets,
                    buffer=np.frombuffer(rel.buffer, dtype=np.uint8),
                    size=now.size,
                    mtime_ns=now.mtime_ns,
                    ctime_ns=now.ctime_ns,
                    inode=now.inode,
                    status=status,
                    checked_ns=checked_ns,
                    reason=np.str_(reason),
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except OSError as err:
            log.warning(
                "could not write the image manifest %s (%s); images will be checked again next time", self.path, err
            )
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``<name>.lock`` exclusively (advisory; skipped where the folder cannot be written)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fh = open(self.path.with_suffix(".lock"), "a+b")  # noqa: SIM115 - closed below
        except OSError:
            yield
            return
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            fh.close()  # releases the lock


def verify_image_files(
    paths: PathColumn, mode: str, *, manifest_dir: Path | None, progress: bool = True
) -> VerifyReport:
    """Fail on the first missing or unreadable image of ``paths`` (in order), naming the file; see
    ``DatasetIndex.verify_images`` for the modes. With ``manifest_dir``, files checked before and unchanged since
    are not parsed again (module docstring); without it every file is checked."""
    n = len(paths)
    if mode == "none" or n == 0:
        return VerifyReport(n, 0, 0, None)
    if mode not in ("exists", *CACHED_MODES):
        raise ValueError(f"unknown verify mode {mode!r}")
    started = time.time_ns()
    now = _stat_all(paths)
    limit = n if now.problem is None else now.problem[0]  # rows before the first stat problem get parsed
    if mode == "exists":
        _raise_stat_problem(now)
        return VerifyReport(n, 0, 0, None)
    manifest = ManifestFile(manifest_dir, paths, mode) if manifest_dir is not None else None
    trusted = manifest.trusted(manifest.load(), now) if manifest is not None else np.zeros(n, dtype=bool)
    if trusted[:limit].all():
        _raise_stat_problem(now)
        return VerifyReport(n, int(trusted.sum()), 0, manifest.path if manifest else None)
    with manifest.locked() if manifest is not None else contextlib.nullcontext():
        cols = None
        if manifest is not None:  # another rank may have checked them while this one waited
            cols = manifest.load()
            trusted = manifest.trusted(cols, now)
        status = np.where(trusted, PASSED, NOT_CHECKED).astype(np.uint8)
        checked_ns = cols["checked_ns"].copy() if cols is not None else np.zeros(n, dtype=np.int64)
        checked_ns[~trusted] = 0
        todo = np.flatnonzero(~trusted[:limit])
        parsed, reason = 0, ""
        failed: tuple[int, str] | None = None
        with tqdm(
            total=todo.size,
            desc=f"verifying images ({mode})",
            unit="img",
            leave=False,
            disable=not progress or todo.size < PROGRESS_MIN,
        ) as bar:
            for i in todo.tolist():
                problem = parse_problem(os.path.join(paths.root, paths.relative[i]), mode)
                parsed += 1
                bar.update(1)
                if problem is not None:
                    status[i], reason, failed = FAILED, problem, (i, problem)
                    break
                status[i], checked_ns[i] = PASSED, started
        if manifest is not None and parsed:
            manifest.save(now, status, checked_ns, reason)
    if failed is not None:
        raise UserError(failed[1], path=os.path.join(paths.root, paths.relative[failed[0]]))
    _raise_stat_problem(now)
    log.info(
        "verified %d images (%s): %d parsed, %d unchanged since the manifest %s",
        n,
        mode,
        parsed,
        int(trusted.sum()),
        manifest.path if manifest else "(none)",
    )
    return VerifyReport(n, int(trusted.sum()), parsed, manifest.path if manifest else None)


def _raise_stat_problem(now: _Stats) -> None:
    if now.problem is not None:
        _, path, reason = now.problem
        raise UserError(reason, path=path)
