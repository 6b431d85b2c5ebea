"""A throwaway local MLflow tracking server for tests: start, stop, restart, always cleaned up.

    from tests.mlflow_server import mlflow_server

    with mlflow_server(tmp_path) as server:          # free port on 127.0.0.1, SQLite + artifact folder in tmp_path
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        ...
        server.stop()                                # an outage (the store is kept)
        server.start()                               # same port, same store
    # leaving the block kills the server's whole process group

The server runs in its own process group (``start_new_session``) with one worker and MLflow's job execution
off (MLflow 3.17's server: about 6 processes, 0.5 GB, up in ~6 s), so ``stop`` takes every process it started down
and nothing else. Its output goes to ``<root>/mlflow-server.log``; a failed start raises with the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MlflowServer", "MlflowServerError", "free_port", "mlflow_server"]


class MlflowServerError(RuntimeError):
    """The server did not come up (the message holds the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _mlflow_executable() -> list[str]:
    beside = Path(sys.executable).with_name("mlflow")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """One ``mlflow server`` on ``127.0.0.1:port`` over ``sqlite:///<root>/mlflow.db`` and ``<root>/mlartifacts``.

    ``uri`` is the tracking URI (``http://127.0.0.1:<port>``); the port, the database and the artifact folder
    stay the same across ``stop``/``start``/``restart``, so runs logged before an outage are there after it.
    Artifacts are proxied by the server (``mlflow-artifacts:/``), so artifact uploads need the server too.
    """

    def __init__(
        self, root: Path, port: int | None = None, *, startup_timeout_s: float = 90.0, env: dict[str, str] | None = None
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.startup_timeout_s = startup_timeout_s
        self.backend_store_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_dir = self.root / "mlartifacts"
        self.log_path = self.root / "mlflow-server.log"
        self._extra_env = dict(env or {})
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid (= process group id) of the running server, else None."""
        return self._proc.pid if self.is_running() else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 now."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        try:
            with opener.open(f"{self.uri}/health", timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> MlflowServer:
        """Start the server (no-op while it runs) and wait until ``/health`` answers."""
        if self.is_running():
            return self
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self._extra_env}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            *_mlflow_executable(),
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_dir.as_uri(),
        ]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                self._proc = None
                raise MlflowServerError(f"mlflow server exited (code {code}) before it was healthy:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise MlflowServerError(
            f"mlflow server on {self.uri} not healthy after {timeout_s or self.startup_timeout_s} s:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``timeout_s``; wait until the port is free."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # children that outlived the leader, or a leader that ignored SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._port_in_use() and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()

    def _port_in_use(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((self.host, self.port)) == 0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None, **kwargs) -> Iterator[MlflowServer]:
    """A started :class:`MlflowServer` under ``root``; stopped (its whole process group) on exit, whatever happens."""
    server = MlflowServer(root, port, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.stop()
