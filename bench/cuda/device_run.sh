#!/usr/bin/env bash
# One device session for the CUDA forward: GPU facts, the CUDA test suite,
# compute-sanitizer (memcheck, racecheck) on a subset, the large-shape
# correctness check against torch, and the benchmark. Logs and JSON go to
# $OUT. Each step has its own time limit so the whole run fits one call.
#
#   bench/cuda/device_run.sh DIR [STEPS]
#     DIR    holds libmoba.so and test_cuda_forward (a -DBUILD_SHARED_LIBS=ON
#            -DMOBA_CUDA=ON build, copied flat)
#     STEPS  comma list of: tests,memcheck,racecheck,check,bench (default all)
#   BENCH_ARGS  extra arguments for bench_forward.py
set -uo pipefail
dir=$1
steps=${2:-tests,memcheck,racecheck,check,bench}
out=${OUT:-/tmp/moba-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$dir:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
test_bin="$dir/test_cuda_forward"
has() { [[ ",$steps," == *",$1,"* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"

if has tests; then
  echo "== tests"
  timeout 240 "$test_bin" --gtest_brief=1 >"$out/tests.log" 2>&1
  echo "tests rc=$?" | tee -a "$out/tests.log"
  grep -E "PASSED|FAILED|Failure|error|rc=" "$out/tests.log" | head -60
fi

sanitize_filter='Shapes/CudaSweep.MatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaSweep.MatchesReference/tiny_block_3_wide_top_k_fp16:Shapes/CudaSweep.MatchesReference/tiny_block_16_shared_fp16:Shapes/CudaSweep.MatchesReference/block_4096_chunked_bf16:CudaForward.ManyChunksGiveTheSameResult:CudaForward.InvalidDeviceCuSeqlensGiveNaN:CudaForward.DenseSwitchWithChunkedPrefill:CudaForward.StridedViewsMatchContiguous'
if has memcheck; then
  echo "== memcheck"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$test_bin" --gtest_brief=1 --gtest_filter="$sanitize_filter" >"$out/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$out/memcheck.log"
  grep -E "ERROR SUMMARY|PASSED|FAILED|Invalid|rc=" "$out/memcheck.log" | head -20
fi
if has racecheck; then
  echo "== racecheck"
  race_filter='Shapes/CudaSweep.MatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaSweep.MatchesReference/tiny_block_16_shared_fp16:CudaForward.ManyChunksGiveTheSameResult:CudaForward.DenseSwitchWithChunkedPrefill'
  timeout 150 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 "$test_bin" --gtest_brief=1 --gtest_filter="$race_filter" >"$out/racecheck.log" 2>&1
  echo "racecheck rc=$?" | tee -a "$out/racecheck.log"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED|hazard|rc=" "$out/racecheck.log" | head -20
fi
if has check; then
  echo "== check"
  timeout 150 python3 bench/cuda/bench_forward.py --lib "$dir/libmoba.so" --check 2>&1 | tee "$out/check.log"
fi
if has bench; then
  echo "== bench"
  # shellcheck disable=SC2086
  timeout 300 python3 bench/cuda/bench_forward.py --lib "$dir/libmoba.so" --out "$out/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
fi
