"""moba.distributed on several gloo processes of this machine, against the single-process op.

Each test starts one group of processes (spawned, bounded by a timeout so that a
hang fails the test instead of blocking CI) that runs a list of cases; every rank
checks its shard of the forward output, lse, routing and gradients against
``moba.moba_attn_varlen`` / ``moba.routing`` on the whole sequence, which each rank
also computes (the inputs come from one seed). The ring-attention baseline of
``bench/distributed/bench_cp.py`` is checked the same way against dense causal attention.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing as mp
import os
import queue
import socket
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import moba
import moba.distributed

TIMEOUT_S = 90

# (sequence lengths, block_size, top_k, Hq, Hkv, shared routing, layout, form); one
# length: a single sequence, given without cu_seqlens; several: a packed varlen batch.
Case = tuple[tuple[int, ...], int, int, int, int, bool, str, str]

CASES_2: list[Case] = [
    ((200,), 16, 3, 2, 2, False, "contiguous", "context"),
    ((200,), 16, 3, 4, 1, True, "zigzag", "context"),
    ((333,), 32, 2, 4, 1, False, "zigzag", "context"),
    ((256,), 8, 5, 4, 4, True, "contiguous", "context"),
    ((100,), 64, 4, 2, 2, False, "contiguous", "context"),  # fewer blocks than top_k
    ((97,), 16, 1, 4, 2, False, "zigzag", "context"),  # top_k 1: nothing fetched
    ((10,), 16, 3, 2, 2, False, "zigzag", "context"),  # ranks with no tokens
    ((120, 0, 7, 250), 16, 3, 4, 2, False, "contiguous", "context"),  # varlen
    ((90, 300, 1), 16, 4, 4, 1, True, "zigzag", "context"),
    # Tiny blocks, one selection per query: the fetch is a strict subset of the past.
    ((40, 300), 2, 2, 2, 1, True, "contiguous", "context"),
    ((200,), 16, 3, 4, 2, False, "contiguous", "head"),
    ((333,), 32, 2, 8, 2, True, "zigzag", "head"),
    ((120, 0, 7, 250), 16, 3, 4, 2, False, "zigzag", "head"),
    # Hkv / world = 2 and 4: head parallelism pipelined over 2 and 4 kv-head groups.
    ((150,), 16, 4, 8, 4, False, "zigzag", "head"),
    ((60, 90), 8, 2, 8, 8, True, "contiguous", "head"),
]
CASES_3: list[Case] = [
    ((300,), 16, 3, 4, 1, False, "contiguous", "context"),
    ((301,), 16, 4, 4, 4, True, "zigzag", "context"),
    ((512,), 32, 3, 8, 2, False, "zigzag", "context"),
    ((64, 200, 33), 8, 3, 4, 2, False, "zigzag", "context"),
    ((40, 300), 2, 2, 1, 1, False, "zigzag", "context"),
    ((250,), 8, 6, 3, 3, False, "contiguous", "head"),
    ((250,), 16, 3, 6, 3, True, "zigzag", "head"),
    ((64, 200, 33), 8, 3, 6, 3, False, "contiguous", "head"),
    ((130,), 16, 4, 12, 6, False, "zigzag", "head"),
]


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    seqlens, _, _, heads_q, heads_kv, _, _, _ = case
    total = sum(seqlens)
    gen = torch.Generator().manual_seed(total * 31 + heads_q)
    q = torch.randn(total, heads_q, 16, generator=gen)
    k = torch.randn(total, heads_kv, 16, generator=gen)
    v = torch.randn(total, heads_kv, 16, generator=gen)
    dout = torch.randn(total, heads_q, 16, generator=gen)
    return q, k, v, dout


def _check_case(case: Case, rank: int, world: int) -> None:
    seqlens, block, top_k, _, _, shared, layout, form = case
    q, k, v, dout = _inputs(case)
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    longest = max(seqlens)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    # An explicit softmax_scale in half of the cases, the default in the others.
    scale = 0.3 if top_k % 2 == 0 else None
    ref_out, ref_lse = moba.moba_attn_varlen(
        *full,
        cu,
        longest,
        block,
        top_k,
        return_lse=True,
        gqa_shared_routing=shared,
        softmax_scale=scale,
    )
    ref_out.backward(dout)
    ref_sel = moba.routing(q, k, cu, longest, block, top_k, gqa_shared_routing=shared)
    # A single sequence exercises the default (cu_seqlens omitted, length all-reduced).
    batch = {"cu_seqlens": cu} if len(seqlens) > 1 else {}

    def cut(t: torch.Tensor) -> torch.Tensor:
        return moba.distributed.shard(t, rank, world, block, layout, cu_seqlens=cu)

    local = [cut(t).clone().requires_grad_() for t in (q, k, v)]
    attn = (
        moba.distributed.context_parallel_attn
        if form == "context"
        else moba.distributed.head_parallel_attn
    )
    stats: dict[str, int] = {}
    # Pipelining stages vary with the case (default, unpipelined, 2, 3); more than Hkv
    # are clamped to Hkv.
    stages = (None, 1, 2, 3)[(sum(seqlens) + top_k) % 4]
    if form == "context":
        batch["stats"] = stats
        batch["overlap_stages"] = stages
    elif stages == 1:
        batch["overlap_stages"] = 1  # else the default: the most groups up to 4
    out, lse = attn(
        *local,
        block,
        top_k,
        gqa_shared_routing=shared,
        layout=layout,
        return_lse=True,
        softmax_scale=scale,
        **batch,
    )
    batch.pop("stats", None)
    # Without lse: the same output (the form's other return path).
    plain = attn(
        *(t.detach() for t in local),
        block,
        top_k,
        gqa_shared_routing=shared,
        layout=layout,
        softmax_scale=scale,
        **batch,
    )
    torch.testing.assert_close(plain, out.detach(), atol=0, rtol=0)
    batch.pop("overlap_stages", None)
    out.backward(cut(dout))
    tol = 5e-5
    torch.testing.assert_close(out, cut(ref_out.detach()), atol=tol, rtol=0)
    torch.testing.assert_close(lse, cut(ref_lse.T).T, atol=tol, rtol=0)
    for name, mine, ref in zip("qkv", local, full, strict=True):
        assert mine.grad is not None and ref.grad is not None
        torch.testing.assert_close(mine.grad, cut(ref.grad), atol=tol, rtol=0, msg=f"d{name}")
    if form == "context":
        sel = moba.distributed.context_parallel_routing(
            local[0], local[1], block, top_k, gqa_shared_routing=shared, layout=layout, **batch
        )
        assert torch.equal(sel, cut(ref_sel)), "routing differs from moba.routing"
        # The fetch is tight: exactly the remote blocks some local query selects.
        firsts = [0, *itertools.accumulate(-(-n // block) for n in seqlens)][:-1]
        base = torch.repeat_interleave(torch.tensor(firsts), torch.tensor(seqlens))
        token_block = base + torch.cat([torch.arange(n) // block for n in seqlens])
        owned = set(cut(token_block).tolist())
        local_sel = cut(ref_sel).long()
        chosen = (local_sel + cut(base)[:, None, None])[local_sel >= 0]
        remote = set(chosen.tolist()) - owned
        assert stats["fetched_blocks"] == len(remote), (stats, sorted(remote))
        # Each stage fetches, for its kv heads only, the blocks their query heads select.
        heads_kv = k.shape[1]
        group = q.shape[1] // heads_kv
        assert stats["stages"] == min(heads_kv, 4 if stages is None else stages)
        expected = 0
        for s in range(stats["stages"]):
            lo, hi = s * heads_kv // stats["stages"], (s + 1) * heads_kv // stats["stages"]
            sel = local_sel[:, lo * group : hi * group]
            picked = (sel + cut(base)[:, None, None])[sel >= 0]
            expected += len(set(picked.tolist()) - owned) * block * (hi - lo) * k.shape[2] * 2 * 4
        assert stats["fetched_bytes"] == expected, (stats, expected)


def _check_errors(rank: int, world: int) -> None:
    # Every rank makes the same mistake, so all raise before any collective.
    q = torch.randn(64, 4, 8)
    k = torch.randn(64, 1, 8)
    shards = [moba.distributed.shard(t, rank, world, 8) for t in (q, k, k)]
    with pytest.raises(ValueError, match="multiple of the world size"):
        moba.distributed.head_parallel_attn(*shards, 8, 2, seqlen=64)
    with pytest.raises(ValueError, match="must hold"):
        moba.distributed.context_parallel_attn(*shards, 8, 2, seqlen=128)
    with pytest.raises(ValueError, match="layout"):
        moba.distributed.context_parallel_attn(*shards, 8, 2, seqlen=64, layout="ring")
    with pytest.raises(ValueError, match="overlap_stages"):
        moba.distributed.context_parallel_attn(*shards, 8, 2, seqlen=64, overlap_stages=0)
    wide = [moba.distributed.shard(torch.randn(64, 3 * world, 8), rank, world, 8)] * 3
    with pytest.raises(ValueError, match="overlap_stages: expected a divisor of Hkv / world = 3"):
        moba.distributed.head_parallel_attn(*wide, 8, 2, seqlen=64, overlap_stages=2)


BENCH_CP = Path(__file__).resolve().parents[2] / "bench" / "distributed" / "bench_cp.py"


def _load_bench_cp() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cp", BENCH_CP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_ring(rank: int, world: int) -> None:
    """The benchmark's ring attention equals dense causal attention (forward and backward)."""
    bench_cp = _load_bench_cp()
    for seqlen, block, layout in ((200, 16, "zigzag"), (333, 32, "contiguous"), (40, 16, "zigzag")):
        gen = torch.Generator().manual_seed(seqlen)
        q, dout = (torch.randn(seqlen, 4, 16, generator=gen) for _ in range(2))
        k, v = (torch.randn(seqlen, 2, 16, generator=gen) for _ in range(2))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        heads_first = [t.transpose(0, 1) for t in full]
        ref = torch.nn.functional.scaled_dot_product_attention(
            *heads_first, is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        ref.backward(dout)

        def cut(t: torch.Tensor, block: int = block, layout: str = layout) -> torch.Tensor:
            return moba.distributed.shard(t, rank, world, block, layout)

        local = [cut(t).clone().requires_grad_() for t in (q, k, v)]
        out, lse = bench_cp.ring_attention(*local, seqlen, block, layout)
        out.backward(cut(dout))
        scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1)) / 4
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
        ref_lse = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
        tol = 1e-5
        torch.testing.assert_close(out, cut(ref.detach()), atol=tol, rtol=0)
        torch.testing.assert_close(lse, cut(ref_lse.T).T, atol=tol, rtol=0)
        for name, mine, want in zip("qkv", local, full, strict=True):
            assert mine.grad is not None and want.grad is not None
            torch.testing.assert_close(mine.grad, cut(want.grad), atol=tol, rtol=0, msg=f"d{name}")


