"""Where teacher extraction runs (``teachers.backend: auto``): the cluster's GPUs, never a GPU-less driver."""

from __future__ import annotations

import pytest

from orchestrator.config import validate_config
from orchestrator.teachers.placement import decide, resolve_placement

HEAD_4_CPU = {"CPU": 4.0}  # KubeRay's head in deploy/: 4 CPUs, no GPU


@pytest.mark.parametrize(
    "cluster, nodes, local_cuda, num_actors, expected",
    [
        # a GPU-less head node driving a cluster with 8 GPUs: Ray GPU actors, one per GPU
        ({"CPU": 68.0, "GPU": 8.0}, 3, False, None, ("ray", "cuda", 8)),
        ({"CPU": 68.0, "GPU": 8.0}, 3, False, 2, ("ray", "cuda", 2)),
        # the cluster has no GPU but this machine has: here
        (HEAD_4_CPU, 1, True, None, ("local", "cuda", 1)),
        # nobody has a GPU: CPU actors on every node of a multi-node cluster, else this machine's CPUs
        ({"CPU": 36.0}, 3, False, None, ("ray", "cpu", 3)),
        (HEAD_4_CPU, 1, False, None, ("local", "cpu", 1)),
        # no cluster: this machine
        (None, 0, True, None, ("local", "cuda", 1)),
        (None, 0, False, None, ("local", "cpu", 1)),
    ],
)
def test_auto_runs_extraction_where_the_compute_is(cluster, nodes, local_cuda, num_actors, expected):
    p = decide("auto", num_actors, cluster=cluster, nodes=nodes, local_cuda=local_cuda)
    assert (p.backend, p.device, p.num_actors) == expected


def test_explicit_backends_are_kept():
    assert decide("local", None, cluster={"GPU": 4.0}, nodes=2, local_cuda=False).backend == "local"
    p = decide("ray", None, cluster={"CPU": 8.0, "GPU": 2.0}, nodes=2, local_cuda=False)
    assert (p.backend, p.device, p.num_actors) == ("ray", "cuda", 2)
    p = decide("ray", None, cluster={"CPU": 8.0}, nodes=2, local_cuda=True)
    assert (p.backend, p.device, p.num_actors) == ("ray", "cpu", 2)


def test_auto_is_the_default_and_without_a_cluster_it_stays_in_this_process(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.skip("a Ray instance from another test is still up")
    assert validate_config({}).teachers.backend == "auto"
    p = resolve_placement("auto", None)
    assert p.backend == "local" and not ray.is_initialized()
