#!/usr/bin/env bash
# Builds moba and runs every test that needs no GPU:
#   1. the C++ test suite (GoogleTest via CTest) in a Release build, with the
#      CUDA backend compiled too when nvcc is present (its tests skip without a GPU);
#   2. the same suite under AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. the Python package (pip install .) and its pytest suite.
# Set MOBA_SKIP_SANITIZE=1 or MOBA_SKIP_PYTHON=1 to leave a stage out.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
PY=${PYTHON:-python3}

echo "== C++ tests (Release) =="
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$JOBS"
ctest --test-dir build --output-on-failure -j "$JOBS"

if [ "${MOBA_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== C++ tests (ASan + UBSan) =="
  cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOBA_CUDA=OFF \
    -DMOBA_SANITIZE=address,undefined
  cmake --build build-sanitize -j "$JOBS"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-sanitize --output-on-failure -j "$JOBS"
fi

if [ "${MOBA_SKIP_PYTHON:-0}" != 1 ]; then
  echo "== Python package =="
  # CPU-only extension: CI has no GPU, and stage 1 already compiled the CUDA backend.
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -Ccmake.define.MOBA_CUDA=OFF .
  "$PY" -m pytest -q tests/python
fi