def _worker(rank: int, world: int, port: int, cases: list[Case], results: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import moba.distributed  # noqa: F401

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in cases:
            try:
                _check_case(case, rank, world)
            except Exception:
                # The ranks' collectives are out of step now: report and stop.
                results.put((rank, case, traceback.format_exc()))
                return
        if world == 3:
            # In this group rather than its own: spawning the ranks costs more than the check.
            try:
                _check_ring(rank, world)
            except Exception:
                results.put((rank, "ring attention baseline", traceback.format_exc()))
                return
        try:
            _check_errors(rank, world)
        except Exception:
            results.put((rank, "argument errors", traceback.format_exc()))
            return
        results.put((rank, None, "done"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_group(world: int, cases: list[Case]) -> list[str]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, cases, results)) for r in range(world)
    ]
    for p in procs:
        p.start()
    failures: list[str] = []
    done = 0
    try:
        while done < world:
            try:
                rank, case, message = results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                failures.append(f"timed out after {TIMEOUT_S} s waiting for the ranks")
                break
            if case is None:
                done += 1
            else:
                failures.append(f"rank {rank}, case {case}:\n{message}")
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not failures else 1)
            if p.is_alive():
                p.kill()
                p.join()
    for r, p in enumerate(procs):
        if p.exitcode not in (0, None) and not failures:
            failures.append(f"rank {r} exited with {p.exitcode}")
    return failures


