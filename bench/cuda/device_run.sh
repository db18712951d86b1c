#!/usr/bin/env bash
# One device session for the CUDA backend: GPU facts, the CUDA test suites
# (forward, backward, decode), compute-sanitizer (memcheck, racecheck) on a
# subset of each, the large-shape correctness check against torch, the Python
# package with its GPU tests, the backward A/B of the Hopper kernels, an
# Nsight Compute profile of the dense forward and the forward benchmark. Logs
# and JSON go to $OUT. Each step has its own time limit so a run fits one call.
#
#   bench/cuda/device_run.sh DIR [STEPS]
#     DIR    holds libmoba.so and test_cuda_{forward,backward,decode} (a
#            -DBUILD_SHARED_LIBS=ON -DMOBA_CUDA=ON build, copied flat)
#     STEPS  comma list of: tests,memcheck,racecheck,bwd_tests,bwd_memcheck,
#            bwd_racecheck,dec_tests,dec_memcheck,dec_racecheck,check,bench,
#            pkg,pytest,bwd_ab,ncu (default: tests to bench)
#   BENCH_ARGS    extra arguments for bench_forward.py
#   MOBA_BLAS_DIR for pkg, where the machine has no Debian libopenblas-pthread-dev:
#                 a folder with cblas.h and libopenblas.so.0 (the package links it)
#   SRC           for pkg, the source tree to build (default: this checkout)
#   PIP_TARGET    for pkg, install into this folder (put it on PYTHONPATH); pkg builds
#                 without isolation: scikit-build-core and nanobind must be importable
set -uo pipefail
dir=$1
steps=${2:-tests,memcheck,racecheck,bwd_tests,bwd_memcheck,bwd_racecheck,dec_tests,dec_memcheck,dec_racecheck,check,bench}
out=${OUT:-/tmp/moba-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$dir:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
test_bin="$dir/test_cuda_forward"
bwd_bin="$dir/test_cuda_backward"
dec_bin="$dir/test_cuda_decode"
has() { [[ ",$steps," == *",$1,"* ]]; }
# run_step NAME SECONDS PATTERN CMD...: CMD under a time limit, its output in
# $OUT/NAME.log; prints the exit status and the log's lines matching PATTERN.
run_step() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$out/$name.log"
  grep -E "$pattern" "$out/$name.log" | head -40
}
san=(compute-sanitizer --error-exitcode 9)
race=("${san[@]}" --tool racecheck --racecheck-report all)
mem=("${san[@]}" --tool memcheck)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"

# The sanitizer subsets: every kernel mode of each suite at small sizes
# (racecheck tracks every shared-memory access, so the smallest cases).
fwd_mem='CudaForward.CapturedInAGraph:CudaRouting.BlockCountsAroundTheUnitBoundaries:CudaForward.ManyChunksWithSmallBlocks:CudaForwardSm90.AgreesWithMmaSyncKernel:Shapes/CudaSweep.MatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaSweep.MatchesReference/tiny_block_3_wide_top_k_fp16:Shapes/CudaSweep.MatchesReference/tiny_block_16_shared_fp16:Shapes/CudaSweep.MatchesReference/block_4096_chunked_bf16:CudaForward.ManyChunksGiveTheSameResult:CudaForward.InvalidDeviceCuSeqlensGiveNaN:CudaForward.DenseSwitchWithChunkedPrefill:CudaForward.StridedViewsMatchContiguous'
fwd_race='CudaRouting.BlockCountsAroundTheUnitBoundaries:CudaRouting.GqaWithSmallBlocks:Shapes/CudaSweep.MatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaSweep.MatchesReference/tiny_block_16_shared_fp16:CudaForward.ManyChunksGiveTheSameResult:CudaForward.DenseSwitchWithChunkedPrefill'
# Backward: the Hopper kernels' 13-shape comparison (both kernel pairs), routed
# past/current dq, dense dq, key-major dK/dV with current rows and gathered
# entries, several row and key tiles, a partial key tile, GQA 16, many chunks,
# invalid input.
bwd_mem='CudaBackwardSm90.AgreesWithMmaSyncKernels:Shapes/CudaBackwardSweep.DeterministicMatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaBackwardSweep.FastMatchesReference/tiny_block_16_shared_fp16:Shapes/CudaBackwardSweep.DeterministicMatchesReference/dense_chunked_prefill_bf16:Shapes/CudaBackwardSweep.FastMatchesReference/gqa16_block_200_fp16_d64:Shapes/CudaBackwardSweep.DeterministicMatchesReference/chunked_prefill_long_fp16_d128:CudaBackward.ManyChunksMatchOneChunk:CudaBackward.InvalidDeviceCuSeqlensGiveNaN:CudaBackward.KeysNoQueryAttendsGetZero'
bwd_race='CudaBackwardSm90.ManyChunksMatchOneChunk:Shapes/CudaBackwardSweep.DeterministicMatchesReference/varlen_empty_tiny_bf16_d128_gqa4:Shapes/CudaBackwardSweep.FastMatchesReference/tiny_block_16_shared_fp16:Shapes/CudaBackwardSweep.DeterministicMatchesReference/dense_chunked_prefill_bf16:CudaBackward.InvalidDeviceCuSeqlensGiveNaN:CudaBackward.KeysNoQueryAttendsGetZero'
# Decode: invalid input, edge shapes and every forced split (chunk geometry,
# pages of every kind, dense, chunked prefill); each forced split is its own
# test, so a racecheck cut short still shows which cases passed (OK lines).
dec_mem='CudaDecodeInvalid.*:CudaDecode.EdgeShapes:Cases/CudaDecodeForcedSplits.*'
dec_race='Cases/CudaDecodeForcedSplits.*:CudaDecode.CapturedInAGraph'
tests_pat='PASSED|FAILED|Failure|error|Which is'
mem_pat='ERROR SUMMARY|PASSED|FAILED|Invalid|OK \]'
race_pat='RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED|hazard|OK \]'

