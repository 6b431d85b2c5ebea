"""The Ray Data path of teacher extraction (``teachers.backend: ray``): one model per actor.

Only this module imports Ray; :mod:`orchestrator.teachers.store_fill` imports it lazily for ``backend="ray"``.
The items still missing from the cache become a ``ray.data.from_items`` dataset (caption strings, image
file paths, or the raw pixels of generated images), mapped by :class:`EncoderActor` on an actor pool of
``num_actors`` (``ActorPoolStrategy``), each actor holding one copy of the model (one GPU each where the
cluster has GPUs). The driver streams the results back and writes the same cache shards as the local
path, so a killed job also resumes from its finished shards.

Image files are read by the actors from their paths: on a multi-node cluster the dataset must be on
storage every node sees (as it must for training).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from orchestrator.data.index import DatasetIndex
from orchestrator.teachers.encoders import TeacherEncoder

log = logging.getLogger(__name__)


def ensure_ray() -> bool:
    """Connect to Ray unless already connected: ``ray.init()`` when ``RAY_ADDRESS`` is set (an existing
    cluster), else a local instance with every CPU and no dashboard. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def _payload(encoder: TeacherEncoder, index: DatasetIndex, positions: np.ndarray) -> list[dict[str, Any]]:
    """One row per item: ``pos`` plus ``text`` (captions), ``path`` (image files) or ``pixels``/``w``/``h``."""
    rows: list[dict[str, Any]] = []
    for p in positions.tolist():
        if encoder.inputs == "text":
            rows.append({"pos": p, "text": index.captions[p]})
        elif encoder.inputs == "pixels" and index.image_paths is not None:
            rows.append({"pos": p, "path": str(index.image_paths[p])})
        elif encoder.inputs == "pixels":
            img = index.load_image(p).convert("RGB")
            rows.append({"pos": p, "pixels": img.tobytes(), "w": img.width, "h": img.height})
        else:
            rows.append({"pos": p})
    return rows


class EncoderActor:
    """A Ray Data callable class: holds one loaded teacher; maps a batch of payload rows to
    ``{"pos": (b,), "feature": float32 (b, D)}``."""

    def __init__(self, encoder: TeacherEncoder, device: str) -> None:
        self.encoder = encoder.to(device).load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from orchestrator.data.images import to_rgb

        pos = np.asarray(batch["pos"], dtype=np.int64)
        if "text" in batch:
            items: list[Any] = [str(t) for t in batch["text"].tolist()]
        elif "path" in batch:
            items = []
            for path in batch["path"].tolist():
                with Image.open(path) as img:
                    items.append(to_rgb(img))  # 16-bit images scaled by range, as DatasetIndex.load_image does
        elif "pixels" in batch:
            items = [
                Image.frombytes("RGB", (int(w), int(h)), bytes(px))
                for px, w, h in zip(batch["pixels"].tolist(), batch["w"].tolist(), batch["h"].tolist())
            ]
        else:
            items = pos.tolist()
        return {"pos": pos, "feature": np.asarray(self.encoder.encode(items), dtype=np.float32)}


def _actor_resources(num_actors: int, use_gpu: bool) -> dict[str, float]:
    """CPUs (and a GPU) per actor: an even share of the largest node's CPUs, at least 1."""
    import ray

    node_cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources().get("CPU", 1)
    per_node = max(node_cpus) if node_cpus else total
    cpus = max(1.0, min(per_node, math.floor(total / max(1, num_actors))))
    return {"num_cpus": float(cpus), "num_gpus": 1.0 if use_gpu else 0.0}


def ray_stream(
    encoder: TeacherEncoder,
    index: DatasetIndex,
    positions: np.ndarray,
    *,
    batch_size: int,
    num_actors: int = 1,
    device: str | None = None,
    progress: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode rows ``positions`` of ``index`` as a Ray Data job; yields (positions (b,), float32 (b, D)) as
    results arrive (in no particular order)."""
    import ray
    import ray.data

    ensure_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = (device or "").startswith("cuda") or (device is None and gpus > 0)
    resources = _actor_resources(num_actors, use_gpu)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    rows = _payload(encoder, index, np.asarray(positions, dtype=np.int64))
    blocks = max(1, min(math.ceil(len(rows) / batch_size), 64 * num_actors))
    log.info("ray data: %d items, %d blocks, %d actor(s) with %s", len(rows), blocks, num_actors, resources)
    items = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = items.map_batches(
        EncoderActor,
        fn_constructor_args=(encoder, "cuda" if use_gpu else "cpu"),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=resources["num_cpus"],
        num_gpus=resources["num_gpus"],
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield np.asarray(batch["pos"], dtype=np.int64), np.asarray(batch["feature"], dtype=np.float32)


__all__ = ["EncoderActor", "ensure_ray", "ray_stream"]
