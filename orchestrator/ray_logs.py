"""Keep known-harmless Ray chatter out of the driver's console (worker logs stay in Ray's log files).

Ray Train V2's PlacementGroupCleaner polls the state API, which needs the dashboard; with the dashboard off
it logs "Failed to query Ray Train Controller actor state" several times a second. This wraps the driver's
worker-log printer so those lines are dropped. Best effort: if Ray's internals differ, nothing is filtered.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

DROPPED_WORKER_LINES = ("Failed to query Ray Train Controller actor state",)
_HANDLER = "ray_print_logs"


def filter_worker_logs(patterns: tuple[str, ...] = DROPPED_WORKER_LINES) -> bool:
    """Drop worker log lines containing any of ``patterns`` before the driver prints them; True if installed."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover
        return False
    handlers = getattr(dispatcher, "handlers", None)
    if not isinstance(handlers, list):
        return False
    found = [h for name, h in handlers if name == _HANDLER]
    if len(found) != 1 or getattr(found[0], "_itr_filtered", False):
        return False
    original = found[0]

    def filtered(data):
        lines = [line for line in data.get("lines", []) if not any(p in line for p in patterns)]
        if lines:
            original(dict(data, lines=lines))

    filtered._itr_filtered = True  # type: ignore[attr-defined]
    dispatcher.remove_handler(_HANDLER)
    dispatcher.add_handler(_HANDLER, filtered)
    return True