@pytest.mark.parametrize(("world", "cases"), [(2, CASES_2), (3, CASES_3)], ids=["2", "3"])
def test_matches_single_process(world: int, cases: list[Case]) -> None:
    """The cases, then the argument errors; with 3 ranks also the ring-attention baseline."""
    failures = _run_group(world, cases)
    assert not failures, "\n".join(failures)


def test_shard_roundtrip_and_geometry() -> None:
    x = torch.arange(1000)
    for layout in ("contiguous", "zigzag"):
        for world in (1, 2, 3, 5):
            for block in (1, 7, 64):
                shards = [moba.distributed.shard(x, r, world, block, layout) for r in range(world)]
                assert torch.equal(moba.distributed.unshard(shards, block, layout), x)
                bounds = moba.distributed.shard_bounds(1000, world, block, layout)
                for rank_bounds in bounds:
                    for start, _ in rank_bounds:
                        assert start % block == 0 or start == 1000  # no block straddles ranks
    cu = [0, 100, 100, 357, 1000]
    for layout in ("contiguous", "zigzag"):
        shards = [moba.distributed.shard(x, r, 3, 16, layout, cu_seqlens=cu) for r in range(3)]
        assert sum(s.shape[0] for s in shards) == 1000
        restored = moba.distributed.unshard(shards, 16, layout, cu_seqlens=cu)
        assert torch.equal(restored, x)
    assert moba.distributed.shard_bounds(8, 2, 2, "zigzag") == [[(0, 2), (6, 8)], [(2, 4), (4, 6)]]
    with pytest.raises(ValueError, match="layout"):
        moba.distributed.shard_bounds(8, 2, 2, "ring")


def test_requires_initialized_process_group() -> None:
    q = torch.randn(8, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        moba.distributed.context_parallel_attn(q, q, q, 4, 2)
