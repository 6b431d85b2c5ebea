"""MLflow system metrics of a training node: CPU, memory, disk, network, and GPU utilisation and memory where the
node has NVIDIA GPUs (``nvidia-ml-py``), as ``system/...`` metrics of the run -- where a starved GPU shows.

MLflow's ``SystemMetricsMonitor`` samples in a background thread of the process that starts it. It is started in
the process that trains: the driver on the local backend, and the first worker of each node on Ray (with
``node_id`` ``node<N>`` when the run spans several nodes, so the nodes' series stay apart). Best effort: a
monitor that cannot start logs one WARNING and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def system_metrics(
    tracking_uri: str | None, run_id: str | None, *, interval_s: float, enabled: bool = True, node_id: str | None = None
) -> Iterator[None]:
    """Log system metrics of this node to run ``run_id`` every ``interval_s`` seconds while the block runs."""
    if not enabled or run_id is None or tracking_uri is None:
        yield
        return
    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        for name in ("mlflow.system_metrics", "mlflow.system_metrics.system_metrics_monitor"):
            logging.getLogger(name).setLevel(logging.WARNING)  # its start/stop chatter: our one line instead
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, node_id=node_id, tracking_uri=tracking_uri, resume_logging=True
        )
        monitor.start()
        log.info("system metrics every %gs to run %s%s", interval_s, run_id, f" as {node_id}" if node_id else "")
    except Exception as err:  # a missing psutil, an unreachable store: the run goes on without them
        log.warning("system metrics are off for this run (%s: %s)", err.__class__.__name__, err)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as err:  # pragma: no cover - never mask the run's own outcome
                log.warning("system metrics: the last samples were not sent (%s)", err)
