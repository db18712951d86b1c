"""Times moba.distributed on gloo processes of one machine against the single-process op.

    python bench/distributed/bench_gloo.py --world 2 --tokens 16384 32768 [--json out.json]

Each rank runs with one thread per rank (the single-process op is timed with
``--world`` threads, the same cores). Reported per form, layout and number of
pipelined stages (``overlap_stages`` of context_parallel_attn; 1 = no overlap): the
slowest rank's median forward and forward+backward time, the bytes each rank
received in the forward (the backward sends the same amounts the other way), and
each rank's attended (query, key) pairs summed over heads, counted from the routing:
the work of its attention. The measurements of docs/distributed.md come from this script.
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
        runs: list[tuple[tuple[str, str, int], Any, int, int]] = []
        for form, layout, stages in _configs(args):
            local = [md.shard(t, rank, world, args.block_size, layout) for t in (q, k, v)]
            stats: dict[str, int] = {}
            attn = md.context_parallel_attn if form == "context" else md.head_parallel_attn
            extra: dict[str, Any] = {"overlap_stages": stages}
            if form == "context":
                extra["stats"] = stats

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
            if form == "head":
                # Two exchanges of (W-1)/W of q, k, v in, of out back.
                elems = (2 * args.heads_q + 2 * args.heads_kv) * args.head_dim
                received = local[0].shape[0] * elems * (world - 1) // world * 4
            else:
                received = stats["fetched_bytes"]
            pairs = _attended_pairs(md, local, tokens, rank, world, layout, args)
            runs.append(((form, layout, stages), forward, received, pairs))
        # Interleaved (one repeat of every configuration after another), so that a change
        # of the machine's load hits all of them alike.
        times: list[list[tuple[float, float]]] = [[] for _ in runs]
        for _ in range(args.repeats):
            for i, (_, forward, _, _) in enumerate(runs):
                fwd = _median_time(lambda forward=forward: forward(False), 1)
                fwd_bwd = _median_time(lambda forward=forward: forward(True), 1)
                times[i].append((fwd, fwd_bwd))
        pick = min if args.statistic == "min" else statistics.median
        for (config, _, received, pairs), measured in zip(runs, times, strict=True):
            fwd = pick(t[0] for t in measured)
            fwd_bwd = pick(t[1] for t in measured)
            results.put((tokens, *config, rank, fwd, fwd_bwd, received, pairs))
    dist.destroy_process_group()


def _configs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(form, layout, overlap stages) measured: stages 1 and --stages where they apply."""
    configs: list[tuple[str, str, int]] = []
    for form in args.forms:
        for layout in args.layouts:
            configs.append((form, layout, 1))
            per_rank = args.heads_kv // args.world
            if args.stages > 1 and (form == "context" or per_rank % args.stages == 0):
                configs.append((form, layout, args.stages))
    return configs


def _attended_pairs(
    md: Any,
    local: list[torch.Tensor],
    tokens: int,
    rank: int,
    world: int,
    layout: str,
    args: argparse.Namespace,
) -> int:
    """(query, key) pairs this rank's queries attend to, summed over heads: every selected
    past block counts block_size keys, the current block the keys up to the query."""
    selected = md.context_parallel_routing(
        local[0], local[1], args.block_size, args.top_k, seqlen=tokens, layout=layout
    ).long()  # [n_r, Hq, W]
    position = md.shard(torch.arange(tokens), rank, world, args.block_size, layout)
    current = (position // args.block_size)[:, None, None]
    keys = torch.where(
        selected == current,
        (position % args.block_size + 1)[:, None, None],
        torch.full_like(selected, args.block_size),
    )
    return int(keys[selected >= 0].sum())


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
    parser.add_argument("--forms", nargs="+", default=["context", "head"])
    parser.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag"])
    parser.add_argument("--stages", type=int, default=2, help="overlap stages to compare with 1")
    parser.add_argument("--no-single", dest="single", action="store_false")
    parser.add_argument(
        "--statistic",
        choices=("median", "min"),
        default="median",
        help="of the interleaved repeats; min is robust to other load on a shared machine",
    )
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
    rows = [
        results.get(timeout=1800)
        for _ in range(args.world * len(args.tokens) * len(_configs(args)))
    ]
    for p in procs:
        p.join()

    report: list[dict[str, Any]] = []
    for tokens in args.tokens:
        if args.single:
            fwd, fwd_bwd = _single(args, tokens)
            report.append({"tokens": tokens, "form": "single", "fwd_s": fwd, "fwd_bwd_s": fwd_bwd})
            print(
                f"{tokens:>6} single process ({args.world} threads): "
                f"{fwd:.3f} s fwd, {fwd_bwd:.3f} s fwd+bwd"
            )
        for form, layout, stages in _configs(args):
            mine = sorted(
                (r for r in rows if r[:4] == (tokens, form, layout, stages)), key=lambda r: r[4]
            )
            entry = {
                "tokens": tokens,
                "form": form,
                "layout": layout,
                "overlap_stages": stages,
                "fwd_s": [r[5] for r in mine],
                "fwd_bwd_s": [r[6] for r in mine],
                "received_bytes": [r[7] for r in mine],
                "attended_pairs": [r[8] for r in mine],
            }
            report.append(entry)
            print(
                f"{tokens:>6} {form:>7} {layout:>10} stages {stages}: slowest rank "
                f"{max(entry['fwd_s']):.3f} s fwd, "
                f"{max(entry['fwd_bwd_s']):.3f} s fwd+bwd; per-rank fwd "
                f"{[round(t, 3) for t in entry['fwd_s']]} s, received "
                f"{[round(b / 2**20, 1) for b in entry['received_bytes']]} MiB, attended pairs "
                f"{[round(p / 1e9, 3) for p in entry['attended_pairs']]} G"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": report}, f, indent=1)


if __name__ == "__main__":
    main()
