"""Context- and head-parallel MoBA against dense ring attention, launched by torchrun.

Config P (32 query heads, 8 kv heads, head_dim 128, block 4096, top-k 12, bf16) on
GPUs, one rank per GPU::

    torchrun --nproc_per_node 8 bench/distributed/bench_cp.py --backend nccl --tokens 4M 10M \
        --json bench/results/distributed-cp-h200x8.json

On one GPU (world size 1: no communication, the three forms side by side)::

    torchrun --nproc_per_node 1 bench/distributed/bench_cp.py --backend nccl --tokens 256K 1M

On CPUs with gloo, at tiny sizes (how the script itself is tested)::

    torchrun --nproc_per_node 2 bench/distributed/bench_cp.py --backend gloo --device cpu \
        --tokens 4K --heads-q 4 --heads-kv 2 --head-dim 32 --block-size 256 --top-k 3

Each rank generates its own shard (random normal; nothing of the whole sequence is
ever materialised on one rank). Forms: ``context`` (moba.distributed.context_parallel_attn),
``head`` (head_parallel_attn, needs Hkv % world == 0) and ``ring``: dense causal ring
attention built from PyTorch primitives only -- K/V chunks passed around the ring with
batched isend/irecv (the next chunk in flight while the current one is attended),
aten's flash attention per (query chunk, key chunk) pair (causal on the diagonal,
non-causal for earlier chunks, skipped for later ones) returning its logsumexp, the
partial results merged by LSE in fp32, and a backward that runs flash attention's
backward with the merged output and lse while the K/V gradients travel with their
chunks back to their owners. Reported per form and length: the slowest rank's median
forward (and forward+backward) time, every rank's peak GPU memory, and for ``context``
the bytes each rank fetched. Rank 0 prints one line per measurement and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor

import moba.distributed as md

# --------------------------------------------------------------------------
# Dense ring attention from PyTorch primitives (the baseline)
# --------------------------------------------------------------------------


class _Piece(NamedTuple):
    """A contiguous token range of the sequence and where it sits in its rank's shard."""

    start: int
    end: int
    offset: int


def _pieces(bounds: list[tuple[int, int]]) -> list[_Piece]:
    pieces: list[_Piece] = []
    offset = 0
    for start, end in bounds:
        if end > start:
            pieces.append(_Piece(start, end, offset))
        offset += end - start
    return pieces


def _pairs(q_pieces: list[_Piece], k_pieces: list[_Piece]) -> list[tuple[_Piece, _Piece, bool]]:
    """The (query piece, key piece, causal) pairs with causal work: every piece comes
    from one partition of the sequence, so two pieces are equal or disjoint."""
    pairs = []
    for qp in q_pieces:
        for kp in k_pieces:
            if kp.end <= qp.start:
                pairs.append((qp, kp, False))
            elif kp.start == qp.start:
                pairs.append((qp, kp, True))
    return pairs


def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Any, ...]:
    """aten flash attention on [1, H, L, D]: (out, lse [1, H, L] fp32, what the backward needs)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse, ()
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
        torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    )
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _flash_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    aux: tuple[Any, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """Flash attention's backward; ``out`` and ``lse`` are the merged (whole-row) ones, which
    makes the result this key chunk's exact share of the gradients."""
    if q.device.type == "cpu":
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    else:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset,
            scale=scale,
        )  # fmt: skip
    return cast(tuple[Tensor, Tensor, Tensor], tuple(grads))


class _Ring(NamedTuple):
    rank: int
    world: int
    pieces: list[list[_Piece]]  # per rank
    lengths: list[int]  # tokens per rank
    group: dist.ProcessGroup | None
    scale: float


def _start_shift(send: Tensor, recv: Tensor, ring: _Ring) -> list[Any]:
    """Sends ``send`` to the next rank and receives ``recv`` from the previous one, async."""
    if ring.world == 1:
        recv.copy_(send)
        return []

    def peer(r: int) -> int:
        return r if ring.group is None else dist.get_global_rank(ring.group, r)

    ops = [
        dist.P2POp(dist.isend, send, peer((ring.rank + 1) % ring.world), ring.group),
        dist.P2POp(dist.irecv, recv, peer((ring.rank - 1) % ring.world), ring.group),
    ]
    return list(dist.batch_isend_irecv(ops))


def _wait(requests: list[Any]) -> None:
    for request in requests:
        request.wait()


