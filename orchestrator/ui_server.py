"""``itr ui``: the MLflow UI server as a child that never outlives ``itr ui``.

The server (``mlflow ui`` and the uvicorn processes it starts) runs in its own process group. SIGTERM and
SIGINT to ``itr ui`` are forwarded to that whole group; ``itr ui`` waits for it (at most ``grace_s``, then
SIGKILLs the group) and exits 143 / 130. Bad arguments (port, tracking URI) fail before anything starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from orchestrator.errors import UserError

log = logging.getLogger(__name__)

#: How long the server gets to stop after a forwarded signal before its process group is SIGKILLed.
STOP_GRACE_S = 10.0


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` argv for ``uri`` (no shell; one worker)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def check_port(port: int, field: str = "--port") -> None:
    """A TCP port number: 1..65535."""
    if not 1 <= port <= 65535:
        raise UserError(f"{port} is not a TCP port (use 1-65535)", field=field)


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def serve(argv: list[str], env: dict[str, str], *, grace_s: float = STOP_GRACE_S) -> int:
    """Run ``argv`` in a new process group until it exits; SIGTERM/SIGINT meanwhile are forwarded to the group.

    Returns the server's exit code, or 128 + the signal number when a forwarded signal stopped it. Whatever is
    left of the group once the server exits (or ``grace_s`` after the first forwarded signal) is SIGKILLed, so
    no process keeps the port."""
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        _killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = None
        while proc.poll() is None:
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                log.warning(
                    "MLflow UI server did not stop within %.0f s of %s; killing it",
                    grace_s,
                    signal.Signals(received[0]).name,
                )
                _killpg(proc.pid, signal.SIGKILL)
                deadline = float("inf")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an error in this process: take the server down with it
            _killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        _killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (uvicorn's worker), none if all went down
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    return 128 + received[0] if received else int(proc.returncode)
