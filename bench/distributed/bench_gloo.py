"""Times moba.distributed on gloo processes of one machine against the single-process op.

    python bench/distributed/bench_gloo.py --world 2 --tokens 16384 32768 [--json out.json]

Each rank runs with one thread per rank (the single-process op is timed with
``--world`` threads, the same cores). Reported per form and layout: the slowest
rank's median forward and forward+backward time, and the bytes each rank
received in the forward (the backward sends the same amounts the other way).
The measurements of docs/distributed.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

import torch


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(args: argparse.Namespace, tokens: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, args.heads_q, args.head_dim, generator=gen)
    k = torch.randn(tokens, args.heads_kv, args.head_dim, generator=gen)
    v = torch.randn(tokens, args.heads_kv, args.head_dim, generator=gen)
    return q, k, v


def _worker(rank: int, args: argparse.Namespace, port: int, results: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    import moba.distributed as md

    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    world = args.world
    for tokens in args.tokens:
        q, k, v = _inputs(args, tokens)
        for form, layout in (
            ("context", "contiguous"),
            ("context", "zigzag"),
            ("head", "contiguous"),
            ("head", "zigzag"),
        ):
            local = [md.shard(t, rank, world, args.block_size, layout) for t in (q, k, v)]
            stats: dict[str, int] = {}
            attn = md.context_parallel_attn if form == "context" else md.head_parallel_attn
            extra: dict[str, Any] = {"stats": stats} if form == "context" else {}

            def forward(
                grad: bool,
                local: list[torch.Tensor] = local,
                layout: str = layout,
                attn: Any = attn,
                extra: dict[str, Any] = extra,
            ) -> None:
                inputs = [t.detach().requires_grad_(grad) for t in local]
                dist.barrier()
                out = attn(*inputs, args.block_size, args.top_k, layout=layout, **extra)
                if grad:
                    out.backward(torch.ones_like(out))

            forward(True)  # warm-up
            fwd = _median_time(lambda forward=forward: forward(False), args.repeats)
            fwd_bwd = _median_time(lambda forward=forward: forward(True), args.repeats)
            if form == "head":
                # Two exchanges of (W-1)/W of q, k, v in, of out back.
                elems = (2 * args.heads_q + 2 * args.heads_kv) * args.head_dim
                received = local[0].shape[0] * elems * (world - 1) // world * 4
            else:
                received = stats["fetched_bytes"]
            results.put((tokens, form, layout, rank, fwd, fwd_bwd, received))
    dist.destroy_process_group()


def _single(args: argparse.Namespace, tokens: int) -> tuple[float, float]:
    import moba

    torch.set_num_threads(args.world)
    q, k, v = _inputs(args, tokens)
    cu = torch.tensor([0, tokens], dtype=torch.int32)

    def run(grad: bool) -> None:
        inputs = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        out = moba.moba_attn_varlen(*inputs, cu, tokens, args.block_size, args.top_k)
        if grad:
            out.backward(torch.ones_like(out))

    run(True)  # warm-up
    return _median_time(lambda: run(False), args.repeats), _median_time(
        lambda: run(True), args.repeats
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--heads-q", type=int, default=8)
    parser.add_argument("--heads-kv", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, args, port, results)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=1800) for _ in range(args.world * len(args.tokens) * 4)]
    for p in procs:
        p.join()

    report: list[dict[str, Any]] = []
    for tokens in args.tokens:
        fwd, fwd_bwd = _single(args, tokens)
        report.append({"tokens": tokens, "form": "single", "fwd_s": fwd, "fwd_bwd_s": fwd_bwd})
        print(
            f"{tokens:>6} single process ({args.world} threads): "
            f"{fwd:.3f} s fwd, {fwd_bwd:.3f} s fwd+bwd"
        )
        for form, layout in (
            ("context", "contiguous"),
            ("context", "zigzag"),
            ("head", "contiguous"),
            ("head", "zigzag"),
        ):
            mine = sorted(
                (r for r in rows if r[0] == tokens and r[1] == form and r[2] == layout),
                key=lambda r: r[3],
            )
            entry = {
                "tokens": tokens,
                "form": form,
                "layout": layout,
                "fwd_s": [r[4] for r in mine],
                "fwd_bwd_s": [r[5] for r in mine],
                "received_bytes": [r[6] for r in mine],
            }
            report.append(entry)
            print(
                f"{tokens:>6} {form:>7} {layout:>10}: slowest rank "
                f"{max(entry['fwd_s']):.3f} s fwd, "
                f"{max(entry['fwd_bwd_s']):.3f} s fwd+bwd; per-rank fwd "
                f"{[round(t, 3) for t in entry['fwd_s']]} s, received "
                f"{[round(b / 2**20, 1) for b in entry['received_bytes']]} MiB"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": report}, f, indent=1)


if __name__ == "__main__":
    main()
