"""Forward + backward time of the fused Triton kernels (methods/kernels.py) for several tile shapes.

The kernels' tile (BLOCK_J candidates x BLOCK_K candidates per step, NUM_WARPS) is fixed in the code; this
measures the alternatives side by side on the GPU so the default can be chosen from figures, not guessed:

    python benchmarks/kernel_tiles.py --sizes 1024 4096        # CUDA
    TRITON_INTERPRET=1 python benchmarks/kernel_tiles.py --device cpu --sizes 16 --repeats 1   # smoke test

Rows: S-NDCG (``smooth_ndcg_loss``) and the all-pairs hinge Kendall loss (``kendall_rank_loss``), both
directions, forward + backward, median of ``--repeats`` after one warm-up call (which compiles).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_TILES = ["32x128x4", "16x128x4", "64x64x4", "32x64x2", "64x128x8", "128x64x8"]


def parse_tile(text: str) -> tuple[int, int, int]:
    """``"32x128x4"`` -> (BLOCK_J, BLOCK_K, NUM_WARPS)."""
    try:
        j, k, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tile must look like 32x128x4 (BLOCK_J x BLOCK_K x NUM_WARPS), got {text!r}"
        ) from None
    for v in (j, k, w):
        if v < 1 or v & (v - 1):
            raise argparse.ArgumentTypeError(f"tile sizes and warps must be powers of two, got {text!r}")
    return j, k, w


def time_tile(loss: str, B: int, tile: tuple[int, int, int], device: str, repeats: int) -> float:
    """Median milliseconds of one forward + backward with the given tile."""
    import torch

    import methods.functional as fn
    from methods import kernels

    kernels.BLOCK_J, kernels.BLOCK_K, kernels.NUM_WARPS = tile
    g = torch.Generator(device=device).manual_seed(B)
    S = ((torch.rand(B, B, device=device, generator=g) * 2 - 1) * 0.4).requires_grad_(True)
    R = torch.rand(B, B, device=device, generator=g)
    f = (
        (lambda: fn.smooth_ndcg_loss(S, R, 0.01, kernel="triton"))
        if loss == "sndcg"
        else (lambda: fn.kendall_rank_loss(S, R, 0.3, "hinge", kernel="triton"))
    )

    def step() -> None:
        f().backward()
        S.grad = None
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # compiles this tile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--tiles", type=parse_tile, nargs="+", default=[parse_tile(t) for t in DEFAULT_TILES])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from methods import kernels

    if not kernels.supported(torch.zeros(1, device=args.device)):
        sys.exit(
            f"kernel_tiles.py: the Triton kernels cannot run on {args.device!r} here "
            "(no triton, or a CPU without TRITON_INTERPRET=1)"
        )
    rows = []
    for loss in ("sndcg", "kendall"):
        for tile in args.tiles:
            cells = []
            for B in args.sizes:
                try:
                    cells.append(f"{time_tile(loss, B, tile, args.device, args.repeats):.2f} ms")
                except Exception as err:  # a tile this GPU cannot compile is a result
                    cells.append(f"{type(err).__name__}"[:24])
                print(
                    f"{loss:<8} tile {'x'.join(map(str, tile)):<10} B={B:<5} {cells[-1]}", file=sys.stderr, flush=True
                )
            rows.append((loss, tile, cells))

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (Triton interpreter)"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    print(
        f"# kernel tiles: forward+backward, both directions, median of {args.repeats}; "
        f"{datetime.date.today()} {device_name} {commit}"
    )
    print(f"| loss | tile (J x K x warps) | {' | '.join(f'B={b}' for b in args.sizes)} |")
    print("|---|---|" + "---|" * len(args.sizes))
    for loss, tile, cells in rows:
        print(f"| {loss} | {'x'.join(map(str, tile))} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