def _kv_views(kv: Tensor, piece: _Piece, kv_head: int, group_size: int) -> tuple[Tensor, Tensor]:
    """One kv head's keys and values of a piece as [1, group_size, L, D] (repeated for GQA)."""
    rows = slice(piece.offset, piece.offset + piece.end - piece.start)
    k = kv[0, kv_head, rows][None, None].expand(1, group_size, -1, -1).contiguous()
    v = kv[1, kv_head, rows][None, None].expand(1, group_size, -1, -1).contiguous()
    return k, v


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> tuple[Tensor, Tensor]:
        heads_q, heads_kv = q.shape[1], k.shape[1]
        group_size = heads_q // heads_kv
        qh = q.transpose(0, 1).contiguous()  # [Hq, n, D]
        kv = torch.stack([k.transpose(0, 1), v.transpose(0, 1)]).contiguous()  # [2, Hkv, n, D]
        acc = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qh.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        aux: dict[tuple[int, int, int, int], tuple[Any, ...]] = {}
        current = kv
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            requests: list[Any] = []
            if step + 1 < ring.world:
                following = kv.new_empty(
                    (*kv.shape[:2], ring.lengths[(src - 1) % ring.world], kv.shape[3])
                )
                requests = _start_shift(current, following, ring)
            for qp, kp, causal in _pairs(ring.pieces[ring.rank], ring.pieces[src]):
                rows = slice(qp.offset, qp.offset + qp.end - qp.start)
                for g in range(heads_kv):
                    heads = slice(g * group_size, (g + 1) * group_size)
                    kg, vg = _kv_views(current, kp, g, group_size)
                    out_p, lse_p, aux_p = _flash_fwd(
                        qh[None, heads, rows].contiguous(), kg, vg, causal, ring.scale
                    )
                    aux[(step, qp.start, kp.start, g)] = aux_p
                    old_lse = lse[heads, rows]
                    new_lse = torch.logaddexp(old_lse, lse_p[0])
                    acc[heads, rows] *= torch.exp(old_lse - new_lse)[..., None]
                    acc[heads, rows] += out_p[0].float() * torch.exp(lse_p[0] - new_lse)[..., None]
                    lse[heads, rows] = new_lse
            _wait(requests)
            if step + 1 < ring.world:
                current = following
        out = acc.to(q.dtype)
        ctx.save_for_backward(qh, kv, out, lse)
        ctx.ring, ctx.aux = ring, aux
        ctx.mark_non_differentiable(lse)
        return out.transpose(0, 1), lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        qh, kv, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        heads_q, heads_kv = qh.shape[0], kv.shape[1]
        group_size = heads_q // heads_kv
        douth = dout.transpose(0, 1).contiguous()
        dq = torch.zeros(qh.shape, dtype=torch.float32, device=qh.device)
        current = kv
        travelling: Tensor | None = None  # the K/V gradients of this step's chunk, so far
        dkv_requests: list[Any] = []
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            previous = (src - 1) % ring.world
            kv_requests: list[Any] = []
            if step + 1 < ring.world:
                following = kv.new_empty((*kv.shape[:2], ring.lengths[previous], kv.shape[3]))
                kv_requests = _start_shift(current, following, ring)
            partial = torch.zeros(current.shape, dtype=torch.float32, device=kv.device)
            for qp, kp, causal in _pairs(ring.pieces[ring.rank], ring.pieces[src]):
                rows = slice(qp.offset, qp.offset + qp.end - qp.start)
                key_rows = slice(kp.offset, kp.offset + kp.end - kp.start)
                for g in range(heads_kv):
                    heads = slice(g * group_size, (g + 1) * group_size)
                    kg, vg = _kv_views(current, kp, g, group_size)
                    dq_p, dk_p, dv_p = _flash_bwd(
                        douth[None, heads, rows].contiguous(),
                        qh[None, heads, rows].contiguous(),
                        kg,
                        vg,
                        out[None, heads, rows].contiguous(),
                        lse[None, heads, rows].contiguous(),
                        causal,
                        ring.scale,
                        ctx.aux[(step, qp.start, kp.start, g)],
                    )
                    dq[heads, rows] += dq_p[0].float()
                    partial[0, g, key_rows] += dk_p[0].float().sum(0)
                    partial[1, g, key_rows] += dv_p[0].float().sum(0)
            if travelling is not None:
                # What the ranks before this one added for the same chunk.
                _wait(dkv_requests)
                partial += travelling
            travelling = torch.empty(
                (*kv.shape[:2], ring.lengths[previous], kv.shape[3]),
                dtype=torch.float32,
                device=kv.device,
            )
            dkv_requests = _start_shift(partial, travelling, ring)
            _wait(kv_requests)
            if step + 1 < ring.world:
                current = following
        # After a full turn the gradients of this rank's own chunk have come home.
        _wait(dkv_requests)
        assert travelling is not None
        dkv = travelling.to(kv.dtype)
        return (
            dq.to(qh.dtype).transpose(0, 1),
            dkv[0].transpose(0, 1),
            dkv[1].transpose(0, 1),
            None,
        )


