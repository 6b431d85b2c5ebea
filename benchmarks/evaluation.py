"""Time and peak extra memory of the evaluation protocols at COCO sizes, from random embeddings.

Workloads (each in a fresh subprocess, so its peak memory is its own: CUDA ``max_memory_allocated`` above the
inputs, CPU growth of the process's max RSS over the inputs):

* ``recall_5k``: all recall metrics both directions (R@1/5/10, RSUM, median/mean rank), 5,000 x 25,000;
* ``folds_1k``: the COCO 1K protocol (5 folds of 1,000 x 5,000) on the same embeddings;
* ``eccv_rankings``: top-100 lists both directions at 5K x 25K (what ``itr eval --eccv`` builds);
* ``eccv_package``: the eccv-caption package scoring those lists (pure Python; CPU only, device-independent);
* ``graded_1k``: NDCG@10/25/all + Kendall's tau (whole lists) at 1,000 x 5,000 with teacher caption relevance;
* ``graded_5k_ndcg``: NDCG@10/25/all at 5K x 25K, Kendall's tau over 1,000 sampled candidates.

    python benchmarks/evaluation.py                            # CPU, D = 256
    python benchmarks/evaluation.py --device cuda --dtype float16 --repeats 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKLOADS = ["recall_5k", "folds_1k", "eccv_rankings", "eccv_package", "graded_1k", "graded_5k_ndcg"]


def _inputs(n: int, per_image: int, dim: int, device: str, dtype: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    owners = torch.arange(n).repeat_interleave(per_image)
    txt = torch.nn.functional.normalize(img[owners] + 0.8 * torch.randn(len(owners), dim, generator=gen), dim=1)
    dt = getattr(torch, dtype)
    return img.to(device, dt), txt.to(device, dt), owners.numpy()


def run_one(name: str, device: str, dtype: str, dim: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from orchestrator.evaluation import fold_metrics, graded_metrics, retrieval_metrics
    from orchestrator.evaluation.graded import CaptionRelevance

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    small = name == "graded_1k"
    img, txt, owners = _inputs(1000 if small else 5000, 5, dim, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    prepared = None
    if name == "recall_5k":
        fn = lambda: retrieval_metrics(img, txt, owners)  # noqa: E731
    elif name == "folds_1k":
        fn = lambda: fold_metrics(img, txt, owners, num_folds=5)  # noqa: E731
    elif name in ("eccv_rankings", "eccv_package"):
        from orchestrator.evaluation.eccv import eccv_metrics, eccv_rankings, eccv_reference

        ref = eccv_reference()
        cids = np.asarray(ref.coco_ids)
        iids = np.asarray([ref.coco_gts["t2i"][int(c)][0] for c in cids[::5]])
        if name == "eccv_rankings":
            fn = lambda: eccv_rankings(img, txt, iids, cids, k=100)  # noqa: E731
        else:
            prepared = eccv_rankings(img, txt, iids, cids, k=100)
            fn = lambda: eccv_metrics(*prepared)  # noqa: E731
    else:
        teacher = torch.nn.functional.normalize(
            torch.randn(len(owners), 384, generator=torch.Generator().manual_seed(1)), dim=1
        )
        rel = CaptionRelevance(teacher, owners, img.shape[0], "max", device=torch.device(device))
        kc = None if small else 1000
        fn = lambda: graded_metrics(img, txt, rel, kendall_candidates=kc)  # noqa: E731
    # peak memory of the first call (also the warm-up)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(max(0, repeats - 1)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "workload": name,
        "median_s": statistics.median(times or [first]),
        "first_s": first,
        "peak_mib": max(0, peak) / 2**20,
        "repeats": repeats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.dtype, args.dim, args.repeats)))
        return
    rows = []
    for name in args.workloads:
        if name == "eccv_package" and args.device != "cpu":
            continue
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--dim",
            str(args.dim),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"| {name} | {r['median_s']:.3f} s | {r['first_s']:.3f} s | {r['peak_mib']:.0f} MiB |", flush=True)
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "host": platform.node(),
                "device": args.device,
                "dtype": args.dtype,
                "dim": args.dim,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
