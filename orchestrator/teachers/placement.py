"""Where teacher extraction runs (``teachers.backend``, ``teachers.num_actors``): on the compute, not on the driver.

``auto`` (the default) decides from what is there:

* connected to a Ray cluster (``RAY_ADDRESS`` set, or Ray already initialised) that has GPUs: a Ray Data actor
  pool with one GPU per actor, one actor per GPU -- also when the driver is a GPU-less head node (KubeRay's head in
  ``deploy/`` has 4 CPUs and no GPU: mpnet on COCO's 566k captions there would take hours);
* a cluster without GPUs: this machine's GPU if it has one, else CPU actors, one per node, with a WARNING;
* no cluster: this machine, on its GPU when it has one, else on its CPUs.

``local`` and ``ray`` force the backend; ``num_actors`` unset means one actor per GPU (or per node without GPUs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

#: where extraction runs: this process, or a Ray Data actor pool
Backend = Literal["local", "ray"]


@dataclass(frozen=True)
class Placement:
    """``backend`` ``local`` or ``ray``; ``device`` ``cuda`` or ``cpu``; ``num_actors`` for ``ray``; ``reason``."""

    backend: Backend
    device: str
    num_actors: int
    reason: str


def decide(
    setting: str, num_actors: int | None, *, cluster: dict[str, float] | None, nodes: int, local_cuda: bool
) -> Placement:
    """The placement for ``teachers.backend`` ``setting`` given the Ray cluster's total resources (``cluster``:
    ``{"CPU": .., "GPU": ..}``, None when not connected to one), its alive ``nodes``, and whether this process sees
    a CUDA device."""
    gpus = int((cluster or {}).get("GPU", 0))
    local_device = "cuda" if local_cuda else "cpu"
    if setting == "local":
        return Placement("local", local_device, 1, "teachers.backend: local")
    if setting == "ray":
        if gpus:
            return Placement("ray", "cuda", num_actors or gpus, f"teachers.backend: ray, {gpus} GPU(s)")
        return Placement("ray", "cpu", num_actors or max(1, nodes), "teachers.backend: ray, no GPU in the cluster")
    if cluster is not None and gpus:
        return Placement("ray", "cuda", num_actors or gpus, f"auto: the Ray cluster has {gpus} GPU(s)")
    if cluster is not None and local_cuda:
        return Placement("local", "cuda", 1, "auto: no GPU in the Ray cluster, this machine has one")
    if cluster is not None and nodes > 1:
        return Placement(
            "ray", "cpu", num_actors or nodes, f"auto: no GPU anywhere; CPU actors on the cluster's {nodes} nodes"
        )
    return Placement("local", local_device, 1, f"auto: this machine's {'GPU' if local_cuda else 'CPUs'}")


def _cluster() -> tuple[dict[str, float] | None, int]:
    """(total resources, alive nodes) of the Ray cluster this process is connected to -- connecting when
    ``RAY_ADDRESS`` names one -- or (None, 0)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None, 0
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return None, 0
        from orchestrator.teachers.ray_backend import ensure_ray

        ensure_ray()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return dict(ray.cluster_resources()), nodes


def resolve_placement(setting: str, num_actors: int | None) -> Placement:
    """:func:`decide` on this process's view: the Ray cluster (if any) and ``torch.cuda.is_available()``."""
    import torch

    cluster, nodes = _cluster() if setting != "local" else (None, 0)
    placement = decide(setting, num_actors, cluster=cluster, nodes=nodes, local_cuda=torch.cuda.is_available())
    if placement.device == "cpu" and setting != "local" and cluster is not None:
        log.warning(
            "teacher extraction on CPU: %s (at the CPU rates in BENCHMARKS.md, COCO's 566k captions take "
            "hours; a GPU takes minutes)",
            placement.reason,
        )
    else:
        log.info("teacher extraction: %s on %s (%s)", placement.backend, placement.device, placement.reason)
    return placement
