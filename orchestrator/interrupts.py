"""SIGTERM as an interruption: what Kubernetes preemption and ``timeout`` send ends a run the way Ctrl-C does.

Inside :func:`sigterm_as_interrupt` a SIGTERM raises :class:`Terminated` in the main thread. It is a
``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` path (``run_experiment`` ending its MLflow run KILLED
after a bounded flush, a sweep saving its state) handles it as it handles Ctrl-C; the CLI then exits 143 (128+15).
:func:`deferred` holds SIGTERM and SIGINT back while a block that must not be cut in half runs (publishing a
checkpoint folder); an interruption that a library wrapped in its own error is found by :func:`interruption_in`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: The exit code of a command ended by SIGTERM (the shell's 128 + signal number).
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM: interrupt what runs (MLflow runs end KILLED), then exit 143."""


#: Whether a SIGTERM came inside the current :func:`sigterm_as_interrupt` (a library may turn the
#: ``Terminated`` raised in its code into a plain ``KeyboardInterrupt``: Ray's ``ray.get`` does).
_sigterm_received = False


def _raise_terminated(signum, frame) -> None:
    global _sigterm_received
    _sigterm_received = True
    log.warning("SIGTERM: stopping (the MLflow run ends KILLED)")
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (each time it comes); the previous
    handler is restored on the way out. Outside the main thread (where handlers cannot be set) it does nothing."""
    global _sigterm_received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm_received = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class HeldSigterm:
    """What :func:`sigterm_between_steps` yields: ``received`` turns true when a SIGTERM came."""

    received = False


@contextlib.contextmanager
def sigterm_between_steps() -> Iterator[HeldSigterm]:
    """Inside :func:`sigterm_as_interrupt` (main thread), a SIGTERM only sets ``received`` on what this yields:
    the training loop checks it between steps, saves a step checkpoint and raises :class:`Terminated` there, so
    no step (an optimiser update) is cut in half. Elsewhere (no SIGTERM handler of ours, another thread) it
    changes nothing and ``received`` stays false."""
    held = HeldSigterm()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not _raise_terminated
    ):
        yield held
        return

    def hold(signum, frame) -> None:
        global _sigterm_received
        _sigterm_received = True
        if not held.received:
            log.warning("SIGTERM: stopping at the end of this step (a step checkpoint is saved)")
        held.received = True

    previous = signal.signal(signal.SIGTERM, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGTERM and SIGINT that arrive inside the block are delivered when it ends (to the handlers in place
    before it), so the block is never cut in half. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(s) is not None
    }  # None: set from C
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(received):
            log.info("delivering the %s held back until a checkpoint was complete", signal.Signals(signum).name)
            signal.raise_signal(signum)


def interruption_in(err: BaseException) -> KeyboardInterrupt | None:
    """The interruption behind ``err``: ``err`` itself or a ``KeyboardInterrupt`` in its chain (``torch.save`` cut
    short raises a ``RuntimeError`` over it); a :class:`Terminated` when a SIGTERM caused it, even where a library
    replaced ours by a plain ``KeyboardInterrupt``. ``None`` when ``err`` is no interruption."""
    from orchestrator.errors import find_in_chain

    found = find_in_chain(err, Terminated) or find_in_chain(err, KeyboardInterrupt)
    if found is None or isinstance(found, Terminated) or not _sigterm_received:
        return found
    terminated = Terminated("SIGTERM")
    terminated.__context__ = found
    return terminated


@contextlib.contextmanager
def keep_python_handlers(*signums: int) -> Iterator[None]:
    """Put back, on the way out, the Python handlers of ``signums`` that code inside replaced (``ray.init``
    installs a SIGTERM handler that calls ``sys.exit(1)``; Ray Train's ``fit`` a SIGINT one that exits 0), so an
    interruption still reaches the caller as an exception. Only handlers set from Python are put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        for s, handler in saved.items():
            if callable(handler) and signal.getsignal(s) is not handler:
                signal.signal(s, handler)