has tests && run_step tests 240 "$tests_pat" "$test_bin" --gtest_brief=1
has memcheck && run_step memcheck 150 "$mem_pat" "${mem[@]}" "$test_bin" --gtest_brief=1 --gtest_filter="$fwd_mem"
has racecheck && run_step racecheck 150 "$race_pat" "${race[@]}" "$test_bin" --gtest_brief=1 --gtest_filter="$fwd_race"
has bwd_tests && run_step bwd_tests 240 "$tests_pat" "$bwd_bin" --gtest_brief=1
has bwd_memcheck && run_step bwd_memcheck 150 "$mem_pat" "${mem[@]}" "$bwd_bin" --gtest_brief=1 --gtest_filter="$bwd_mem"
has bwd_racecheck && run_step bwd_racecheck 150 "$race_pat" "${race[@]}" "$bwd_bin" --gtest_brief=1 --gtest_filter="$bwd_race"
has dec_tests && run_step dec_tests 240 "$tests_pat" "$dec_bin" --gtest_brief=1
has dec_memcheck && run_step dec_memcheck 200 "$mem_pat" "${mem[@]}" "$dec_bin" --gtest_filter="$dec_mem"
has dec_racecheck && run_step dec_racecheck "${DEC_RACE_S:-300}" "$race_pat" "${race[@]}" "$dec_bin" --gtest_filter="$dec_race"
if has check; then
  echo "== check"
  timeout 150 python3 bench/cuda/bench_forward.py --lib "$dir/libmoba.so" --check 2>&1 | tee "$out/check.log"
fi
if has bench; then
  echo "== bench"
  # shellcheck disable=SC2086
  timeout 300 python3 bench/cuda/bench_forward.py --lib "$dir/libmoba.so" --out "$out/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
fi
# The Python package (built here, CUDA for this GPU only) and its GPU tests.
if has pkg; then
  blas=()
  if [ -n "${MOBA_BLAS_DIR:-}" ]; then
    blas=(-Ccmake.define.MOBA_CBLAS_INCLUDE_DIR="$MOBA_BLAS_DIR" -Ccmake.define.MOBA_BLAS_LIBRARY="$MOBA_BLAS_DIR/libopenblas.so.0")
  fi
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  [ "$arch" = 90 ] && arch=90a
  run_step pkg 600 "rror" python3 -m pip install -q --no-deps --no-build-isolation ${PIP_TARGET:+--target "$PIP_TARGET"} \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" "${blas[@]}" -Cbuild-dir=/tmp/moba-skbuild "${SRC:-.}"
fi
has pytest && run_step pytest 300 "passed|failed|rror" python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_decode.py tests/python/test_cuda.py
# The Hopper backward kernels against the mma.sync ones, same process settings
# otherwise: MOBA_CUDA_SM90_BWD=0 forbids them, =1 forces them. Through the C
# API of $dir/libmoba.so, so it needs no package build.
if has bwd_ab; then
  for v in 0 1; do
    MOBA_CUDA_SM90_BWD=$v run_step "bwd_ab_$v" 120 "moba_fast|rror" python3 bench/cuda/bench_backward.py \
      --lib "$dir/libmoba.so" --configs P --tokens 131072,262144 --methods moba_fast --max-reps 3 \
      --out "$out/bwd_ab_$v.json"
  done
fi
# Nsight Compute on one dense forward launch (the Hopper kernel at 32K):
# tensor-pipe use, stalls, shared-memory traffic; details page and SASS.
if has ncu; then
  run_step ncu 150 "==PROF==|rror" ncu --clock-control none --set full --import-source no -k regex:attention_sm90 --launch-skip 1 --launch-count 1 \
    -f -o /tmp/moba-dense32k python3 bench/cuda/one_forward.py --lib "$dir/libmoba.so" --config dense_switch --tokens 32768
  if [ -f /tmp/moba-dense32k.ncu-rep ]; then
    ncu --import /tmp/moba-dense32k.ncu-rep --page details >"$out/ncu_details.txt" 2>&1
    ncu --import /tmp/moba-dense32k.ncu-rep --page source --print-source sass --csv 2>&1 | xz -1 >"$out/ncu_sass.csv.xz"
  fi
fi
