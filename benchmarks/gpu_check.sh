#!/usr/bin/env bash
# One-shot check on a machine with a GPU: the CUDA tests (pytest -m gpu), then the bench's GPU section
# (DP-SGD steps/s on the GPU vs the CPU, dp_step_ratio on the GPU), printing every number.
# Usage, from the repository root: bash benchmarks/gpu_check.sh   (PYTHON=... to use another interpreter)
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "| CUDA available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
PY
echo "== GPU tests (pytest -m gpu)"
"$PYTHON" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -rs
tests=$?
echo "== GPU bench section"
"$PYTHON" benchmarks/bench.py --only gpu
bench=$?
echo "== gpu_check: tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
