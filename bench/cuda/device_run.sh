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
if has dec_tests; then
  echo "== decode tests"
  timeout 240 "$dec_bin" --gtest_brief=1 >"$out/dec_tests.log" 2>&1
  echo "dec_tests rc=$?" | tee -a "$out/dec_tests.log"
  grep -E "PASSED|FAILED|Failure|error|rc=" "$out/dec_tests.log" | head -40
fi
# Invalid input, edge shapes and every forced split (chunk geometry, pages of
# every kind, dense, chunked prefill); racecheck is slow on the forced splits,
# so each case is its own test and prints its own OK line.
dec_filter='CudaDecodeInvalid.*:CudaDecode.EdgeShapes:Cases/CudaDecodeForcedSplits.*'
if has dec_memcheck; then
  echo "== decode memcheck"
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 "$dec_bin" --gtest_filter="$dec_filter" >"$out/dec_memcheck.log" 2>&1
  echo "dec_memcheck rc=$?" | tee -a "$out/dec_memcheck.log"
  grep -E "ERROR SUMMARY|OK \]|FAILED|Invalid|rc=" "$out/dec_memcheck.log" | head -30
fi
if has dec_racecheck; then
  echo "== decode racecheck"
  timeout "${DEC_RACE_S:-300}" compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 "$dec_bin" --gtest_filter='Cases/CudaDecodeForcedSplits.*:CudaDecode.CapturedInAGraph' >"$out/dec_racecheck.log" 2>&1
  echo "dec_racecheck rc=$?" | tee -a "$out/dec_racecheck.log"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|OK \]|FAILED|hazard|rc=" "$out/dec_racecheck.log" | head -30
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
# The Python package (built here, CUDA for this GPU only) and its GPU tests.
if has pkg; then
  echo "== pkg"
  blas=()
  if [ -n "${MOBA_BLAS_DIR:-}" ]; then
    blas=(-Ccmake.define.MOBA_CBLAS_INCLUDE_DIR="$MOBA_BLAS_DIR" -Ccmake.define.MOBA_BLAS_LIBRARY="$MOBA_BLAS_DIR/libopenblas.so.0")
  fi
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  [ "$arch" = 90 ] && arch=90a
  timeout 600 python3 -m pip install -q --no-deps --no-build-isolation ${PIP_TARGET:+--target "$PIP_TARGET"} \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" "${blas[@]}" -Cbuild-dir=/tmp/moba-skbuild "${SRC:-.}" >"$out/pkg.log" 2>&1
  echo "pkg rc=$?" | tee -a "$out/pkg.log"
  tail -5 "$out/pkg.log"
fi
if has pytest; then
  echo "== pytest"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_decode.py tests/python/test_cuda.py >"$out/pytest.log" 2>&1
  echo "pytest rc=$?" | tee -a "$out/pytest.log"
  tail -5 "$out/pytest.log"
fi
# The Hopper backward kernels against the mma.sync ones, same process settings
# otherwise: MOBA_CUDA_SM90_BWD=0 forbids them, =1 forces them.
if has bwd_ab; then
  for v in 0 1; do
    echo "== bwd_ab MOBA_CUDA_SM90_BWD=$v"
    MOBA_CUDA_SM90_BWD=$v timeout 120 python3 bench/cuda/bench_backward.py --configs P --tokens 131072,262144 \
      --methods moba_fast --max-reps 3 --out "$out/bwd_ab_$v.json" 2>&1 | tee "$out/bwd_ab_$v.log" | grep -E "moba_fast|rror"
  done
fi
# Nsight Compute on one dense forward launch (the Hopper kernel at 32K):
# tensor-pipe use, stalls, shared-memory traffic; details page and SASS.
if has ncu; then
  echo "== ncu"
  timeout 150 ncu --clock-control none --set full --import-source no -k regex:attention_sm90 --launch-skip 1 --launch-count 1 \
    -f -o /tmp/moba-dense32k python3 bench/cuda/one_forward.py --lib "$dir/libmoba.so" --config dense_switch --tokens 32768 >"$out/ncu.log" 2>&1
  echo "ncu rc=$?" | tee -a "$out/ncu.log"
  if [ -f /tmp/moba-dense32k.ncu-rep ]; then
    ncu --import /tmp/moba-dense32k.ncu-rep --page details >"$out/ncu_details.txt" 2>&1
    ncu --import /tmp/moba-dense32k.ncu-rep --page source --print-source sass --csv 2>&1 | xz -1 >"$out/ncu_sass.csv.xz"
  fi
fi
