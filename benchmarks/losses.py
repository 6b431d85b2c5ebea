"""Forward + backward time and peak extra memory of every loss family, for batch sizes 128 … 4096.

On CPU each (family, B) runs in a fresh subprocess so its peak memory is its own (the growth of the
process's max RSS over the inputs); on CUDA all run in one process, peak = ``torch.cuda.max_memory_allocated``
above the inputs, reset per measurement. Inputs are random L2-normalised embeddings (D = 512), teacher
features and caption groups (K = 5).

    python benchmarks/losses.py                      # CPU, default sizes
    python benchmarks/losses.py --device cuda --sizes 128 512 1024 2048 4096

On CUDA ``listwise`` and ``bcls_full`` run the fused Triton kernels (``kernel="auto"``) and the
``*_torch`` rows the blocked torch form, side by side.
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

#: family name -> constructor keyword arguments (each family at its papers' defaults, relevance from captions).
FAMILIES = {
    "infonce": {},
    "triplet": {},
    "triplet_sn": {"_family": "triplet", "mining": "soft_negative"},
    "listwise": {"relevance": "teacher"},
    "bcls_swhs": {"_family": "bcls", "relevance": "teacher"},
    "bcls_full": {"_family": "bcls", "relevance": "teacher", "window": None},
    "cusa": {},
    # the O(B³) families again with the blocked torch form forced: on CUDA the default ("auto") is the
    # fused Triton kernels, so these rows are the side-by-side comparison. On CPU "auto" is already torch.
    "listwise_torch": {"_family": "listwise", "relevance": "teacher", "kernel": "torch"},
    "bcls_full_torch": {"_family": "bcls", "relevance": "teacher", "window": None, "kernel": "torch"},
}
#: O(B³) work: skipped on CPU above this batch size (minutes per step).
CUBIC = {"listwise", "bcls_full", "listwise_torch", "bcls_full_torch"}
#: Rows that only differ from another row on a GPU.
GPU_ONLY = {"listwise_torch", "bcls_full_torch"}
CPU_CUBIC_MAX_B = 1024


def run_one(family: str, B: int, device: str, repeats: int, D: int = 512) -> dict:
    import torch

    import methods
    from methods import EmbeddingBatch

    torch.manual_seed(0)
    dev = torch.device(device)
    params = dict(FAMILIES[family])
    name = params.pop("_family", family)
    loss = methods.build(name, **params).to(dev)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, device=dev), dim=-1)  # noqa: E731
    image = unit(B, D).requires_grad_(True)
    text = unit(B, D).requires_grad_(True)
    batch = EmbeddingBatch(
        image_emb=image,
        text_emb=text,
        image_ids=torch.arange(B, device=dev),
        image_uni=unit(B, D).requires_grad_(True),
        text_uni=unit(B, D).requires_grad_(True),
        teacher_image=unit(B, 1280),
        teacher_text=unit(B, 384),
        caption_group_emb=unit(B, 5, 384),
        caption_group_mask=torch.ones(B, 5, dtype=torch.bool, device=dev),
        text_caption_emb=unit(B, 384),
    )

    def step() -> None:
        out = loss(batch)
        out.total.backward()
        image.grad = text.grad = None

    # the baseline is taken with the inputs in place, before the first (warm-up) step, so the peak covers it
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"family": family, "B": B, "ms": 1000 * statistics.median(times), "peak_mib": max(peak, 0) / 2**20}


def measure(family: str, B: int, device: str, repeats: int) -> dict:
    """One table cell. CUDA: in this process (max_memory_allocated is reset per measurement, and a start-up per
    cell would cost seconds of scarce device time). CPU: a fresh subprocess, so max RSS is this cell's own."""
    if device.startswith("cuda"):
        import torch

        try:
            return run_one(family, B, device, repeats)
        except Exception as err:  # an OOM at B = 4096 is a result, not a crash
            return {"family": family, "B": B, "ms": None, "peak_mib": None, "note": f"{type(err).__name__}: {err}"[:60]}
        finally:
            torch.cuda.empty_cache()
    proc = subprocess.run(
        [sys.executable, __file__, "--device", device, "--repeats", str(repeats), "--one", family, str(B)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"family": family, "B": B, "ms": None, "peak_mib": None, "note": last[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="default: all (on CPU without the *_torch rows, which equal their auto rows there)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("FAMILY", "B"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.device, args.repeats)))
        return

    if args.families is None:
        args.families = [f for f in FAMILIES if args.device.startswith("cuda") or f not in GPU_ONLY]
    rows = []
    for family in args.families:
        for B in args.sizes:
            if args.device == "cpu" and family in CUBIC and B > CPU_CUBIC_MAX_B:
                rows.append({"family": family, "B": B, "ms": None, "peak_mib": None, "note": "skipped (O(B^3) on CPU)"})
                continue
            rows.append(measure(family, B, args.device, args.repeats))
            r = rows[-1]
            print(
                f"{r['family']:<11} B={r['B']:<5} "
                + (f"{r['ms']:9.1f} ms {r['peak_mib']:9.1f} MiB" if r["ms"] is not None else r.get("note", "")),
                file=sys.stderr,
                flush=True,
            )

    import torch

    device_name = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    print(
        f"# losses: forward+backward, D=512, median of {args.repeats}; {datetime.date.today()} {device_name} {commit}"
    )
    print(f"| family | {' | '.join(f'B={b}' for b in args.sizes)} |")
    print("|---|" + "---|" * len(args.sizes))
    for family in args.families:
        cells = []
        for B in args.sizes:
            r = next(x for x in rows if x["family"] == family and x["B"] == B)
            cells.append("—" if r["ms"] is None else f"{r['ms']:.1f} ms / {r['peak_mib']:.0f} MiB")
        print(f"| {family} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
