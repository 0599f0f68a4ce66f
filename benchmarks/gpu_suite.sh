#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 6 minutes on one H200, on the GPU image as it
# is (its python3, torch 2.11, triton 3.6; nothing downloadable). Stages and their time limits:
#   1 gpu.txt          device, driver, versions                                   (10 s)
#   2 tests.log        kernel tests at GPU shapes in bf16 (compiled, not interpreted) (100 s)
#   3 sanitizer.log    one small call of every kernel under compute-sanitizer memcheck and
#                      racecheck, if the machine has it                             (2 x 40 s)
#   4 kernels.log, results.{jsonl,json,md,png}   kernel benchmarks at full sizes   (80 s)
#   5 mfu.log, scaling_gpu_llama-1b.json         1B Llama training step, bf16, 3 warm-up + 20
#                      timed steps, tokens/s and MFU (benchmarks/scaling.py --mfu)   (70 s)
# Limits add up to 340 s; each stage writes its files and a line of summary.txt when it ends, so
# a suite cut short keeps what finished. Pure-Python wheels the image lacks (webdataset, ...) go
# in .whl/ at the repository root and are installed into /tmp/site first.
#   bash benchmarks/gpu_suite.sh OUT_DIR        (PYTHON=... to pick the interpreter)
# Exits non-zero if any stage failed.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$out/triton_cache"
status=0
: > "$out/summary.txt"

stage() {  # stage NAME SECONDS LOG COMMAND...: run with a time limit, log, one summary line
  local name=$1 limit=$2 log=$3 start=$SECONDS rc
  shift 3
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

stage gpu 10 "$out/gpu.txt" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  '$python' -c \"import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)\""
stage tests 100 "$out/tests.log" "$python" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
  tests/test_kernels_attention_triton.py tests/test_kernels_norms_triton.py tests/test_kernels_cross_entropy_triton.py \
  tests/test_kernels_rope_swiglu_triton.py
tail -n 2 "$out/tests.log"
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ]; then
  # The caching allocator hides out-of-bounds reads inside its pool from memcheck: turn it off.
  stage memcheck 40 "$out/sanitizer_memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
    --error-exitcode 1 "$python" benchmarks/kernels.py --once
  stage racecheck 40 "$out/sanitizer_racecheck.log" "$sanitizer" --tool racecheck --error-exitcode 1 \
    "$python" benchmarks/kernels.py --once
else
  echo "sanitizer: skipped, no compute-sanitizer on this machine" | tee -a "$out/summary.txt"
fi
stage kernels 80 "$out/kernels.log" "$python" benchmarks/kernels.py --out "$out"
stage mfu 70 "$out/mfu.log" "$python" benchmarks/scaling.py --model llama-1b --mfu --warmup 3 --steps 20 --out "$out"
cat "$out/summary.txt" "$out/gpu.txt" "$out/results.md" 2>/dev/null
tail -n 8 "$out/mfu.log"
exit $status
