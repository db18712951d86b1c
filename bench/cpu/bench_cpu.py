"""CPU benchmark: MoBA's fast CPU backend against PyTorch's dense causal
``scaled_dot_product_attention`` on the same cores, side by side in one run.

Config (../shared/BENCHMARKS.md, section CPU): 32K tokens, 8 query heads, 2 kv
heads, head dim 128, block 512, top-k 3, float32 and bfloat16; forward and
forward + backward. Writes one JSON object per (dtype, pass, method) to
bench/results/ and prints a Markdown table (also: ``--markdown FILE.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import moba

ROOT = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def median_seconds(fn: Callable[[], None], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def attended_pairs(selected: torch.Tensor, cu: torch.Tensor, block: int) -> int:
    """(query, head, key) triples MoBA attends to, from the routing."""
    total = 0
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        sel = selected[s:e].long()  # [L, H, W]
        pos = torch.arange(e - s).view(-1, 1, 1)
        begin = sel * block
        end = torch.minimum(begin + block, pos + 1)  # current block causally; past blocks are full
        total += int(((end - begin).clamp(min=0) * (sel >= 0)).sum())
    return total


def bench_dtype(
    args: argparse.Namespace, dtype_name: str, common: dict[str, Any]
) -> list[dict[str, Any]]:
    """Times MoBA and dense SDPA, forward and forward + backward, in one dtype."""
    L, hq, hkv, d = args.tokens, args.heads_q, args.heads_kv, args.head_dim
    cu = torch.tensor([0, L], dtype=torch.int32)
    dense_flops_fwd = 4.0 * hq * d * L * (L + 1) / 2  # causal: QK^T and PV, lower triangle
    results: list[dict[str, Any]] = []
    dtype = getattr(torch, dtype_name)
    q = torch.randn(L, hq, d, dtype=dtype)
    k = torch.randn(L, hkv, d, dtype=dtype)
    v = torch.randn(L, hkv, d, dtype=dtype)
    sel = moba.routing(q, k, cu, L, args.block_size, args.top_k)
    moba_flops_fwd = 4.0 * d * attended_pairs(sel, cu, args.block_size)

    def moba_fwd() -> None:
        moba.moba_attn_varlen(q, k, v, cu, L, args.block_size, args.top_k, backend="cpu")

    qd, kd, vd = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, L, D] views

    def dense_fwd() -> None:
        F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    passes: list[tuple[str, Callable[[], None], Callable[[], None], float]] = [
        ("forward", moba_fwd, dense_fwd, 1.0)
    ]
    if not args.no_backward:
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        dout = torch.randn_like(q)

        def moba_fwd_bwd() -> None:
            out = moba.moba_attn_varlen(
                qg, kg, vg, cu, L, args.block_size, args.top_k, backend="cpu"
            )
            out.backward(dout)

        qdg, kdg, vdg = (
            x.detach().transpose(0, 1).unsqueeze(0).requires_grad_(True) for x in (q, k, v)
        )
        doutd = dout.transpose(0, 1).unsqueeze(0)

        def dense_fwd_bwd() -> None:
            out = F.scaled_dot_product_attention(qdg, kdg, vdg, is_causal=True, enable_gqa=True)
            out.backward(doutd)

        passes.append(
            ("forward+backward", moba_fwd_bwd, dense_fwd_bwd, 3.5)
        )  # bwd ~2.5x the fwd products

    for pass_name, moba_fn, dense_fn, flop_factor in passes:
        moba_fn()  # warm-up: thread pools, page faults
        t_moba, all_moba = median_seconds(moba_fn, args.repeats)
        t_dense, all_dense = median_seconds(dense_fn, args.dense_repeats)
        for method, t, runs, flops in (
            ("moba-cpu", t_moba, all_moba, moba_flops_fwd * flop_factor),
            ("torch-sdpa-dense", t_dense, all_dense, dense_flops_fwd * flop_factor),
        ):
            results.append(
                {
                    **common,
                    "dtype": dtype_name,
                    "pass": pass_name,
                    "method": method,
                    "median_ms": t * 1e3,
                    "runs_ms": [x * 1e3 for x in runs],
                    "tflops": flops / t / 1e12,
                    "speedup_vs_dense": t_dense / t,
                    "sparsity": 1.0 - moba_flops_fwd / dense_flops_fwd,
                }
            )
        print(
            f"{dtype_name:9s} {pass_name:17s} moba {t_moba * 1e3:9.1f} ms"
            f"  dense {t_dense * 1e3:9.1f} ms  speedup {t_dense / t_moba:5.1f}x",
            file=sys.stderr,
            flush=True,
        )

    return results


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads-q", type=int, default=8)
    ap.add_argument("--heads-kv", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of MoBA (median reported)")
    ap.add_argument("--dense-repeats", type=int, default=1, help="timed runs of dense SDPA (slow)")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON file (default bench/results/cpu-<date>.json)"
    )
    ap.add_argument(
        "--markdown", type=Path, default=None, help="only print the table of an existing JSON file"
    )
    args = ap.parse_args()

    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, hq, hkv, d = args.tokens, args.heads_q, args.heads_kv, args.head_dim
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {
        "config": "cpu",
        "tokens": L,
        "heads_q": hq,
        "heads_kv": hkv,
        "head_dim": d,
        "block_size": args.block_size,
        "top_k": args.top_k,
        "threads": args.threads,
        "device": cpu_name(),
        "torch": torch.__version__,
        "moba": moba.__version__,
        "date": date,
        "git_commit": git_commit(),
    }
    results: list[dict[str, Any]] = []
    for dtype_name in args.dtypes.split(","):
        results += bench_dtype(args, dtype_name, common)

    out = args.out or ROOT / "bench" / "results" / f"cpu-{date[:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| dtype | pass | MoBA cpu (ms) | dense SDPA (ms) | speedup | MoBA TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        by_key.setdefault((r["dtype"], r["pass"]), {})[r["method"]] = r
    for (dtype, pass_name), m in by_key.items():
        mo, de = m["moba-cpu"], m["torch-sdpa-dense"]
        rows.append(
            f"| {dtype} | {pass_name} | {mo['median_ms']:,.0f} | {de['median_ms']:,.0f} | "
            f"**{mo['speedup_vs_dense']:.1f}x** | {mo['tflops']:.3f} |"
        )
    first = results[0]
    rows.append(
        f"\n{first['tokens']} tokens, {first['heads_q']} q / {first['heads_kv']} kv heads, "
        f"D={first['head_dim']}, block {first['block_size']}, top-k {first['top_k']}; "
        f"{first['threads']} threads on {first['device']}; torch {first['torch']}; "
        f"commit {first['git_commit']}, {first['date'][:10]}."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
