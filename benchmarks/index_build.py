"""Dataset index at scale (issue 15, item 3): load and build times, bytes per caption, copy-on-write in forks.

    python benchmarks/index_build.py                 # 300k-caption load + 1M build (about a minute)
    python benchmarks/index_build.py --large         # also the 3.3M-caption build and file load (minutes)

Data are generated into a temp folder (image paths only, no image files; ``verify_images: none``). Captions are
COCO-like: 8-14 words from a fixed vocabulary, about 55 characters; paths ``train2014/COCO_train2014_<12 digits>.jpg``;
ids the image number. Rows:

* ``load captions_json``: ``load_split(DataConfig(root=..., verify_images="none"), "train")`` on a written
  ``train.json``: ``json.load`` + validation + caption cleaning + packing, what a run pays (best of ``--repeats``).
* ``build from lists``: ``DatasetIndex(...)`` from in-memory lists (ids, captions, caption -> image, relative
  paths under one root) made beforehand: the columnar packing, uniqueness and CSR alone (best of ``--repeats``).

Memory per caption, two ways: ``traced`` = ``tracemalloc`` bytes still allocated after the load/build returned
(its inputs freed or excluded; a separate pass, since tracing slows Python down; file loads above 1M captions are
not traced), and ``columns`` = the sum of the index's numpy/bytes buffers (``DatasetIndex.column_nbytes``; object
headers not counted). ``peak`` is the traced peak during a file load (the parsed JSON tree).

Copy-on-write: a forked child (``os.fork``, as DataLoader workers) reads every caption, id and path of the
300k-caption index; the growth of its ``Private_Dirty`` (``/proc/self/smaps_rollup``) is reported next to the same
reads of a plain ``list[str]`` of the captions (each read writes the string's refcount, so its pages get copied).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.config import DataConfig  # noqa: E402
from orchestrator.data.columns import PathColumn  # noqa: E402
from orchestrator.data.index import DatasetIndex  # noqa: E402
from orchestrator.data.splits import load_split  # noqa: E402

VOCAB = (
    "a an the man woman person people child dog cat horse bus train car truck plane boat bird pizza cake "
    "table street kitchen room field beach water snow sky building sign clock bench phone laptop tennis "
    "baseball skateboard surfboard giraffe elephant zebra sheep cow red blue green white black yellow large "
    "small young old two three several sitting standing riding holding walking eating playing flying looking "
    "on in at with near next to of under over front top side down up"
).split()


#: File loads above this many captions are not traced (tracemalloc would slow the JSON parse for minutes).
TRACE_MAX_LOAD = 1_000_000


def make_records(num_images: int, captions_per_image: int, seed: int = 0) -> dict[str, list[Any]]:
    """Generated columns: ``image_ids`` / ``image_files`` (num_images,), ``captions`` / ``caption_image``
    (num_images * captions_per_image,), captions grouped by image."""
    rng = np.random.default_rng(seed)
    n = num_images * captions_per_image
    words = rng.integers(0, len(VOCAB), size=(n, 14)).tolist()
    lengths = rng.integers(8, 15, size=n).tolist()
    vocab = VOCAB
    captions = [" ".join([vocab[w] for w in row[:k]]) for row, k in zip(words, lengths)]
    return {
        "image_ids": [str(100000 + i) for i in range(num_images)],
        "image_files": [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(num_images)],
        "captions": captions,
        "caption_image": np.repeat(np.arange(num_images, dtype=np.int64), captions_per_image),
    }


def write_captions_json(folder: Path, num_images: int, captions_per_image: int, seed: int = 0) -> Path:
    """``folder/train.json``: a captions_json list of ``{image, caption, image_id}`` records."""
    cols = make_records(num_images, captions_per_image, seed)
    ids, files = cols["image_ids"], cols["image_files"]
    records = [
        {"image": files[i], "caption": c, "image_id": ids[i]}
        for c, i in zip(cols["captions"], cols["caption_image"].tolist())
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.json"
    with path.open("w", encoding="utf-8") as fh:
        json.dump(records, fh)
    return path


def load(folder: Path) -> DatasetIndex:
    return load_split(DataConfig(root=folder, verify_images="none"), "train")


def build(cols: dict[str, list[Any]], root: str = "/data/coco") -> DatasetIndex:
    return DatasetIndex(
        name="bench",
        image_ids=cols["image_ids"],
        captions=cols["captions"],
        caption_image=cols["caption_image"],
        image_paths=PathColumn(root, cols["image_files"]),
    )


def best_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process), each the best of ``repeats`` calls. On a shared machine the
    CPU seconds are what one quiet core would take."""
    wall, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        del result
    return min(wall), min(cpu)


def traced(fn: Callable[[], DatasetIndex]) -> tuple[DatasetIndex, int, int]:
    """(index, bytes still traced after ``fn`` returned, peak bytes during it), both net of what was allocated
    before."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = fn()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return index, current - base, peak - base


def private_dirty_bytes() -> int:
    """This process's ``Private_Dirty`` (pages written since the fork, or never shared)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


