#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes on one H200: the kernel tests at
# GPU shapes in bf16 (the interpreter cannot catch out-of-bounds accesses, races or tiles a GPU
# rejects), the kernel benchmarks at full sizes, and the loss-memory benchmark.
#   bash benchmarks/gpu_suite.sh OUT_DIR        (PYTHON=... to pick the interpreter)
# Writes 8 files into OUT_DIR: gpu.txt, tests.log, kernels.log, results.{json,md,png},
# memory_ce.log, memory_ce_cuda.json. Exits non-zero if any part failed.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" || status=1
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"
timeout 240 "$python" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels_attention_triton.py \
  tests/test_kernels_norms_triton.py tests/test_kernels_cross_entropy_triton.py tests/test_kernels_rope_swiglu_triton.py \
  > "$out/tests.log" 2>&1 || status=1
tail -n 3 "$out/tests.log"
timeout 240 "$python" benchmarks/kernels.py --out "$out" > "$out/kernels.log" 2>&1 || status=1
timeout 120 "$python" benchmarks/memory_ce.py --out "$out" > "$out/memory_ce.log" 2>&1 || status=1
cat "$out/gpu.txt" "$out/results.md" "$out/memory_ce.log" 2>/dev/null
exit $status
