"""Peak memory of one training step on B·K pairs: one batch of B·K vs ``train.accum_steps`` K x micro-batches of B.

Each measurement runs in a fresh Python process (``ru_maxrss`` is a per-process high-water mark), on the CPU::

    python benchmarks/accumulation_memory.py                      # B·K = 512: 1 x 512 vs 8 x 64, 3 runs each

The child builds the student and the loss exactly as ``train_loop`` does, records its peak RSS, then runs one
step (forward -> loss -> backward -> AdamW; with K > 1 ``orchestrator.accumulation.FeatureCache``) on synthetic
inputs and records the peak RSS again. The table gives the medians over ``--runs`` processes: the whole peak
and the step's own part (peak after the step minus peak before it), and the ratios of accumulation to the whole
batch. Writes ``benchmarks/results/accumulation_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child(model_name: str, family: str, total: int, accum: int) -> dict[str, Any]:
    """One step on ``total`` pairs in ``accum`` micro-batches; peak RSS before and after it."""
    import torch

    from benchmarks.gpu_throughput import experiment_config, synthetic_inputs
    from methods import EmbeddingBatch
    from orchestrator.accumulation import feature_cache
    from orchestrator.losses import build_loss
    from orchestrator.models.student import build_student, forward_embeddings

    torch.manual_seed(0)
    cfg = experiment_config(family, model_name, total // accum)
    model = build_student(cfg.model, heads=cfg.resolved_heads).model.train()
    loss_fn = build_loss(cfg)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=cfg.train.lr)
    images, tokens = synthetic_inputs(getattr(model, "base", model), total, torch.device("cpu"))
    ids = torch.arange(total)
    cache = feature_cache(model, forward_embeddings, accum, device=torch.device("cpu"))
    before = peak_rss_mib()
    t0 = time.perf_counter()
    emb = forward_embeddings(model, images, tokens) if cache is None else cache.embed(model, images, tokens)
    out = loss_fn(EmbeddingBatch(image_ids=ids, **emb))
    optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    if cache is not None:
        cache.backward()
    optimizer.step()
    return {
        "total": total,
        "accum_steps": accum,
        "micro_batch": total // accum,
        "loss": float(out.total.detach()),
        "peak_before_mib": before,
        "peak_mib": peak_rss_mib(),
        "step_s": time.perf_counter() - t0,
    }


def measure(model_name: str, family: str, total: int, accum: int) -> dict[str, Any]:
    """``child`` in a fresh interpreter."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model",
        model_name,
        "--family",
        family,
        "--total",
        str(total),
        "--accum",
        str(accum),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {total}/{accum} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="itr-tiny-vit")
    parser.add_argument(
        "--family",
        default="infonce",
        choices=["infonce", "triplet"],
        help="a family without batch-side inputs (the memory at stake is the towers')",
    )
    parser.add_argument("--total", type=int, default=512, help="B·K, the pairs one loss sees")
    parser.add_argument("--accum", type=int, default=8, help="K, the micro-batches of accumulation")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration (median)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes at a time (1 for step times; the memory figures are per process anyway)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accumulation_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.total % args.accum:
        parser.error(f"--total {args.total} is not a multiple of --accum {args.accum}")
    if args.child:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(child(args.model, args.family, args.total, args.accum)))
        return 0

    rows = []
    configs = [accum for accum in (1, args.accum) for _ in range(args.runs)]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda accum: measure(args.model, args.family, args.total, accum), configs))
    for accum in (1, args.accum):
        runs = [r for r in done if r["accum_steps"] == accum]
        rows.append(
            {
                "accum_steps": accum,
                "micro_batch": args.total // accum,
                "runs": runs,
                "peak_mib": statistics.median(r["peak_mib"] for r in runs),
                "step_mib": statistics.median(r["peak_mib"] - r["peak_before_mib"] for r in runs),
                "step_s": statistics.median(r["step_s"] for r in runs),
                "loss": runs[0]["loss"],
            }
        )
    whole, acc = rows
    ratios = {
        "peak": acc["peak_mib"] / whole["peak_mib"],
        "step": acc["step_mib"] / max(whole["step_mib"], 1e-9),
        "time": acc["step_s"] / whole["step_s"],
    }
    print(
        f"one step on B·K = {args.total} pairs, {args.model}, {args.family}, median of {args.runs} fresh "
        f"processes ({platform.processor() or platform.machine()}, CPU)"
    )
    print("| configuration | peak RSS MiB | step's own peak MiB | step s | loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['accum_steps']} x {r['micro_batch']} | {r['peak_mib']:.0f} | {r['step_mib']:.0f} | "
            f"{r['step_s']:.2f} | {r['loss']:.6f} |"
        )
    print(
        f"accumulation / whole batch: peak {ratios['peak']:.2f}, step's own {ratios['step']:.2f}, "
        f"time {ratios['time']:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": args.model,
                "family": args.family,
                "total": args.total,
                "rows": rows,
                "ratios": ratios,
                "python": sys.version.split()[0],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
