"""Checks that run before an experiment creates anything: bad input fails here, with one line, not mid-run.

``check_experiment`` is what ``itr train`` (``orchestrator.run.run_experiment``) calls before it opens the MLflow
run: the tracking store is reachable (or a usable SQLite file), ``train.output_dir`` can hold run folders, and the
splits the loop reads load and verify. Each failure is a ``UserError`` (exit 2, one line) and nothing is written.
``check_tracking_uri`` is shared with ``itr ui``.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.config import ExperimentConfig
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: How long the start of a run waits for a tracking server to answer before it gives up.
PROBE_TIMEOUT_S = 3.0
#: The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"
#: Tracking URI schemes MLflow ships stores for (database schemes may carry a driver: ``postgresql+psycopg2``).
KNOWN_SCHEMES = frozenset(
    {"http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc"}
)


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register (entry point group ``mlflow.tracking_store``)."""
    try:
        return {ep.name for ep in metadata.entry_points(group="mlflow.tracking_store")}
    except Exception:  # noqa: BLE001 - broken package metadata: no plugins
        return set()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (``None`` for an in-memory one); relative to the cwd as SQLAlchemy
    reads it (``sqlite:///rel.db``, ``sqlite:////abs.db``)."""
    rest = uri[len("sqlite:") :].split("?", 1)[0]
    if not rest.startswith("///"):
        return None  # sqlite:// (memory) or a form SQLAlchemy rejects itself
    db = rest[3:]
    return None if db in ("", ":memory:") else Path(db)


def check_sqlite(uri: str, *, field: str | None) -> None:
    """A ``sqlite:`` store must be an SQLite database (by its 16-byte header), an empty file, or a file that does
    not exist yet (MLflow creates it and its missing folders) below a folder, not below a file."""
    db = sqlite_file(uri)
    if db is None:
        return
    if db.is_dir():
        raise UserError("is a folder, not an SQLite database", path=str(db), field=field)
    if db.exists():
        try:
            with open(db, "rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
        except OSError as err:
            raise UserError(
                f"cannot read the tracking database ({err.strerror or err})", path=str(db), field=field
            ) from None
        if head and head != SQLITE_HEADER:
            raise UserError(
                "not an SQLite database (it does not start with 'SQLite format 3'); point the tracking "
                "URI at a database or at a file that does not exist yet",
                path=str(db),
                field=field,
            )
        return
    node = db.absolute().parent
    while not node.exists() and node != node.parent:
        node = node.parent
    if not node.is_dir():
        raise UserError(
            f"cannot create the tracking database: {node} is a file, not a folder", path=str(db), field=field
        )


def probe_server(uri: str, *, field: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """One ``GET <uri>/health`` with a ``timeout_s`` timeout; any HTTP answer means a server is there."""
    import requests  # MLflow's own HTTP client: the same proxy and certificate settings as the runs will use

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.exceptions.InvalidURL as err:
        raise UserError(f"{uri} is not a valid URL ({err})", field=field) from None
    except requests.exceptions.RequestException as err:
        log.debug("tracking probe of %s failed: %s", uri, err)
        raise UserError(f"tracking server {uri} unreachable; set tracking.uri or start it", field=field) from None


def check_tracking_uri(
    uri: str, *, field: str | None = "tracking.uri", probe: bool = True, timeout_s: float = PROBE_TIMEOUT_S
) -> None:
    """Fail with a one-line ``UserError`` unless ``uri`` is a tracking store MLflow can use right now: a known
    scheme, an SQLite file that is a database (or not there yet), a server that answers within ``timeout_s``."""
    scheme = urlparse(uri).scheme.lower() if "://" in uri or uri.startswith(("sqlite:", "file:")) else ""
    base = scheme.split("+", 1)[0]
    if scheme and base not in KNOWN_SCHEMES and scheme not in _plugin_schemes():
        raise UserError(
            f"unknown tracking URI scheme {scheme!r} in {uri} (use sqlite:///PATH, http(s)://HOST:PORT, "
            "file:PATH, postgresql://, mysql://, mssql:// or databricks)",
            field=field,
        )
    if base == "sqlite":
        check_sqlite(uri, field=field)
    elif base in ("http", "https") and probe:
        probe_server(uri, field=field, timeout_s=timeout_s)


def check_output_dir(folder: Path | str, *, source: str | None) -> None:
    """``train.output_dir`` must be a writable folder, or creatable below the nearest existing one (a URI: its
    bucket must answer, :func:`orchestrator.storage.check_reachable`)."""
    from orchestrator import storage

    if storage.is_uri(folder):
        storage.check_reachable(folder, source=source)
        return
    folder = Path(folder)
    node = folder
    while not node.exists() and node != node.parent:
        node = node.parent
    if not node.is_dir():
        where = f"{folder} is" if node == folder else f"{folder}: {node} is"
        raise UserError(f"{where} a file, not a folder", path=source, field="train.output_dir")
    if not os.access(node, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: folder {node} is not writable", path=source, field="train.output_dir")


def check_data(cfg: ExperimentConfig) -> None:
    """The splits the training loop reads (train; val when evaluated) load, with their images verified, and share
    no image with val/test (``data.leakage``: a WARNING, or this error)."""
    from orchestrator.data.leakage import check_leakage
    from orchestrator.data.splits import load_split

    if cfg.data.resolved_format == "webdataset":  # streamed train split: the shards listed, present, counted once
        from orchestrator.data.shard_loader import check_streamable
        from orchestrator.data.shards import open_shards

        check_streamable(cfg, open_shards(cfg.data), cfg.scaling.num_workers if cfg.scaling.backend == "ray" else 1)
        loaded = {}
    else:
        loaded = {"train": load_split(cfg.data, "train")}
    if "val" in cfg.eval.splits:
        loaded["val"] = load_split(cfg.data, "val")
    if "train" in loaded:  # shard keys are not image ids: a streamed train split is not compared
        check_leakage(cfg.data, loaded)


def tracking_field(cfg: ExperimentConfig) -> str:
    """Where the tracking URI came from: the config field or the environment variable."""
    return "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI"


def check_experiment(cfg: ExperimentConfig, tracking_uri: str | None, *, source: str | None = None) -> None:
    """Everything of ``cfg`` that can fail before a run starts, cheapest first; ``tracking_uri`` is the resolved
    store (``None`` when tracking is off), ``source`` names the config file in the messages."""
    if tracking_uri is not None:
        try:
            check_tracking_uri(tracking_uri, field=tracking_field(cfg))
        except UserError as err:
            if err.path is None and cfg.tracking.uri and source:
                raise UserError(err.detail, path=source, field=err.field) from None
            raise
    from orchestrator import storage

    if storage.is_uri(cfg.train.output_dir):  # object storage: Ray backend only, bucket reachable
        storage.check_uri_output_dir(cfg, source=source)
    else:
        check_output_dir(cfg.train.output_dir, source=source)
    check_data(cfg)
    from orchestrator.models.student import check_pretrained

    check_pretrained(cfg.model)  # model.pretrained is a weights file (memory-mapped: the tensors are not read)
