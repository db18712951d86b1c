#!/usr/bin/env bash
# One device session for the CUDA backend: GPU facts, the CUDA test suites
# (forward and backward), compute-sanitizer (memcheck, racecheck) on a subset
# of each, the large-shape correctness check against torch, and the benchmark. Logs and JSON go to
# $OUT. Each step has its own time limit so the whole run fits one call.
#
#   bench/cuda/device_run.sh DIR [STEPS]
#     DIR    holds libmoba.so, test_cuda_forward and test_cuda_backward (a
#            -DBUILD_SHARED_LIBS=ON -DMOBA_CUDA=ON build, copied flat)
#     STEPS  comma list of: tests,memcheck,racecheck,bwd_tests,bwd_memcheck,
#            bwd_racecheck,check,bench (default all)
#   BENCH_ARGS  extra arguments for bench_forward.py
set -uo pipefail
dir=$1
steps=${2:-tests,memcheck,racecheck,bwd_tests,bwd_memcheck,bwd_racecheck,check,bench}
out=${OUT:-/tmp/moba-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$dir:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
test_bin="$dir/test_cuda_forward"
bwd_bin="$dir/test_cuda_backward"
has() { [[ ",$steps," == *",$1,"* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"

if has tests; then
  echo "== tests"
  timeout 240 "$test_bin" --gtest_brief=1 >"$out/tests.log" 2>&1
  echo "tests rc=$?" | tee -a "$out/tests.log"
  grep -E "PASSED|FAILED|Failure|error|rc=" "$out/tests.log" | head -60
fi

sanitize_filter='CudaRouting.BlockCountsAroundTheUnitBoundaries:CudaForward.ManyChunksWithSmallBlocks:CudaForwardSm90.AgreesWithMmaSyncKernel:Shapes/CudaSweep.MatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaSweep.MatchesReference/tiny_block_3_wide_top_k_fp16:Shapes/CudaSweep.MatchesReference/tiny_block_16_shared_fp16:Shapes/CudaSweep.MatchesReference/block_4096_chunked_bf16:CudaForward.ManyChunksGiveTheSameResult:CudaForward.InvalidDeviceCuSeqlensGiveNaN:CudaForward.DenseSwitchWithChunkedPrefill:CudaForward.StridedViewsMatchContiguous'
if has memcheck; then
  echo "== memcheck"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$test_bin" --gtest_brief=1 --gtest_filter="$sanitize_filter" >"$out/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$out/memcheck.log"
  grep -E "ERROR SUMMARY|PASSED|FAILED|Invalid|rc=" "$out/memcheck.log" | head -20
fi
if has racecheck; then
  echo "== racecheck"
  race_filter='CudaRouting.BlockCountsAroundTheUnitBoundaries:CudaRouting.GqaWithSmallBlocks:Shapes/CudaSweep.MatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaSweep.MatchesReference/tiny_block_16_shared_fp16:CudaForward.ManyChunksGiveTheSameResult:CudaForward.DenseSwitchWithChunkedPrefill'
  timeout 150 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 "$test_bin" --gtest_brief=1 --gtest_filter="$race_filter" >"$out/racecheck.log" 2>&1
  echo "racecheck rc=$?" | tee -a "$out/racecheck.log"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED|hazard|rc=" "$out/racecheck.log" | head -20
fi
if has bwd_tests; then
  echo "== backward tests"
  timeout 240 "$bwd_bin" --gtest_brief=1 >"$out/bwd_tests.log" 2>&1
  echo "bwd_tests rc=$?" | tee -a "$out/bwd_tests.log"
  grep -E "PASSED|FAILED|Failure|error|Which is|rc=" "$out/bwd_tests.log" | head -60
fi
# The backward's sanitizer subset: every kernel mode (the Hopper kernels' 13-shape
# comparison, which runs both kernel pairs; routed past/current dq,
# dense dq, key-major dK/dV with current rows and gathered entries, several
# row and key tiles, a partial key tile, GQA 16), many chunks, invalid input.
bwd_filter='CudaBackwardSm90.AgreesWithMmaSyncKernels:Shapes/CudaBackwardSweep.DeterministicMatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaBackwardSweep.FastMatchesReference/tiny_block_16_shared_fp16:Shapes/CudaBackwardSweep.DeterministicMatchesReference/dense_chunked_prefill_bf16:Shapes/CudaBackwardSweep.FastMatchesReference/gqa16_block_200_fp16_d64:Shapes/CudaBackwardSweep.DeterministicMatchesReference/chunked_prefill_long_fp16_d128:CudaBackward.ManyChunksMatchOneChunk:CudaBackward.InvalidDeviceCuSeqlensGiveNaN:CudaBackward.KeysNoQueryAttendsGetZero'
if has bwd_memcheck; then
  echo "== backward memcheck"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$bwd_bin" --gtest_brief=1 --gtest_filter="$bwd_filter" >"$out/bwd_memcheck.log" 2>&1
  echo "bwd_memcheck rc=$?" | tee -a "$out/bwd_memcheck.log"
  grep -E "ERROR SUMMARY|PASSED|FAILED|Invalid|rc=" "$out/bwd_memcheck.log" | head -20
fi
if has bwd_racecheck; then
  echo "== backward racecheck"
  # Racecheck tracks every shared-memory access of the tensor-core kernels:
  # the small cases only (they still cover every kernel and both modes).
  bwd_race_filter='CudaBackwardSm90.ManyChunksMatchOneChunk:Shapes/CudaBackwardSweep.DeterministicMatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaBackwardSweep.FastMatchesReference/tiny_block_16_shared_fp16:Shapes/CudaBackwardSweep.DeterministicMatchesReference/dense_chunked_prefill_bf16:CudaBackward.InvalidDeviceCuSeqlensGiveNaN:CudaBackward.KeysNoQueryAttendsGetZero'
  timeout 150 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 "$bwd_bin" --gtest_brief=1 --gtest_filter="$bwd_race_filter" >"$out/bwd_racecheck.log" 2>&1
  echo "bwd_racecheck rc=$?" | tee -a "$out/bwd_racecheck.log"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED|hazard|rc=" "$out/bwd_racecheck.log" | head -20
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
