"""Run storage that is not a local folder: ``train.output_dir`` as an ``s3://`` / ``gs://`` / any pyarrow URI.

Only Ray Train writes there (its ``RunConfig.storage_path`` takes such URIs and persists each checkpoint through
pyarrow); the local backend and the features that need a local folder (``train.run_key``'s lock, step
checkpoints) refuse a URI (:func:`check_uri_output_dir`). ``itr eval --checkpoint URI`` downloads the
checkpoint's files to a temp folder first (:func:`download_checkpoint`). Credentials and endpoints come from the
usual places pyarrow reads: ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for an
S3-compatible store), instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``, or URI query parameters
(``s3://bucket/runs?endpoint_override=host:port&scheme=http``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config import ExperimentConfig

log = logging.getLogger(__name__)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
FIELD = "train.output_dir"


def is_uri(value: Any) -> bool:
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


def check_reachable(uri: str, *, source: str | None = None, field: str = FIELD) -> None:
    """One cheap look at the root of ``uri`` (its bucket): it must exist and answer; else a one-line UserError."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri, field=field)
    root = path.strip("/").split("/", 1)[0]
    try:
        info = fs.get_file_info(root or "/")
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"{uri} unreachable ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                        path=source, field=field) from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri}: bucket {root!r} not found", path=source, field=field)


def check_uri_output_dir(cfg: ExperimentConfig, *, source: str | None = None) -> None:
    """A URI ``train.output_dir`` needs the Ray backend and no local-only feature; then its bucket must answer."""
    uri = cfg.train.output_dir
    needs_local = [why for why, on in (("scaling.backend: local", cfg.scaling.backend == "local"),
                                       ("train.run_key (a local lock)", cfg.train.run_key is not None),
                                       ("train.checkpoint_every_steps", cfg.train.checkpoint_every_steps is not None))
                   if on]
    if needs_local:
        raise UserError(f"{uri} is object storage, which only scaling.backend: ray can write to; "
                        f"{', '.join(needs_local)} needs a local folder", path=source, field=FIELD)
    check_reachable(uri, source=source)


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

    from orchestrator.checkpoint import MODEL_FILE, STATE_FILE

    fs, path = _filesystem(uri, field=field)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise UserError("checkpoint not found", path=uri, field=field)
        if info.type == pafs.FileType.File:
            files = [info]
        else:
            files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=False))
                     if f.type == pafs.FileType.File]
        names = {f.base_name for f in files}
        if MODEL_FILE in names:
            files = [f for f in files if f.base_name != STATE_FILE]
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            with fs.open_input_stream(f.path) as src, open(dest / f.base_name, "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - network, credentials, permissions
        raise UserError(f"cannot read the checkpoint ({str(err).splitlines()[0] if str(err) else err})",
                        path=uri, field=field) from None
    log.info("downloaded %d file(s) of %s to %s", len(files), uri, dest)
    return dest / files[0].base_name if info.type == pafs.FileType.File else dest
