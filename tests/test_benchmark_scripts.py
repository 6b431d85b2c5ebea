"""The GPU benchmark must not fail on the lent machine, where device time is scarce: run it whole on the CPU at a
toy size (every variant, the Ray Train one included, and the evaluation timing) and check it measured each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray
def test_gpu_throughput_script_measures_every_variant_on_cpu(tmp_path):
    """``main`` in this process (a fresh one costs ~15 s of imports here), one timed step per variant and no
    warm-up (the compiled variant's step compiles), the Ray Train variant on a Ray it starts and shuts down."""
    import torch

    from benchmarks import gpu_throughput

    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--model", "itr-tiny-vit", "--batch-sizes", "8", "--steps", "1", "--warmup", "0"]
    try:
        assert gpu_throughput.main([*argv, "--eval-size", "40", "200", "16", "--out", str(out)]) == 0
    finally:
        torch._dynamo.reset()  # no compiled graphs of the tiny model left for later tests
    result = json.loads(out.read_text())
    assert result["warmup"] == 0 and result["steps"] == 1
    variants = {row["variant"]: row for row in result["rows"]}
    assert set(variants) == {
        "bare",
        "ours/infonce",
        "ours/cusa",
        "ours/listwise",
        "ours/bcls",
        "accum4/infonce",
        "compiled/infonce",
        "ray/infonce",
    }
    for name, row in variants.items():
        assert math.isfinite(row["pairs_per_s"]) and row["pairs_per_s"] > 0, (name, row["note"])
        assert math.isfinite(row["ratio_to_bare"]), name
    assert result["evaluation"]["images"] == 40 and result["evaluation"]["seconds"] > 0


def test_losses_benchmark_measures_every_family_it_names(tmp_path):
    """Every row of the table is a measurement (the *_torch rows included), at a toy size on the CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    families = ["listwise", "bcls_full", "listwise_torch", "bcls_full_torch", "cusa"]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "losses.py"),
            "--sizes",
            "24",
            "--repeats",
            "1",
            "--families",
            *families,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "B=" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == families
    assert all(" ms / " in r for r in rows), proc.stdout


def test_kernel_tiles_benchmark_times_every_tile_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "kernel_tiles.py"),
            "--device",
            "cpu",
            "--sizes",
            "12",
            "--repeats",
            "1",
            "--tiles",
            "8x16x1",
            "16x8x2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| s") or line.startswith("| k")]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| sndcg", "8x16x1"],
        ["| sndcg", "16x8x2"],
        ["| kendall", "8x16x1"],
        ["| kendall", "16x8x2"],
    ]
    assert all(r.endswith(" ms |") for r in rows), proc.stdout
    bad = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_tiles.py"), "--tiles", "24x16x4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "powers of two" in bad.stderr


def test_accumulation_memory_benchmark_measures_both_ways():
    """The script's measurement at a toy size, in this process (its fresh-process runs cost ~15 s here): both
    configurations take one step with the same loss and report peaks; a total that K does not divide is refused."""
    from benchmarks import accumulation_memory as bench

    whole, acc = bench.child("itr-tiny-vit", "infonce", 8, 1), bench.child("itr-tiny-vit", "infonce", 8, 2)
    assert (whole["micro_batch"], acc["micro_batch"], acc["accum_steps"]) == (8, 4, 2)
    assert all(r["peak_mib"] >= r["peak_before_mib"] > 0 and r["step_s"] > 0 for r in (whole, acc))
    assert acc["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    with pytest.raises(SystemExit) as refused:
        bench.main(["--total", "10", "--accum", "4"])
    assert refused.value.code == 2
