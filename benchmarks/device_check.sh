#!/usr/bin/env bash
# The GPU checks that need no carried wheels (torch + pytest are on the lent machine; ray, open_clip,
# mlflow and pydantic are not), as one prepared run for the `device` tool:
#
#     run(command="bash benchmarks/device_check.sh", timeout_s=570)
#
# 1. tests/test_kernels.py compiled for real: the Triton kernels against the naive float64 loops and the
#    blocked torch form, and the B = 1000 / 2048 CUDA comparison (values, gradients, peak memory).
# 2. benchmarks/losses.py on CUDA: every family, B = 128 ... 4096, the O(B^3) ones with the Triton kernels
#    ("auto") and with the torch form (*_torch rows) side by side.
# 3. benchmarks/kernel_tiles.py: the kernels' tile shapes side by side (the default 32x128x4 is a guess).
# 4. benchmarks/evaluation.py: recall at COCO 5K x 25K in float16 (target < 0.1 s).
# Each step has its own time limit, so one that hangs leaves the others' results. Results go to $OUT.
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/device_check}"
mkdir -p "$out"
{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null || echo "commit: (no git here)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/machine.txt"

echo "== tests/test_kernels.py (compiled)"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not config" 2>&1 \
  | tail -25 | tee "$out/test_kernels.txt"

echo "== benchmarks/losses.py"
timeout 240 python benchmarks/losses.py --device cuda --sizes 128 512 1024 2048 4096 --repeats 5 \
  > "$out/losses.md" 2> "$out/losses.log"
echo "rc=$?" >> "$out/losses.log"
cat "$out/losses.md"; tail -3 "$out/losses.log"

echo "== benchmarks/kernel_tiles.py"
timeout 90 python benchmarks/kernel_tiles.py --sizes 1024 4096 --repeats 5 > "$out/kernel_tiles.md" 2> "$out/kernel_tiles.log"
echo "rc=$?" >> "$out/kernel_tiles.log"
cat "$out/kernel_tiles.md"; tail -3 "$out/kernel_tiles.log"

echo "== benchmarks/evaluation.py (recall, float16)"
timeout 90 python benchmarks/evaluation.py --device cuda --dtype float16 --repeats 10 --workloads recall_5k folds_1k \
  > "$out/evaluation.md" 2> "$out/evaluation.log"
echo "rc=$?" >> "$out/evaluation.log"
cat "$out/evaluation.md"; tail -3 "$out/evaluation.log"
