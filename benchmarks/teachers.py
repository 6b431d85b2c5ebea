"""Teacher throughput: the bare encoder vs the Ray Data actor-pool path, on the same device.

    HF_HUB_OFFLINE=1 python benchmarks/teachers.py --items 2000 --image-items 200 --device cpu

Text: the MiniLM teacher (``packaged:all-MiniLM-L6-v2``) on coco-mini training captions
(``../shared/data/coco-mini/train.json``; synthetic captions where absent). Image: the EfficientNet-Lite0
teacher (``packaged:efficientnet-lite0``) on coco-mini images (synthetic images where absent), 224 px.
No cache is involved: both paths encode the same items from scratch.

Rows per teacher:

* ``local encode``: a loaded encoder, items read and encoded in batches in this process;
* ``local load+encode``: the same including the model load (what one Ray actor also pays);
* ``ray data job``: ``ray.data.from_items`` -> ``map_batches(EncoderActor, ActorPoolStrategy(size=N))``,
  wall time of the job after ``ray.init`` (actor start, model load, encode, results back);
* ``ray data net``: the job's marginal rate, net of its fixed cost: (items - batch) / (job seconds -
  seconds of a one-batch job), i.e. what a long job approaches.

``ratio`` is items/s relative to ``local encode``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from orchestrator.data.index import DatasetIndex  # noqa: E402
from orchestrator.teachers.encoders import TeacherEncoder, build_teacher  # noqa: E402
from orchestrator.teachers.store_fill import local_stream  # noqa: E402

COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"


def load_index(need_captions: int, need_images: int) -> tuple[DatasetIndex, str]:
    """coco-mini train (+ val if more is needed), or a synthetic split."""
    if (COCO_MINI / "train.json").is_file():
        from orchestrator.data.formats import read_captions_json

        index = read_captions_json(COCO_MINI / "train.json", name="coco-mini/train")
        if index.num_captions >= need_captions and index.num_images >= need_images:
            return index, "coco-mini/train"
    from orchestrator.data.synthetic import build_synthetic_split

    n = max(need_images, need_captions // 3 + 1)
    return build_synthetic_split("bench", num_images=n, image_size=224, captions_per_image=(3, 5)), "synthetic"


def time_local(encoder: TeacherEncoder, index: DatasetIndex, positions: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    n = 0
    for pos, _feats in local_stream(encoder, index, positions, batch):
        n += len(pos)
    assert n == len(positions)
    return time.perf_counter() - start


def time_ray(
    encoder: TeacherEncoder, index: DatasetIndex, positions: np.ndarray, batch: int, actors: int, device: str | None
) -> float:
    """Wall seconds of one Ray Data job encoding ``positions`` (actor start and model load included)."""
    import ray

    from orchestrator.teachers.ray_backend import ray_stream

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    n = sum(
        len(pos) for pos, _ in ray_stream(encoder, index, positions, batch_size=batch, num_actors=actors, device=device)
    )
    assert n == len(positions)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=2000, help="captions for the text teacher")
    ap.add_argument("--image-items", type=int, default=200, help="images for the image teacher")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-actors", type=int, default=1)
    ap.add_argument("--teachers", default="text,image", help="comma list: text,image")
    ap.add_argument("--no-ray", action="store_true", help="bare encoder rows only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from orchestrator.teachers.encoders import default_device_name

    device = args.device or default_device_name()
    index, source = load_index(args.items, args.image_items)
    jobs = {
        "text": ("packaged:all-MiniLM-L6-v2", min(args.items, index.num_captions)),
        "image": ("packaged:efficientnet-lite0", min(args.image_items, index.num_images)),
    }
    rows: list[tuple[str, str, int, float]] = []
    ray_started = False
    for modality in [m.strip() for m in args.teachers.split(",") if m.strip()]:
        spec, n = jobs[modality]
        positions = np.arange(n, dtype=np.int64)
        start = time.perf_counter()
        enc = build_teacher(spec, modality, None, device, batch_size=args.batch_size).load()
        load_s = time.perf_counter() - start
        time_local(enc, index, positions[: min(n, args.batch_size)], args.batch_size)  # warm-up
        enc_s = time_local(enc, index, positions, args.batch_size)
        rows.append((spec, "local encode", n, enc_s))
        rows.append((spec, "local load+encode", n, enc_s + load_s))
        if not args.no_ray:
            from orchestrator.teachers.ray_backend import ensure_ray

            t0 = time.perf_counter()
            ray_started |= ensure_ray()
            init_s = time.perf_counter() - t0
            fresh = build_teacher(spec, modality, None, device, batch_size=args.batch_size)
            job_s = time_ray(fresh, index, positions, args.batch_size, args.num_actors, device)
            rows.append((spec, f"ray data job ({args.num_actors} actor)", n, job_s))
            if n > args.batch_size:
                one_s = time_ray(fresh, index, positions[: args.batch_size], args.batch_size, args.num_actors, device)
                if job_s > one_s:
                    rows.append((spec, "ray data net", n - args.batch_size, job_s - one_s))
            if init_s > 0.5:
                print(f"(ray.init: {init_s:.1f} s, not counted)")
    if ray_started:
        import ray

        ray.shutdown()

    print(
        f"\nteacher throughput on {device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs), "
        f"items from {source}, batch {args.batch_size}"
    )
    header = ("teacher", "path", "items", "seconds", "items/s", "ratio")
    print(f"| {header[0]:<28} | {header[1]:<22} | {header[2]:>6} | {header[3]:>8} | {header[4]:>8} | {header[5]:>5} |")
    print(f"|{'-' * 30}|{'-' * 24}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 7}|")
    base: dict[str, float] = {}
    for spec, path, n, secs in rows:
        rate = n / secs if secs > 0 else float("inf")
        base.setdefault(spec, rate)
        print(f"| {spec:<28} | {path:<22} | {n:>6} | {secs:>8.2f} | {rate:>8.1f} | {rate / base[spec]:>5.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
