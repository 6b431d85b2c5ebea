"""Orchestration cost of ``itr sweep`` per trial: N trivial trials through Ray Tune vs the same work in a loop.

Each trial runs ``trivial_trial`` (no model, no data: ``--reports`` reports through the Session protocol, optionally
with a tiny checkpoint) instead of ``train_loop``, so what is measured is the sweep machinery: Tune scheduling,
trial actors, reports and checkpoints, the MLflow parent/child runs written by the driver, the leaderboard and its
plots. Ray is started (and warmed up with one throw-away sweep) before anything is timed.

    python benchmarks/sweep_overhead.py [--trials 8] [--reports 3] [--concurrency 2] [--checkpoint]

Peak RSS: the largest sum of RSS over this process and all its descendants (driver, GCS, raylet, agents, trial
workers), sampled every 0.2 s during the timed sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.search_space import load_space  # noqa: E402


def trivial_trial(cfg, session) -> dict:
    """``train.epochs`` reports of made-up metrics (with a 1 KB checkpoint when ITR_BENCH_CHECKPOINT=1)."""
    metrics: dict = {}
    with_ckpt = os.environ.get("ITR_BENCH_CHECKPOINT") == "1"
    for epoch in range(cfg.train.epochs):
        metrics = {"train/loss": 1.0 / (epoch + 1), "val/rsum": float(cfg.train.seed + epoch), "epoch": epoch}
        if with_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "state.bin").write_bytes(b"\0" * 1024)
                session.report(metrics, Path(tmp), epoch)
        else:
            session.report(metrics, None, epoch)
    return metrics


class _PlainSession:
    rank, world_size, device = 0, 1, "cpu"

    def prepare_model(self, model):
        return model

    def latest_checkpoint(self):
        return None

    def report(self, metrics, checkpoint_dir, epoch):
        self.last = dict(metrics)


def _children_rss_kb(root: int) -> int:
    """Sum of VmRSS (kB) over ``root`` and its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as fh:
                kb = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry)] = ppid
        rss[int(entry)] = kb
    total = 0
    for pid, kb in rss.items():
        p, seen = pid, 0
        while p and p != root and seen < 64:
            p, seen = parents.get(p, 0), seen + 1
        if p == root:
            total += kb
    return total


class _RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _children_rss_kb(os.getpid()))
            self._done.wait(0.2)

    def stop(self) -> int:
        self._done.set()
        self.join(2)
        return self.peak


def _space(folder: Path, name: str, trials: int, reports: int, concurrency: int, tracking: bool) -> Path:
    base = {
        "data": {"format": "synthetic"},
        "model": {"name": "itr-tiny-vit"},
        "train": {"epochs": reports, "output_dir": str(folder / "runs")},
        "tracking": {
            "enabled": tracking,
            "uri": f"sqlite:///{folder / 'mlflow.db'}",
            "artifact_dir": str(folder / "mlartifacts"),
            "experiment": "bench",
        },
    }
    doc = {
        "name": name,
        "base": base,
        "space": {"train.seed": {"grid": list(range(trials))}},
        "metric": "val/rsum",
        "max_concurrent_trials": concurrency,
        "resources": {"cpu": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--reports", type=int, default=3, help="reports (epochs) per trial")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--checkpoint", action="store_true", help="a 1 KB checkpoint with every report")
    args = parser.parse_args()
    if args.checkpoint:
        os.environ["ITR_BENCH_CHECKPOINT"] = "1"

    import logging

    logging.basicConfig(level=logging.WARNING)
    from orchestrator.run import init_ray
    from orchestrator.sweep import run_sweep

    folder = Path(tempfile.mkdtemp(prefix="itr-bench-"))
    t0 = time.perf_counter()
    init_ray()
    ray_up = time.perf_counter() - t0
    # warm-up: first actors, MLflow schema creation, matplotlib import (not timed)
    run_sweep(
        load_space(_space(folder, "warmup", 2, 1, args.concurrency, True)), trial_fn=trivial_trial, progress=False
    )

    rows = []
    for tracking in (True, False):
        name = f"bench-{'mlflow' if tracking else 'no-tracking'}"
        space = load_space(_space(folder, name, args.trials, args.reports, args.concurrency, tracking))
        sampler = _RssSampler()
        sampler.start()
        t = time.perf_counter()
        run_sweep(space, trial_fn=trivial_trial, progress=False)
        sweep_s = time.perf_counter() - t
        peak_kb = sampler.stop()

        t = time.perf_counter()
        for seed in range(args.trials):
            from orchestrator.search_space import trial_config

            cfg = trial_config(space.base_tree, {"train.seed": seed})
            trivial_trial(cfg, _PlainSession())
        plain_s = time.perf_counter() - t
        rows.append((name, args.trials, sweep_s, plain_s, (sweep_s - plain_s) / args.trials, peak_kb / 1024 / 1024))

    print(
        f"\nRay up in {ray_up:.1f} s (not counted); {args.reports} reports per trial, "
        f"{args.concurrency} trials at a time, checkpoints: {'1 KB each report' if args.checkpoint else 'none'}; "
        f"{os.cpu_count()} CPUs\n"
    )
    header = ["sweep", "trials", "sweep s", "plain s", "overhead / trial s", "peak RSS (all procs) GB"]
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for name, n, sweep_s, plain_s, per, rss in rows:
        print(f"{name} | {n} | {sweep_s:.1f} | {plain_s:.3f} | {per:.2f} | {rss:.2f}")
    worst = max(r[4] for r in rows)
    print(f"\ntarget < 3 s per trial: {'met' if worst < 3 else 'NOT met'} (worst {worst:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