def ring_attention(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    seqlen: int,
    block_size: int,
    layout: md.Layout = "zigzag",
    *,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Dense causal attention of one sequence sharded as :func:`moba.distributed.shard` cuts
    it, by ring attention. Returns this rank's output ``[n_r, Hq, D]`` (differentiable)
    and lse ``[Hq, n_r]`` fp32. ``layout="zigzag"`` balances the causal work."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    bounds = md.shard_bounds(seqlen, world, block_size, layout)
    ring = _Ring(
        rank=rank,
        world=world,
        pieces=[_pieces(b) for b in bounds],
        lengths=[sum(e - s for s, e in b) for b in bounds],
        group=group,
        scale=softmax_scale if softmax_scale is not None else q_local.shape[-1] ** -0.5,
    )
    if q_local.shape[0] != ring.lengths[rank]:
        raise ValueError(f"q_local: rank {rank} must hold {ring.lengths[rank]} tokens")
    return cast(tuple[Tensor, Tensor], _RingAttention.apply(q_local, k_local, v_local, ring))


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


def _tokens(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _gather(value: float, device: torch.device) -> list[float]:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def _time(fn: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """The slowest rank's median time of ``fn`` after the warm-up runs."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(_slowest(time.perf_counter() - start, device))
    return statistics.median(times)


def _run_form(
    form: str, layout: str, tokens: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bounds = md.shard_bounds(tokens, world, args.block_size, cast(md.Layout, layout))[rank]
    n_local = sum(e - s for s, e in bounds)
    gen = torch.Generator(device=device).manual_seed(1000 * tokens + rank)

    def randn(heads: int) -> Tensor:
        return torch.randn(n_local, heads, args.head_dim, generator=gen, device=device, dtype=dtype)

    q, k, v, dout = (
        randn(args.heads_q),
        randn(args.heads_kv),
        randn(args.heads_kv),
        randn(args.heads_q),
    )
    stats: dict[str, int] = {}

    def attend(grad: bool) -> None:
        qi, ki, vi = (t.detach().requires_grad_(grad) for t in (q, k, v))
        if form == "ring":
            out, _ = ring_attention(qi, ki, vi, tokens, args.block_size, cast(md.Layout, layout))
        elif form == "context":
            out = cast(Tensor, md.context_parallel_attn(
                qi, ki, vi, args.block_size, args.top_k, seqlen=tokens,
                layout=cast(md.Layout, layout), overlap_stages=args.overlap_stages, stats=stats,
            ))  # fmt: skip
        else:
            out = cast(Tensor, md.head_parallel_attn(
                qi, ki, vi, args.block_size, args.top_k, seqlen=tokens,
                layout=cast(md.Layout, layout),
            ))  # fmt: skip
        if grad:
            out.backward(dout)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    entry: dict[str, Any] = {"tokens": tokens, "form": form, "layout": layout, "world": world}
    entry["fwd_s"] = _time(lambda: attend(False), args, device)
    if args.backward:
        entry["fwd_bwd_s"] = _time(lambda: attend(True), args, device)
    if device.type == "cuda":
        entry["peak_gib"] = _gather(torch.cuda.max_memory_allocated(device) / 2**30, device)
    if form == "context":
        entry["fetched_gib"] = _gather(stats["fetched_bytes"] / 2**30, device)
        entry["stages"] = stats["stages"]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tokens", nargs="+", default=["4M", "10M"], help="e.g. 4M 10M 65536")
    parser.add_argument("--forms", nargs="+", default=["context", "head", "ring"])
    parser.add_argument("--context-layout", default="contiguous", choices=("contiguous", "zigzag"))
    parser.add_argument("--ring-layout", default="zigzag", choices=("contiguous", "zigzag"))
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=12)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: bf16 on cuda, fp32 on cpu")  # fmt: skip
    parser.add_argument("--overlap-stages", type=int, default=None)
    parser.add_argument("--no-backward", dest="backward", action="store_false")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")

    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    results: list[dict[str, Any]] = []
    for text in args.tokens:
        tokens = _tokens(text)
        for form in args.forms:
            if form == "head" and args.heads_kv % world != 0:
                continue  # head parallelism needs Hkv % world == 0
            layout = args.ring_layout if form == "ring" else args.context_layout
            entry = _run_form(form, layout, tokens, args, device)
            results.append(entry)
            if rank == 0:
                print(json.dumps(entry), flush=True)
    if rank == 0 and args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "world": world, "device": device_name,
                       "torch": torch.__version__, "results": results}, f, indent=1)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
