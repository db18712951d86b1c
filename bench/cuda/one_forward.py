#!/usr/bin/env python3
"""Runs one MoBA forward twice (a warm-up, then the call to profile), for Nsight Compute.

  ncu --set full -k regex:attention_sm90 --launch-skip 1 --launch-count 1 -o dense32k \\
      python3 bench/cuda/one_forward.py --lib DIR/libmoba.so --config dense_switch --tokens 32768

The shapes are bench_forward.py's configs (bf16, random data); ``dense_switch`` is config P
with top-k covering every block, so the dense kernel runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import CONFIGS, Moba, forward_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lib", required=True, help="libmoba.so built with -DMOBA_CUDA=ON")
    ap.add_argument("--config", default="dense_switch", help="a bench_forward config")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per sequence")
    args = ap.parse_args()
    if args.config not in CONFIGS and args.config != "dense_switch":
        ap.error(f"--config: expected one of {[*CONFIGS, 'dense_switch']}")
    call = forward_call(Moba(args.lib), args.config, args.tokens)
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    print(f"ran {args.config} at {args.tokens} tokens twice")


if __name__ == "__main__":
    main()
