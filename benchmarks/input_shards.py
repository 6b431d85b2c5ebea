"""Benchmark (d) of issue 15: webdataset shards through the training loader -- pairs/s per core and peak RSS.

Generates photo-like 640x480 JPEGs (smooth colour gradients, shapes and noise, quality 90: decode cost like a
photo's) with 5 captions each as a captions_json folder in a temp folder, writes them as shards
(``orchestrator.data.write_shards``, not timed), then streams one epoch through
``orchestrator.data.shard_loader`` (the loader ``itr train`` builds for ``data.format: webdataset``): decode +
open_clip's eval preprocessing at 224 px, one caption per image tokenized, B = 256 collated in the loader workers,
pinned when CUDA is there. Each worker count runs in a fresh process, so its peak RSS is its own:

- ``pairs_per_s``: pairs delivered to the training process per second, after the first batch (worker start-up
  and the shuffle buffer's first fill excluded);
- ``per_core``: ``pairs_per_s`` / the processes decoding (the workers; 1 for ``--workers 0``);
- ``peak_rss_mib``: the training process's peak RSS, and the largest loader worker's.

    python benchmarks/input_shards.py [--images 1500] [--workers 1 2] [--batch-size 256]

``measure_shards(pattern, workers=...)`` is the measurement itself, for ``benchmarks/input_pipeline.py`` (the
side-by-side table of every input path) to import.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "input_shards.json"


def photo_like_dataset(
    root: Path, images: int, *, captions: int = 5, size: tuple[int, int] = (640, 480), seed: int = 0
) -> Path:
    """A captions_json folder (``train.json``, ``images/``) of ``images`` photo-like JPEGs, ``captions`` each."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 6, (4, h, w, 3)).astype(np.int16)  # sensor-like noise, drawn once, rolled per image
    records = []
    for i in range(images):
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        t = ((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 1) / 2
        base = a + (b - a) * t[..., None]
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        grain = np.roll(noise[i % len(noise)], (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
        noisy = np.asarray(img, dtype=np.int16) + grain
        name = f"images/{i:06d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / name, quality=90)
        records += [
            {"image": name, "caption": f"a photo number {i} with shapes, view {k}", "image_id": f"img{i}"}
            for k in range(captions)
        ]
    (root / "train.json").write_text(json.dumps(records))
    return root


def write_benchmark_shards(root: Path, out: Path, shard_size: int = 250) -> str:
    """The captions_json train split of ``root`` written as shards in ``out``; returns the ``data.shards`` pattern."""
    from orchestrator.config import DataConfig
    from orchestrator.data.splits import load_split
    from orchestrator.data.write_shards import write_shards

    index = load_split(DataConfig(root=root, clean_captions=False, verify_images="none"), "train")
    return write_shards(index, out, shard_size=shard_size, progress=False).pattern


def measure_shards(
    pattern: str,
    *,
    workers: int,
    batch_size: int = 256,
    image_size: int = 224,
    shuffle_buffer: int = 1000,
    tokenize: bool = True,
) -> dict:
    """One epoch of the shards of ``pattern`` through the shard loader in this process; pairs/s and peak RSS.
    ``tokenize=False``: a zero (B, 77) token tensor instead of open_clip's tokenizer (the image side alone, as
    ``benchmarks/input_pipeline.py`` times every variant)."""
    import open_clip

    from orchestrator.config import DataConfig
    from orchestrator.data.shard_loader import ShardLoader, ShardPairs, ShardSchedule
    from orchestrator.data.shards import open_shards

    shards = open_shards(DataConfig(format="webdataset", shards=pattern), progress=False)
    schedule = ShardSchedule(shards.num_samples, batch_size, 1)
    dataset = ShardPairs(
        shards,
        preprocess=open_clip.image_transform(image_size, is_train=False),
        tokenizer=open_clip.get_tokenizer("ViT-B-32") if tokenize else _no_tokens,
        batch_size=batch_size,
        steps=len(schedule),
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=shuffle_buffer,
        clean_captions=True,
    )
    pinned = torch.cuda.is_available()
    loader = ShardLoader(dataset, schedule, num_workers=workers, pin_memory=pinned)
    batches, start, first = 0, time.perf_counter(), None
    for batch in loader:
        assert batch.images.shape == (batch_size, 3, image_size, image_size) and batch.images.dtype == torch.float32
        batches += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    timed = (batches - 1) * batch_size
    pairs_per_s = timed / (end - first) if batches > 1 else float("nan")
    to_mib = 1 / 1024  # ru_maxrss is in KiB on Linux
    return {
        "variant": "d_webdataset_shards",
        "workers": workers,
        "batch_size": batch_size,
        "image_size": image_size,
        "tokenized": tokenize,
        "batches": batches,
        "pairs": timed,
        "seconds": end - first,
        "pairs_per_s": pairs_per_s,
        "cores": max(1, workers),
        "per_core": pairs_per_s / max(1, workers),
        "first_batch_s": first - start,
        "pinned": pinned,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mib,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mib if workers else 0.0,
    }


def _no_tokens(texts) -> torch.Tensor:
    return torch.zeros((len(texts), 77), dtype=torch.long)


def _fresh_process(pattern: str, workers: int, batch_size: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", pattern, "--workers", str(workers), "--batch-size", str(batch_size)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement in this fresh process, printed as JSON
        print(json.dumps(measure_shards(args.child, workers=args.workers[0], batch_size=args.batch_size)))
        return 0
    with tempfile.TemporaryDirectory(prefix="itr-bench-shards-") as tmp:
        t0 = time.perf_counter()
        root = photo_like_dataset(Path(tmp) / "data", args.images)
        pattern = write_benchmark_shards(root, Path(tmp) / "shards", args.shard_size)
        print(f"{args.images} photo-like 640x480 JPEGs as shards in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = [_fresh_process(pattern, w, args.batch_size) for w in args.workers]
    print(f"{'variant':<22} {'workers':>7} {'pairs/s':>9} {'per core':>9} {'RSS MiB':>8} {'worker RSS':>10}")
    for r in rows:
        print(
            f"{r['variant']:<22} {r['workers']:>7} {r['pairs_per_s']:>9.1f} {r['per_core']:>9.1f} "
            f"{r['peak_rss_mib']:>8.0f} {r['worker_peak_rss_mib']:>10.0f}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "images": args.images,
        "cpus": os.cpu_count(),
        "loadavg_at_end": list(os.getloadavg()),
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
