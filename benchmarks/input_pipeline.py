"""Benchmark of issue 15 item 5: pairs/s per CPU core and peak RSS of each input path, side by side in one run.

Data: ``--images`` photo-like 640x480 JPEGs (smooth colour gradients, shapes, noise; quality 90, so a decode costs
what a photo's does) with 5 captions each, generated into a temp folder as a captions_json split. Every variant
delivers the image side of B = 256 training pairs (the sampler's caption order, 5 captions per image) as a float32
(B, 3, 224, 224) tensor normalised with open_clip's eval transform, pinned when CUDA is there (no CUDA here: a plain
tensor, and the variants say ``pinned: false``). The text side is left out of every variant alike (a zero token
tensor): tokenizing is the same work on every path and is timed on its own row (``tokenize``).

- ``a_bare``: a plain loop: ``PIL.Image.open`` + open_clip's preprocess per pair, ``torch.stack``. The anchor.
- ``b_decode_wN``: the training loader (``orchestrator.data.pipeline``) over the decode path
  (``data.image_cache: none``) with N DataLoader workers; timed after the first batch (worker start excluded);
  per core = pairs/s / N.
- ``c_cache``: the training loader in-process (0 workers) over the warm decoded-image cache
  (``data.image_cache: decoded``): uint8 rows gathered from the memory map, collated, then normalised to float32
  (on the CPU here; on a GPU machine after the copy, on the device). ``c_cache_uint8`` is the same without the
  float conversion: what the training process hands to ``batch.to(device)``.
- ``d_shards`` (``--variants d``): webdataset shards, ``benchmarks/input_shards.measure_shards`` (one epoch).

Also measured: ``cache_build`` (the cold build with every CPU, not a per-core figure) and ``tokenize``. Each
variant runs in fresh processes (``--child``), ``--runs`` times, the median run kept: (a), (c) and
``c_cache_uint8`` one process per run, in rounds; (b) one process, its worker counts interleaved. So each
variant's memory is its own: peak RSS (ru_maxrss; file pages of the memory-mapped cache count in it,
though they are the shared page cache), anonymous and file-backed RSS at the end, and the loader workers' peak
RSS. torch and OpenMP use one thread. Results: a table on stdout and ``benchmarks/results/input_pipeline.json``.

    python benchmarks/input_pipeline.py [--images 5000] [--batches 4] [--runs 3] [--variants a b c]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "input_pipeline.json"
IMAGE_SIZE = 224


# --------------------------------------------------------------------------------------------------- data
def _photo_bases(count: int, seed: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` photo-like uint8 (H, W, 3) images a quarter larger than ``size`` (gradients, shapes, blur, noise)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size[0] * 5 // 4, size[1] * 5 // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bases = []
    for _ in range(count):
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        t = ((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (w + h) + 1) / 2
        img = Image.fromarray(np.clip(a + (b - a) * t[..., None], 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
        bases.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return bases


def _write_images(job: tuple[Path, list[int], int, tuple[int, int]]) -> None:
    """Images ``ids``: a random crop of one of the bases, maybe mirrored, each channel scaled (all distinct)."""
    from PIL import Image

    root, ids, seed, size = job
    bases = _photo_bases(16, seed, size)
    for i in ids:
        rng = np.random.default_rng([seed, i])
        base = bases[int(rng.integers(len(bases)))]
        y0, x0 = int(rng.integers(base.shape[0] - size[1])), int(rng.integers(base.shape[1] - size[0]))
        crop = base[y0 : y0 + size[1], x0 : x0 + size[0]]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        gain = rng.uniform(0.8, 1.2, 3).astype(np.float32)
        pixels = np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:06d}.jpg", quality=90)


def photo_like_split(
    root: Path, images: int, *, captions: int = 5, size: tuple[int, int] = (640, 480), seed: int = 0
) -> Path:
    """A captions_json folder (``train.json``, ``images/``) of ``images`` distinct photo-like JPEGs, ``captions``
    each, written by every CPU (16 photo-like bases per process, then a crop, mirror and colour gain per image)."""
    import multiprocessing

    (root / "images").mkdir(parents=True, exist_ok=True)
    procs = max(1, min(os.cpu_count() or 1, images // 200 or 1))
    jobs = [(root, list(range(k, images, procs)), seed, size) for k in range(procs)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(_write_images, jobs)
    records = [
        {"image": f"images/{i:06d}.jpg", "caption": f"a photo number {i} with shapes, view {k}", "image_id": f"img{i}"}
        for i in range(images)
        for k in range(captions)
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root


# ------------------------------------------------------------------------------------------ measurements
def _index(root: Path):
    from orchestrator.config import DataConfig
    from orchestrator.data.splits import load_split

    return load_split(DataConfig(root=root, clean_captions=False, verify_images="none"), "train")


def _preprocess():
    import open_clip

    return open_clip.image_transform(IMAGE_SIZE, is_train=False)  # ViT-B-32's eval transform


def _sampler(index, batch_size: int):
    from orchestrator.data.sampler import CaptionBatchSampler

    return CaptionBatchSampler(index.caption_image, batch_size, seed=0)


def _no_tokens(texts, indices):
    import torch

    return torch.zeros(len(indices), 77, dtype=torch.long)


def _workers_peak_mib() -> float:
    """The largest peak RSS (VmHWM) among this process's live child processes (the loader workers), MiB."""
    import psutil

    peak = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) / 1024)
    return peak


