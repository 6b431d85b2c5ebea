"""Run storage that is not a local folder: ``train.output_dir`` as an ``s3://`` / ``gs://`` / any pyarrow URI.

Ray writes there: Ray Train (``RunConfig.storage_path`` takes such URIs and persists each checkpoint, epoch or
step, through pyarrow) and Ray Tune (``itr sweep``: the sweep folder, its ``itr_sweep.json`` through
:func:`read_text` / :func:`write_text`, its leaderboard through :func:`upload_files`). The local backend and
``train.run_key`` (a lock in a local folder) refuse a URI (:func:`check_uri_output_dir`). ``itr eval --checkpoint
URI`` downloads the checkpoint's files to a temp folder first (:func:`download_checkpoint`). Credentials and
endpoints come from the usual places pyarrow reads: ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for an
S3-compatible store), instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``, or URI query parameters
(``s3://bucket/runs?endpoint_override=host:port&scheme=http``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard

from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config import ExperimentConfig

log = logging.getLogger(__name__)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
FIELD = "train.output_dir"


def is_uri(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a ``scheme://...`` URI (a ``str``; a ``Path`` never is: it lost its double slash)."""
    return isinstance(value, str) and bool(_URI.match(value))


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a URI (its query string, if any, kept at the end) or a local path (as posix)."""
    if not is_uri(base):
        return Path(base, *parts).as_posix()
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *parts]) + (sep + query)


def _filesystem(uri: str, *, field: str | None) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError / ValueError by scheme
        raise UserError(f"{uri}: not a storage URI pyarrow can open ({err})", field=field) from None


def _fs_error(err: Exception) -> str:
    """The first line of a file-system error (pyarrow's run to several), or its class name."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def check_reachable(uri: str, *, source: str | None = None, field: str = FIELD) -> None:
    """One cheap look at the root of ``uri`` (its bucket): it must exist and answer; else a one-line UserError."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri, field=field)
    root = path.strip("/").split("/", 1)[0]
    try:
        info = fs.get_file_info(root or "/")
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"{uri} unreachable ({_fs_error(err)})", path=source, field=field) from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri}: bucket {root!r} not found", path=source, field=field)


def check_uri_output_dir(cfg: ExperimentConfig, *, source: str | None = None) -> None:
    """A URI ``train.output_dir`` needs the Ray backend and no local-only feature; then its bucket must answer."""
    uri = cfg.train.output_dir
    if not is_uri(uri):
        raise ValueError(f"train.output_dir {uri} is a local folder, not object storage")
    needs_local = [
        why
        for why, on in (
            ("scaling.backend: local", cfg.scaling.backend == "local"),
            ("train.run_key (a local lock)", cfg.train.run_key is not None),
        )
        if on
    ]
    if needs_local:
        raise UserError(
            f"{uri} is object storage, which only scaling.backend: ray can write to; "
            f"{', '.join(needs_local)} needs a local folder",
            path=source,
            field=FIELD,
        )
    check_reachable(uri, source=source)


def read_text(location: str | Path) -> str | None:
    """The text of the file at ``location`` (a URI or a local path); ``None`` when there is none. A URI that cannot
    be read (network, credentials) is a one-line ``UserError``."""
    if not is_uri(location):
        try:
            return Path(location).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
    import pyarrow.fs as pafs

    fs, path = _filesystem(str(location), field=None)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as src:
            return src.read().decode("utf-8")
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"cannot read it ({_fs_error(err)})", path=str(location)) from None


def write_text(location: str | Path, text: str) -> None:
    """Write ``text`` to ``location`` whole or not at all: a local file through a temp name and a rename
    (:func:`orchestrator.checkpoint.atomic_write`), an object in one upload (a reader sees the old object or the
    new one, never a part)."""
    data = text.encode("utf-8")
    if not is_uri(location):
        from orchestrator.checkpoint import atomic_write

        def write(fh: BinaryIO) -> None:
            fh.write(data)

        atomic_write(Path(location), write)
        return
    fs, path = _filesystem(str(location), field=None)
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"cannot write it ({_fs_error(err)})", path=str(location)) from None


def upload_files(files: list[Path], root: Path, dest: str) -> list[str]:
    """Copy local ``files`` (under ``root``) to the folder URI ``dest``, keeping their paths below ``root``;
    returns their URIs."""
    fs, base = _filesystem(dest, field=None)
    uris = []
    try:
        for f in files:
            rel = Path(f).relative_to(root).as_posix()
            with open(f, "rb") as src, fs.open_output_stream(f"{base.rstrip('/')}/{rel}") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
            uris.append(join(dest, rel))
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"cannot upload {len(files)} file(s) ({_fs_error(err)})", path=dest) from None
    return uris


def to_uri(storage: str, fs_path: str) -> str:
    """The URI of ``fs_path`` (a path as Ray reports it: no scheme) in the storage ``storage``."""
    if not is_uri(storage):
        return fs_path
    scheme = storage.split("://", 1)[0]
    query = storage.partition("?")[2]
    return f"{scheme}://{fs_path.lstrip('/')}" + (f"?{query}" if query else "")


def download_checkpoint(uri: str, dest: Path, *, field: str | None = "--checkpoint") -> Path:
    """Copy the checkpoint folder (or the one file) at ``uri`` into ``dest``; returns the local checkpoint path.

    From a folder: its files but ``state.pt`` (optimizer state, not needed to evaluate) when it has a
    ``model.pt``; every file otherwise (an old layout)."""
    import pyarrow.fs as pafs

    from orchestrator.checkpoint import MODEL_FILE, TRAINING_STATE_FILE

    fs, path = _filesystem(uri, field=field)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise UserError("checkpoint not found", path=uri, field=field)
        if info.type == pafs.FileType.File:
            files = [info]
        else:
            files = [
                f for f in fs.get_file_info(pafs.FileSelector(path, recursive=False)) if f.type == pafs.FileType.File
            ]
        names = {f.base_name for f in files}
        if MODEL_FILE in names:
            files = [f for f in files if f.base_name != TRAINING_STATE_FILE]
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            with fs.open_input_stream(f.path) as src, open(dest / f.base_name, "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"cannot read the checkpoint ({_fs_error(err)})", path=uri, field=field) from None
    log.info("downloaded %d file(s) of %s to %s", len(files), uri, dest)
    return dest / files[0].base_name if info.type == pafs.FileType.File else dest