def forked_growth(read: Callable[[], None]) -> int:
    """Bytes of ``Private_Dirty`` a forked child gains while it runs ``read`` (gc off in the child, so only the
    reads touch the parent's pages)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            gc.disable()
            before = private_dirty_bytes()
            read()
            os.write(wfd, str(private_dirty_bytes() - before).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        text = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise RuntimeError(f"forked reader failed (status {status})")
    return int(text)


def read_everything(index: DatasetIndex) -> Callable[[], None]:
    """Every caption, image id and image path of ``index``, each once (the values are dropped)."""

    def read() -> None:
        for _ in index.captions:
            pass
        for _ in index.image_ids:
            pass
        assert isinstance(index.image_paths, PathColumn)
        for _ in index.image_paths.strings():
            pass

    return read


def cow_row(index: DatasetIndex) -> dict[str, Any]:
    """Fork growth reading the index vs reading a ``list[str]`` copy of its captions."""
    columns = sum(index.column_nbytes().values())
    packed = forked_growth(read_everything(index))
    as_list = list(index.captions)
    list_bytes = sum(sys.getsizeof(s) for s in as_list) + sys.getsizeof(as_list)

    def read_list() -> None:
        for _ in as_list:
            pass

    listed = forked_growth(read_list)
    return {
        "captions": index.num_captions,
        "index_bytes": columns,
        "fork_growth_index": packed,
        "list_bytes": list_bytes,
        "fork_growth_list": listed,
    }


def _row(
    what: str, index: DatasetIndex, seconds: tuple[float, float], kept: int | None, peak: int | None
) -> dict[str, Any]:
    n = index.num_captions
    return {
        "what": what,
        "captions": n,
        "images": index.num_images,
        "seconds": seconds[0],
        "cpu_seconds": seconds[1],
        "traced_bytes_per_caption": None if kept is None else kept / n,
        "columns_bytes_per_caption": sum(index.column_nbytes().values()) / n,
        "peak_bytes_per_caption": None if peak is None else peak / n,
    }


def load_row(folder: Path, images: int, per: int, repeats: int) -> tuple[dict[str, Any], DatasetIndex]:
    """The ``load captions_json`` row of a generated file (removed afterwards) and the loaded index."""
    write_captions_json(folder, images, per)
    load(folder)  # warm: imports, regex compile
    large = images * per > TRACE_MAX_LOAD
    seconds = best_seconds(lambda: load(folder), 1 if large else repeats)
    if large:  # tracing a multi-GB JSON parse takes minutes: columns only (the build row is traced)
        index, kept, peak = load(folder), None, None
    else:
        index, kept, peak = traced(lambda: load(folder))
    (folder / "train.json").unlink()
    return _row("load captions_json", index, seconds, kept, peak), index


def build_row(captions: int, per: int, repeats: int) -> dict[str, Any]:
    """The ``build from lists`` row: ``DatasetIndex(...)`` from generated lists (made before the clock starts)."""
    cols = make_records(captions // per, per)
    build(make_records(10, 1))  # warm
    seconds = best_seconds(lambda: build(cols), repeats)
    index, kept, _ = traced(lambda: build(cols))
    return _row("build from lists", index, seconds, kept, None)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-images", type=int, default=60000, help="images of the captions_json load (x5)")
    parser.add_argument(
        "--build-sizes",
        type=int,
        nargs="*",
        default=[1_000_000],
        help="captions of the build-from-lists rows (5 per image)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also 3.3M captions, CC3M-shaped (1 per image): the build and the file load",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="2-core CPU", help="how to name this machine in the results")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "index_build.json")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    load_before = f"{os.getloadavg()[0]:.1f}"
    builds = [(n, 5) for n in args.build_sizes] + ([(3_300_000, 1)] if args.large else [])
    file_loads = [(args.load_images, 5)] + ([(3_300_000, 1)] if args.large else [])
    cow: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="itr-index-bench-") as tmp:
        for k, (images, per) in enumerate(file_loads):
            row, index = load_row(Path(tmp) / f"load{k}", images, per, args.repeats)
            rows.append(row)
            if k == 0:
                cow = cow_row(index)
            del index
    for captions, per in builds:
        rows.append(build_row(captions, per, args.repeats if captions < 2_000_000 else 1))
    print(
        f"dataset index, {args.device} ({platform.processor() or platform.machine()}), one process, "
        f"commit {commit()}, best of {args.repeats}"
    )
    print(f"load average before / after: {load_before} / {os.getloadavg()[0]:.1f}")
    print(
        "| what | captions | images | wall s | CPU s | bytes/caption (traced) | bytes/caption (columns) | "
        "peak bytes/caption |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "—" if r["peak_bytes_per_caption"] is None else f"{r['peak_bytes_per_caption']:.0f}"
        kept = "—" if r["traced_bytes_per_caption"] is None else f"{r['traced_bytes_per_caption']:.1f}"
        print(
            f"| {r['what']} | {r['captions']:,} | {r['images']:,} | {r['seconds']:.2f} | "
            f"{r['cpu_seconds']:.2f} | {kept} | "
            f"{r['columns_bytes_per_caption']:.1f} | {peak} |"
        )
    print(
        f"forked child reading all {cow['captions']:,} captions, ids and paths: Private_Dirty +"
        f"{cow['fork_growth_index'] / 2**20:.2f} MiB for an index of {cow['index_bytes'] / 2**20:.1f} MiB; "
        f"the same captions as a list[str] ({cow['list_bytes'] / 2**20:.1f} MiB): "
        f"+{cow['fork_growth_list'] / 2**20:.2f} MiB"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "device": args.device,
                "commit": commit(),
                "load_average_before": float(load_before),
                "python": sys.version.split()[0],
                "rows": rows,
                "copy_on_write": cow,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
