#!/usr/bin/env python3
"""MoBA decode from a KV cache on CUDA against dense decode (shared/BENCHMARKS.md).

Config P's shape (32 query heads, 8 kv heads, D 128, block 4096, top-k 12,
bf16) at 1M context: batch 1, and batch 8 with mixed lengths (1M down to
256K). One query per sequence. Uses the Python package (``import moba``): a
paged ``moba.KVCache`` on the GPU whose pages of each sequence are one
consecutive run of the pool, so the dense peers read the same K/V memory
through plain views (no copy).

Every method is timed twice (medians of CUDA-event timings): eager (one
Python call per step, back to back) and captured in a CUDA graph
(torch.cuda.CUDAGraph, captured after a warm-up on a side stream, replays
timed), as serving engines run decode steps; the graph numbers have no
Python or launch overhead. The "vs best dense" ratios (the target: MoBA
<= 1/8 of dense) use the graph numbers where both sides have them, else
the eager ones; the summary says which.

Methods, all in this process:
  moba          KVCache.decode, per-head routing (each kv group reads the
                union of its heads' selected blocks)
  moba_shared   KVCache.decode with gqa_shared_routing (one selection per group)
  sdpa_flash / sdpa_cudnn / sdpa_efficient
                torch.nn.functional.scaled_dot_product_attention with one query
                per sequence over all its cached keys (is_causal=False: the
                query is the last position), forced to FLASH_ATTENTION /
                CUDNN_ATTENTION / EFFICIENT_ATTENTION, GQA native
                (enable_gqa=True) where the backend takes it. A mixed-length
                batch runs one call per sequence (no varlen SDPA entry point).

Bandwidth: MoBA on the bytes it must read (moba.KVCache.bytes_read: the
selected blocks of every kv group, each once), dense on all cached K and V
(Hkv heads). Peak of the H100 SXM: ~3.35 TB/s.

  python3 bench/cuda/bench_decode.py --out $OUT/decode.json
  python3 bench/cuda/bench_decode.py --check     # MoBA decode vs the op path at 1M
  python3 bench/cuda/bench_decode.py --profile   # kernels of one MoBA decode step (batch 1)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import moba

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import git_commit

HEADS_Q, HEADS_KV, DIM, BLOCK, TOP_K = 32, 8, 128, 4096, 12
PAGE = 256
DTYPE = torch.bfloat16
PEAK_TBPS = 3.35  # H100 SXM HBM3


def time_ms(fn: Callable[[], object], inner: int = 10, reps: int = 15) -> float:
    """Median over `reps` CUDA-event timings of `inner` back-to-back calls,
    per call (after a warm-up), so launch gaps of one call do not count."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def time_graph_ms(fn: Callable[[], object], inner: int = 10, reps: int = 15) -> float:
    """`fn` captured once in a CUDA graph (after a warm-up on a side stream,
    as torch.cuda.graphs asks), then the median over `reps` CUDA-event
    timings of `inner` back-to-back replays, per replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return statistics.median(times)


def time_both(
    fn: Callable[[], object], inner: int = 10, reps: int = 15
) -> tuple[float, float | None, str]:
    """(eager ms, graph ms or None, why the graph failed or "")."""
    eager = time_ms(fn, inner, reps)
    try:
        return eager, time_graph_ms(fn, inner, reps), ""
    except (RuntimeError, torch.OutOfMemoryError) as e:
        torch.cuda.synchronize()
        return eager, None, f"graph capture failed: {str(e).splitlines()[0][:120]}"


def build_cache(lens: list[int], seed: int) -> tuple[moba.KVCache, list[int]]:
    """A paged cache holding `lens` random tokens per sequence; sequence b's
    pages are pool[first[b] : first[b] + pages(b)], so its keys are one view."""
    dev = torch.device("cuda")
    pages = [-(-n // PAGE) for n in lens]
    first = [sum(pages[:b]) for b in range(len(lens))]
    max_pages = max(pages)
    table = torch.full((len(lens), max_pages), -1, dtype=torch.int32)
    for b, (f, n) in enumerate(zip(first, pages, strict=True)):
        table[b, :n] = torch.arange(f, f + n, dtype=torch.int32)
    cache = moba.KVCache(
        len(lens),
        max_pages * PAGE,
        HEADS_KV,
        DIM,
        BLOCK,
        dtype=DTYPE,
        page_size=PAGE,
        num_pages=sum(pages),
        page_table=table.to(dev),
        device=dev,
    )
    gen = torch.Generator(device=dev).manual_seed(seed)
    for b, n in enumerate(lens):  # one sequence at a time: bounded temporaries
        counts = [0] * len(lens)
        counts[b] = n
        for at in range(0, n, 1 << 18):
            m = min(1 << 18, n - at)
            counts[b] = m
            k = torch.randn(m, HEADS_KV, DIM, device=dev, generator=gen).to(DTYPE)
            v = torch.randn(m, HEADS_KV, DIM, device=dev, generator=gen).to(DTYPE)
            cache.append(k, v, counts)
            del k, v
    torch.cuda.synchronize()
    return cache, first


def sequence_kv(
    cache: moba.KVCache, first: list[int], lens: list[int], b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, Hkv, L, D] views of sequence b's keys and values (no copy)."""
    n_pages = -(-lens[b] // PAGE)
    k = cache.k[first[b] : first[b] + n_pages].reshape(-1, HEADS_KV, DIM)[: lens[b]]
    v = cache.v[first[b] : first[b] + n_pages].reshape(-1, HEADS_KV, DIM)[: lens[b]]
    return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def dense_decode(
    queries: list[torch.Tensor], views: list[tuple[torch.Tensor, torch.Tensor]], gqa: bool
) -> None:
    """Dense decode of every sequence: one SDPA call each."""
    for q, (k, v) in zip(queries, views, strict=True):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


def run_case(
    name: str, lens: list[int], records: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    cache, first = build_cache(lens, seed=len(lens))
    batch = len(lens)
    q = torch.randn(batch, HEADS_Q, DIM, device="cuda").to(DTYPE)
    dense_bytes = sum(lens) * HEADS_KV * DIM * 2 * 2

    def record(
        method: str, ms: float | None, nbytes: int, note: str = "", graph: float | None = None
    ) -> None:
        rec = dict(
            meta,
            config="P",
            case=name,
            context=max(lens),
            lengths=lens,
            batch=batch,
            heads_q=HEADS_Q,
            heads_kv=HEADS_KV,
            head_dim=DIM,
            block_size=BLOCK,
            top_k=TOP_K,
            method=method,
            median_ms=round(ms, 4) if ms is not None else None,
            graph_ms=round(graph, 4) if graph is not None else None,
            bytes=nbytes,
            gb_per_s=round(nbytes / (ms * 1e6), 1) if ms else None,
            graph_gb_per_s=round(nbytes / (graph * 1e6), 1) if graph else None,
            dense_bytes=dense_bytes,
        )
        if note:
            rec["note"] = note
        records.append(rec)
        gbps = rec["gb_per_s"] or 0.0
        graph_gbps = rec["graph_gb_per_s"] or 0.0
        shown = f"{ms:9.4f} ms" if ms is not None else "        - ms"
        shown_graph = f"{graph:9.4f} ms" if graph is not None else "        - ms"
        print(
            f"{name:9s} batch {batch} {method:15s} eager {shown} {gbps:7.1f} GB/s | graph "
            f"{shown_graph} {graph_gbps:7.1f} GB/s "
            f"({100 * graph_gbps / (PEAK_TBPS * 1000):4.1f}% of peak) {note}",
            flush=True,
        )

    for method, shared in (("moba", False), ("moba_shared", True)):
        nbytes = cache.bytes_read(q, TOP_K, gqa_shared_routing=shared)
        ms, graph, why = time_both(
            functools.partial(cache.decode, q, TOP_K, gqa_shared_routing=shared)
        )
        note = f"reads {100 * nbytes / dense_bytes:.1f}% of dense bytes {why}".strip()
        record(method, ms, nbytes, note, graph)

    views = [sequence_kv(cache, first, lens, b) for b in range(batch)]
    queries = [q[b].view(1, HEADS_Q, 1, DIM) for b in range(batch)]

    dense = functools.partial(dense_decode, queries, views, True)
    note = "one call per sequence" if batch > 1 else ""
    for method, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):
                ms, graph, why = time_both(dense, inner=3, reps=7)
            record(method, ms, dense_bytes, f"{note} {why}".strip(), graph)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            reason = str(e).splitlines()[0][:120]
            group = HEADS_Q // HEADS_KV
            if dense_bytes * group > 24 << 30:
                record(method, None, dense_bytes, f"failed with GQA: {reason}")
                continue
            # The backend refused native GQA: kv heads repeated in memory
            # (it then reads `group` times the bytes).
            expanded = [
                (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                for k, v in views
            ]
            try:
                with sdpa_kernel(backend):
                    ms, graph, why = time_both(
                        functools.partial(dense_decode, queries, expanded, False), inner=3, reps=7
                    )
                record(
                    method,
                    ms,
                    dense_bytes * group,
                    f"kv heads repeated to {HEADS_Q} (GQA refused: {reason}) {note} {why}".strip(),
                    graph,
                )
            except (RuntimeError, torch.OutOfMemoryError) as e2:
                record(method, None, dense_bytes, f"failed: {str(e2).splitlines()[0][:160]}")
            del expanded
            torch.cuda.empty_cache()
    del cache, views, dense
    torch.cuda.empty_cache()


def check(log: Callable[[str], object]) -> bool:
    """MoBA decode (per-head and shared routing) against the op path
    (moba_attn_varlen with cu_seqlens_k over the cached keys) at 1M, batch 1,
    and on a mixed batch; routing against moba.routing."""
    ok = True
    for lens in ([1 << 20], [98304, 4096, 1, 65536 + 17]):
        cache, first = build_cache(lens, seed=7)
        batch = len(lens)
        q = torch.randn(batch, HEADS_Q, DIM, device="cuda").to(DTYPE)
        keys = torch.cat(
            [sequence_kv(cache, first, lens, b)[0][0].transpose(0, 1) for b in range(batch)]
        )
        values = torch.cat(
            [sequence_kv(cache, first, lens, b)[1][0].transpose(0, 1) for b in range(batch)]
        )
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
        for shared in (False, True):
            out, lse = cache.decode(q, TOP_K, gqa_shared_routing=shared, return_lse=True)
            ref, ref_lse = moba.moba_attn_varlen(
                q, keys, values, cu_q, 1, BLOCK, TOP_K,
                gqa_shared_routing=shared, return_lse=True,
                cu_seqlens_k=cu_k, max_seqlen_k=max(lens),
            )  # fmt: skip
            sel = cache.routing(q, TOP_K, gqa_shared_routing=shared)
            ref_sel = moba.routing(
                q, keys, cu_q, 1, BLOCK, TOP_K,
                gqa_shared_routing=shared, cu_seqlens_k=cu_k, max_seqlen_k=max(lens),
            )  # fmt: skip
            width = ref_sel.shape[-1]
            differing = int((sel[..., :width] != ref_sel).any(dim=-1).sum())
            same = (sel[..., :width] == ref_sel).all(dim=-1)  # rows routed alike
            err = (out.float() - ref.float()).abs().amax(dim=-1)[same].max().item()
            lse_err = (lse - ref_lse).abs().t()[same].max().item()
            nan = bool(torch.isnan(out).any())
            good = (
                err <= 3e-2
                and lse_err <= 2e-3
                and not nan
                and differing <= max(2, q.numel() // DIM // 100)
            )
            ok = ok and good
            log(
                f"check lens {lens} shared={shared}: selection rows differing {differing} "
                f"(near ties); out max abs {err:.3e}; lse max abs {lse_err:.3e}; nan {nan}; "
                f"{'ok' if good else 'FAILED'}"
            )
        del cache, keys, values
        torch.cuda.empty_cache()
    return ok


def profile(context: int) -> None:
    """Kernel names and device times of one MoBA decode step (batch 1, per-head
    and shared routing), from torch.profiler over 5 steps: where the time of
    a step goes (routing, attention, validation, Python-side kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cache, _ = build_cache([context], seed=1)
    q = torch.randn(1, HEADS_Q, DIM, device="cuda").to(DTYPE)
    steps = 5
    for shared in (False, True):
        step = functools.partial(cache.decode, q, TOP_K, gqa_shared_routing=shared)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            # Kernels (and memsets/copies) have self device time; CPU ops do not.
            self_us = float(
                getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
            )
            if self_us > 0:
                rows.append((self_us / steps, e.count / steps, e.key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"\none decode step, context {context}, batch 1, shared routing {shared}:")
        print(f"{'us/step':>9s} {'calls':>6s}  kernel")
        for us, calls, name in rows:
            print(f"{us:9.2f} {calls:6.1f}  {name[:110]}")
        print(f"{total:9.2f}         total device time per step (kernels run back to back)")
    del cache
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="JSON file to write (a list of case objects)")
    ap.add_argument("--check", action="store_true", help="run the correctness check and exit")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print the kernels of one MoBA decode step (batch 1) and exit",
    )
    ap.add_argument("--context", type=int, default=1 << 20, help="longest sequence (tokens)")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and moba.backend_available("cuda")):
        sys.exit("bench_decode: needs a GPU and moba built with its CUDA backend")
    if args.check:
        ok = check(print)
        print("CHECK", "PASSED" if ok else "FAILED")
        sys.exit(0 if ok else 1)
    if args.profile:
        profile(args.context)
        return
    meta: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        torch=torch.__version__,
        cudnn=torch.backends.cudnn.version(),
        dtype="bfloat16",
    )
    print(f"device {meta['device']}, torch {meta['torch']}, cuDNN {meta['cudnn']}")
    records: list[dict[str, Any]] = []
    top = args.context
    run_case("batch1", [top], records, meta)
    # 8 sequences from the full context down to a quarter of it, in whole pages.
    mixed = [((top - (top - top // 4) * i // 7) // PAGE) * PAGE for i in range(8)]
    run_case("batch8", mixed, records, meta)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    print(
        "\nvs best dense: graph-captured times where MoBA and a dense peer both have "
        "them (no Python/launch overhead), else eager"
    )
    print("case      method          eager ms  graph ms  basis  vs best dense")
    for case in ("batch1", "batch8"):
        rows = [r for r in records if r["case"] == case]
        dense = [r for r in rows if r["method"].startswith("sdpa")]
        best_graph = min((r["graph_ms"] for r in dense if r["graph_ms"]), default=None)
        best_eager = min((r["median_ms"] for r in dense if r["median_ms"]), default=None)
        for r in rows:
            if not r["method"].startswith("moba") or not r["median_ms"]:
                continue
            if r["graph_ms"] and best_graph:
                basis, ratio = "graph", r["graph_ms"] / best_graph
            elif best_eager:
                basis, ratio = "eager", r["median_ms"] / best_eager
            else:
                continue
            graph = f"{r['graph_ms']:8.4f}" if r["graph_ms"] else "       -"
            print(
                f"{case:9s} {r['method']:14s} {r['median_ms']:8.4f}  {graph}  {basis:5s}  "
                f"{ratio:.3f} of dense (target <= 0.125)"
            )


if __name__ == "__main__":
    main()
