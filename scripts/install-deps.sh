#!/usr/bin/env bash
# Installs everything moba needs to build and test on a fresh Debian/Ubuntu
# machine: compilers and libraries from Debian's packages, Python packages
# from PyPI. Idempotent; run as root (or with sudo available).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(
  cmake ninja-build g++ pkg-config
  libgtest-dev libgmock-dev libbenchmark-dev   # tests and micro-benchmarks
  libcli11-dev nlohmann-json3-dev              # the command-line tool
  libopenblas-pthread-dev                      # products of the CPU backend
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "${MOBA_SKIP_PYTHON:-0}" != 1 ]; then
  PY=${PYTHON:-python3}
  "$PY" -m pip install -q --disable-pip-version-check \
    "torch>=2.4" "transformers>=5.0" numpy safetensors matplotlib \
    "nanobind>=2.0" "scikit-build-core>=0.10" pytest ruff
fi