def _rss() -> dict:
    """MiB: this process's peak RSS (ru_maxrss; pages of the memory-mapped cache it touched count too, though they
    are the shared page cache), its anonymous and file-backed RSS now (``RssAnon``, ``RssFile``), and the loader
    workers' largest peak RSS."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_mib": status.get("RssAnon", float("nan")),
        "file_mib": status.get("RssFile", float("nan")),
        "worker_peak_rss_mib": _workers_peak_mib(),
    }


def _row(variant: str, pairs: int, seconds: float, cores: int, **extra) -> dict:
    import torch

    rate = pairs / seconds
    return {
        "variant": variant,
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_s": rate,
        "cores": cores,
        "per_core": rate / cores,
        "pinned": torch.cuda.is_available(),
        **_rss(),
        **extra,
    }


def measure_bare(root: Path, batch_size: int, batches: int) -> dict:
    """(a): ``Image.open`` + preprocess per pair, stacked into a float tensor (pinned with CUDA)."""
    import torch
    from PIL import Image

    from orchestrator.data.images import to_rgb

    index, preprocess = _index(root), _preprocess()
    pin = torch.cuda.is_available()
    start, pairs = time.perf_counter(), 0
    for k, caps in enumerate(_sampler(index, batch_size)):
        if k == batches:
            break
        tensors = []
        for c in caps.tolist():
            with Image.open(index.image_paths[int(index.caption_image[c])]) as img:
                tensors.append(preprocess(to_rgb(img)))
        batch = torch.stack(tensors)
        batch = batch.pin_memory() if pin else batch
        assert batch.dtype == torch.float32 and batch.shape == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
        pairs += len(caps)
    return _row("a_bare", pairs, time.perf_counter() - start, 1)


def _loader(index, images, batch_size: int, workers: int):
    import torch

    from orchestrator.data.pipeline import TrainPairs, build_train_loader

    pairs = TrainPairs(index, images, _no_tokens)
    return build_train_loader(pairs, _sampler(index, batch_size), workers=workers, pin_memory=torch.cuda.is_available())


def measure_decode(root: Path, batch_size: int, batches: int, workers: int) -> dict:
    """(b): the training loader over the decode path (``data.image_cache: none``) with ``workers`` workers; timed
    from the first batch on (worker start-up excluded)."""
    import torch

    from orchestrator.data.image_cache import DecodeImages

    index = _index(root)
    loader = iter(_loader(index, DecodeImages(index, _preprocess()), batch_size, workers))
    first = next(loader)
    assert first.images.dtype == torch.float32
    start, pairs = time.perf_counter(), 0
    for _ in range(batches):
        pairs += len(next(loader).images)
    row = _row(f"b_decode_w{workers}", pairs, time.perf_counter() - start, max(1, workers), workers=workers)
    del loader  # its workers end
    return row


def measure_decode_runs(root: Path, batch_size: int, batches: int, workers: list[int], runs: int) -> list[dict]:
    """(b) for each worker count, ``runs`` times, interleaved (a change of load hits every count alike)."""
    return [measure_decode(root, batch_size, batches, w) for _ in range(runs) for w in workers]


def measure_cache(root: Path, cache_dir: Path, batch_size: int, batches: int, to_float: bool) -> dict:
    """(c): the in-process training loader over the warm cache, ``batches`` batches; each uint8 batch normalised
    to float32 (on the CPU here; where the model runs, with CUDA) unless not ``to_float``."""
    import torch

    from orchestrator.data.image_cache import decoded_images
    from orchestrator.data.pixels import split_preprocess

    index = _index(root)
    transform = split_preprocess(_preprocess(), "ViT-B-32")
    t0 = time.perf_counter()
    images, stats = decoded_images(index, transform, cache_dir)
    assert stats.computed == 0, "the cache was not warm"
    open_s = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start, pairs = time.perf_counter(), 0
    for k, batch in enumerate(_loader(index, images, batch_size, 0)):
        if k == batches:
            break
        x = batch.images
        assert x.dtype == torch.uint8 and x.shape == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
        if to_float:
            x = images.on_device(x.to(device, non_blocking=True))
            if device.type == "cuda":
                torch.cuda.synchronize()
        pairs += len(x)
    name = "c_cache" if to_float else "c_cache_uint8"
    return _row(name, pairs, time.perf_counter() - start, 1, open_s=open_s, normalised_on=device.type)


def measure_tokenize(root: Path, batch_size: int, batches: int) -> dict:
    import open_clip

    index = _index(root)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    start, pairs = time.perf_counter(), 0
    for k, caps in enumerate(_sampler(index, batch_size)):
        if k == batches:
            break
        tokenizer([index.captions[int(c)] for c in caps])
        pairs += len(caps)
    return _row("tokenize", pairs, time.perf_counter() - start, 1)


def build_cache(root: Path, cache_dir: Path) -> dict:
    """The cold build with every CPU (the driver's ``prepare_image_cache``): images/s, not per core."""
    from orchestrator.data.image_cache import decoded_images
    from orchestrator.data.pixels import split_preprocess

    index = _index(root)
    transform = split_preprocess(_preprocess(), "ViT-B-32")
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    _, stats = decoded_images(index, transform, cache_dir, workers=workers)
    seconds = time.perf_counter() - start
    return {
        "variant": "cache_build",
        "images": stats.computed,
        "seconds": seconds,
        "workers": workers,
        "images_per_s": stats.computed / seconds,
        "cache_mib": sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / 2**20,
        **_rss(),
    }


# ------------------------------------------------------------------------------------------------ driver
def _child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    root, kind = Path(args.root), args.child
    if kind == "a":
        return measure_bare(root, args.batch_size, args.bare_batches)
    if kind == "b":
        return measure_decode_runs(root, args.batch_size, args.batches, args.workers, args.runs)
    if kind in ("c", "c8"):
        return measure_cache(root, Path(args.cache_dir), args.batch_size, args.cache_batches, kind == "c")
    if kind == "t":
        return measure_tokenize(root, args.batch_size, args.batches)
    if kind == "build":
        return build_cache(root, Path(args.cache_dir))
    if kind == "d":
        from input_shards import measure_shards, write_benchmark_shards

        pattern = write_benchmark_shards(root, Path(args.cache_dir).parent / "shards")
        return measure_shards(pattern, workers=args.shard_workers, batch_size=args.batch_size, tokenize=False)
    raise SystemExit(f"unknown child {kind!r}")


def _fresh(kind: str, args: argparse.Namespace, root: Path, cache_dir: Path):
    argv = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--root",
        str(root),
        "--cache-dir",
        str(cache_dir),
        "--batch-size",
        str(args.batch_size),
        "--batches",
        str(args.batches),
        "--bare-batches",
        str(args.bare_batches),
        "--shard-workers",
        str(args.shard_workers),
        "--cache-batches",
        str(args.cache_batches),
        "--runs",
        str(args.runs),
        "--workers",
        *[str(w) for w in args.workers],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"variant {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    """The run with the median pairs/s, with every run's figure beside it."""
    median = statistics.median(r["pairs_per_s"] for r in runs)
    best = min(runs, key=lambda r: abs(r["pairs_per_s"] - median))
    return {**best, "runs_pairs_per_s": [r["pairs_per_s"] for r in runs]}


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(rows: list[dict], anchor: float) -> str:
    head = (
        f"{'variant':<16} {'pairs/s':>9} {'cores':>5} {'per core':>9} {'x (a)':>7} {'peak RSS':>9} "
        f"{'anon':>6} {'file':>6} {'worker RSS':>10}  (MiB)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "per_core" not in r:
            continue
        lines.append(
            f"{r['variant']:<16} {r['pairs_per_s']:>9.1f} {r['cores']:>5} {r['per_core']:>9.1f} "
            f"{r['per_core'] / anchor:>7.1f} {r['peak_rss_mib']:>9.0f} "
            f"{r.get('anon_mib', float('nan')):>6.0f} {r.get('file_mib', float('nan')):>6.0f} "
            f"{r['worker_peak_rss_mib']:>10.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=3, help="timed batches of (b) and the tokenizer")
    parser.add_argument("--bare-batches", type=int, default=1, help="timed batches of (a), per run")
    parser.add_argument("--cache-batches", type=int, default=40, help="timed batches of (c), per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of (a), (c) and each (b) worker count (median kept)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="(b) loader worker counts")
    parser.add_argument("--variants", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c", "d"])
    parser.add_argument("--shard-workers", type=int, default=2, help="(d) loader workers")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement in this fresh process, printed as JSON
        print(json.dumps(_child(args)))
        return 0

    t_start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="itr-bench-input-") as tmp:
        root, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        t0 = time.perf_counter()
        photo_like_split(root, args.images)
        made_s = time.perf_counter() - t0
        print(f"{args.images} photo-like 640x480 JPEGs x 5 captions in {made_s:.0f} s", file=sys.stderr)
        build = _fresh("build", args, root, cache_dir)
        print(
            f"cache built: {build['images']} images in {build['seconds']:.1f} s with {build['workers']} "
            f"processes ({build['images_per_s']:.0f} images/s), {build['cache_mib']:.0f} MiB",
            file=sys.stderr,
        )
        # (a) and (c) in rounds of fresh processes, so a change of load on a shared machine hits both alike
        kinds = [k for k in ("a", "c", "c8") if k[0] in args.variants]
        rounds: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.runs):
            for k in kinds:
                rounds[k].append(_fresh(k, args, root, cache_dir))
        if "a" in rounds:
            rows.append(_median(rounds["a"]))
        if "b" in args.variants:
            runs: dict[int, list[dict]] = {w: [] for w in args.workers}
            for r in _fresh("b", args, root, cache_dir):
                runs[r["workers"]].append(r)
            rows += [_median(runs[w]) for w in args.workers]
        rows += [_median(rounds[k]) for k in ("c", "c8") if k in rounds]
        if "d" in args.variants:
            shard = _fresh("d", args, root, cache_dir)
            rows.append(
                {
                    **shard,
                    "variant": f"d_shards_w{shard['workers']}",
                    "cores": max(1, shard["workers"]),
                    "seconds": float("nan"),
                    "pairs": shard["batches"] * args.batch_size,
                }
            )
        rows.append(_fresh("t", args, root, cache_dir))
    anchor = next((r["per_core"] for r in rows if r["variant"] == "a_bare"), None) or rows[0]["per_core"]
    print(_table(rows, anchor))
    ratios = {r["variant"]: r["per_core"] / anchor for r in rows if "per_core" in r}
    b = [r for r in rows if r["variant"].startswith("b_decode")]
    b_scaling = b[1]["pairs_per_s"] / b[0]["pairs_per_s"] if len(b) >= 2 else None
    if b_scaling is not None:
        print(f"(b) {b[1]['variant']} / {b[0]['variant']}: {b_scaling:.2f}x (median of {args.runs})")
    import torch

    load = os.getloadavg()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git_commit(),
        "images": args.images,
        "captions_per_image": 5,
        "batch_size": args.batch_size,
        "image_size": IMAGE_SIZE,
        "cpus": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loadavg_at_end": list(load),
        "data_seconds": made_s,
        "wall_seconds": time.perf_counter() - t_start,
        "cache_build": build,
        "rows": rows,
        "per_core_ratio_to_a": ratios,
        "b_scaling": b_scaling,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({result['wall_seconds']:.0f} s, load average {load[0]:.1f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
