"""MoBA over several processes with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Sequences are sharded along their tokens across the ranks of a process group
(one long sequence, or every sequence of a packed varlen batch); each rank holds
the queries, keys and values of its shard. Two forms:

* :func:`context_parallel_attn` -- MoBA's own distributed form. Every rank
  computes the means of its blocks and all-gathers them (tiny), routes its
  queries against all their past blocks, and fetches, with one
  ``all_to_all_single``, the keys and values of exactly the remote blocks that
  its queries select. It then runs the ordinary op (:func:`moba.moba_attn_varlen`)
  on a constructed chunked-prefill problem whose keys are [those blocks, in
  sequence order] + [its own chunk], so the op routes and attends exactly as on
  the whole sequence (``docs/distributed.md`` says why the selection cannot
  change). The work is pipelined over groups of kv heads (``overlap_stages``):
  the next group's blocks are in flight (``async_op=True``) while the op runs on
  the current one. The backward is the op's, with the reverse all-to-all
  returning the key/value gradients to the ranks that own the blocks, each
  group's while the op's backward runs on the next.
* :func:`head_parallel_attn` -- the paper's approach: an all-to-all turns the
  sequence shards into head shards, each rank runs the op on the full sequences
  for its heads, and a second all-to-all turns the output back.

Both are differentiable (``torch.autograd``) and exact: the same routing, the
output and gradients of the single-process op within floating-point rounding.
They run on CPU tensors with gloo and on CUDA tensors with NCCL (one GPU per rank,
``torch.cuda.set_device`` done by the caller): every buffer is made on the inputs'
device and every exchanged tensor is contiguous.
Each rank's shard is given by :func:`shard_bounds` (``layout`` contiguous or
zig-zag); :func:`shard` and :func:`unshard` cut and reassemble full tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ._ops import (
    _FLOAT_DTYPES,
    _attn_bwd,
    _attn_fwd,
    _check_backend,
    _check_qkv,
    _check_scale,
    routing,
)

__all__ = [
    "Layout",
    "context_parallel_attn",
    "context_parallel_routing",
    "head_parallel_attn",
    "shard",
    "shard_bounds",
    "unshard",
]

Layout = Literal["contiguous", "zigzag"]
_LAYOUTS = ("contiguous", "zigzag")

# Routing on different ranks and in the op may sum a score in different orders;
# a block within this relative margin of a query's last selected score is fetched
# too, so the op on the constructed problem always has every block it may select.
_SCORE_MARGIN = 1e-5
# Queries routed at once when planning the fetch (bounds the [Hq, n, n_blocks] scores).
_ROUTING_SLICE = 2048
# Default number of kv-head groups whose fetches are pipelined with the op (see
# context_parallel_attn): more hides more of the fetch, each adds a collective.
_DEFAULT_STAGES = 4


# --------------------------------------------------------------------------
# Sharding geometry
# --------------------------------------------------------------------------


def _check_layout(layout: str) -> Layout:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {_LAYOUTS}, got {layout!r}")
    return cast(Layout, layout)


def shard_bounds(
    seqlen: int, world_size: int, block_size: int, layout: Layout = "contiguous"
) -> list[list[tuple[int, int]]]:
    """The token ranges ``[(start, end), ...]`` of the sequence each rank holds, in sequence order.

    Shards are made of whole blocks (only the sequence's last block may be partial),
    so no block straddles two ranks. ``"contiguous"``: rank ``r`` holds one range, the
    blocks split as evenly as possible. ``"zigzag"``: the blocks are split into
    ``2 * world_size`` chunks and rank ``r`` holds chunks ``r`` and ``2 * world_size - 1 - r``,
    pairing an early chunk with a late one (ring attention's load balancing).
    Ranks may hold nothing when the sequence has fewer blocks than chunks.
    """
    if seqlen < 0:
        raise ValueError(f"seqlen: expected >= 0, got {seqlen}")
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    if block_size < 1:
        raise ValueError(f"block_size: expected >= 1, got {block_size}")
    layout = _check_layout(layout)
    n_blocks = -(-seqlen // block_size)
    chunks = world_size if layout == "contiguous" else 2 * world_size

    def chunk(i: int) -> tuple[int, int]:
        first, last = i * n_blocks // chunks, (i + 1) * n_blocks // chunks
        return min(first * block_size, seqlen), min(last * block_size, seqlen)

    if layout == "contiguous":
        return [[chunk(r)] for r in range(world_size)]
    return [[chunk(r), chunk(2 * world_size - 1 - r)] for r in range(world_size)]


class _Chunk(NamedTuple):
    """A contiguous run of whole blocks of one sequence, held by one rank."""

    seq_start: int  # the sequence's first token in the packed batch
    start: int  # the chunk's token range, relative to the sequence
    end: int
    block_base: int  # the batch-wide index of the sequence's first block


def _seqlens_of(cu_seqlens: Tensor | Sequence[int]) -> list[int]:
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if not cu or cu[0] != 0 or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets starting at 0, got {cu}")
    return [b - a for a, b in itertools.pairwise(cu)]


def _layout(
    seqlens: list[int], world_size: int, block_size: int, layout: Layout
) -> list[list[_Chunk]]:
    """Per rank, its chunks in its local order: sequence by sequence, each per shard_bounds."""
    chunks: list[list[_Chunk]] = [[] for _ in range(world_size)]
    seq_start = block_base = 0
    for length in seqlens:
        for rank, bounds in enumerate(shard_bounds(length, world_size, block_size, layout)):
            chunks[rank] += [_Chunk(seq_start, s, e, block_base) for s, e in bounds]
        seq_start += length
        block_base += -(-length // block_size)
    return chunks


def shard(
    x: Tensor,
    rank: int,
    world_size: int,
    block_size: int,
    layout: Layout = "contiguous",
    *,
    cu_seqlens: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """Rank ``rank``'s shard of ``x`` along dim 0, per :func:`shard_bounds`.

    ``x`` is one whole sequence, or with ``cu_seqlens`` a packed batch whose every
    sequence is sharded on its own (the shard holds its pieces sequence by sequence).
    """
    seqlens = [x.shape[0]] if cu_seqlens is None else _seqlens_of(cu_seqlens)
    chunks = _layout(seqlens, world_size, block_size, _check_layout(layout))[rank]
    return torch.cat([x[c.seq_start + c.start : c.seq_start + c.end] for c in chunks], dim=0)


def unshard(
    shards: Sequence[Tensor],
    block_size: int,
    layout: Layout = "contiguous",
    *,
    cu_seqlens: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """The whole sequence (or packed batch) from every rank's shard, in rank order:
    the inverse of :func:`shard`."""
    total = sum(s.shape[0] for s in shards)
    seqlens = [total] if cu_seqlens is None else _seqlens_of(cu_seqlens)
    all_chunks = _layout(seqlens, len(shards), block_size, _check_layout(layout))
    pieces: list[tuple[int, Tensor]] = []
    for rank, (chunks, local) in enumerate(zip(all_chunks, shards, strict=True)):
        offset = 0
        for c in chunks:
            pieces.append((c.seq_start + c.start, local[offset : offset + c.end - c.start]))
            offset += c.end - c.start
        if offset != local.shape[0]:
            raise ValueError(
                f"shards: rank {rank} holds {local.shape[0]} tokens; expected {offset}"
            )
    return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=0)


# --------------------------------------------------------------------------
# Process group and arguments
# --------------------------------------------------------------------------


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "moba.distributed: torch.distributed is not initialized; "
            "call torch.distributed.init_process_group first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _resolve_seqlens(
    cu_seqlens: Tensor | Sequence[int] | None,
    seqlen: int | None,
    ref: Tensor,
    group: dist.ProcessGroup | None,
) -> list[int]:
    if cu_seqlens is not None:
        return _seqlens_of(cu_seqlens)
    if seqlen is not None:
        return [int(seqlen)]
    total = torch.tensor([ref.shape[0]], dtype=torch.int64, device=ref.device)
    dist.all_reduce(total, group=group)
    return [int(total.item())]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, chunks: list[_Chunk], rank: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "q_local, k_local, v_local: expected 3-D tensors [tokens, heads, head_dim]"
        )
    expected = sum(c.end - c.start for c in chunks)
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if t.shape[0] != expected:
            raise ValueError(
                f"{name}: rank {rank} must hold {expected} tokens (see moba.distributed.shard), "
                f"got {t.shape[0]}"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"v_local: expected the shape of k_local {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q_local: expected head_dim {k.shape[2]} and a multiple of {k.shape[1]} heads, "
            f"got {tuple(q.shape)}"
        )


# --------------------------------------------------------------------------
# Context parallelism
# --------------------------------------------------------------------------


def _block_means(k: Tensor, chunks: list[_Chunk], block_size: int) -> Tensor:
    """[local blocks, Hkv, D] means of the local blocks (fp32 sums, rounded to k's dtype)."""
    means: list[Tensor] = []
    offset = 0
    for c in chunks:
        length = c.end - c.start
        n = -(-length // block_size)
        padded = k.new_zeros((n * block_size, *k.shape[1:]), dtype=torch.float32)
        padded[:length] = k[offset : offset + length].float()
        counts = (length - torch.arange(n, device=k.device) * block_size).clamp(max=block_size)
        means.append(padded.view(n, block_size, *k.shape[1:]).sum(1) / counts[:, None, None])
        offset += length
    return torch.cat(means).to(k.dtype)


def _candidate_blocks(
    q: Tensor,
    means: Tensor,
    chunk_start: int,
    block_size: int,
    top_k: int,
    gqa_shared_routing: bool,
) -> Tensor:
    """bool [Hkv, chunk_start // block_size]: per kv head, the blocks before a chunk that
    the chunk's queries of its query heads select.

    ``q`` are the chunk's queries, ``means`` its sequence's block means. Each query is
    ranked against all its past blocks (those inside the chunk included, which may
    outscore earlier ones), so the result is the exact selection, plus blocks scoring
    within a small margin of a query's (top_k - 1)-th best past score: a different
    summation order in the op cannot make it select a block that was not fetched.
    """
    first_block = chunk_start // block_size
    heads_q, heads_kv = q.shape[1], means.shape[1]
    needed = torch.zeros((heads_kv, first_block), dtype=torch.bool, device=q.device)
    if first_block == 0 or top_k == 1 or q.shape[0] == 0:
        return needed
    group = heads_q // heads_kv
    last_past = (chunk_start + q.shape[0] - 1) // block_size  # the last query's current block
    past_means = means[:last_past].float().repeat_interleave(group, dim=1)  # [nb, Hq, D]
    scale = past_means.abs().amax(dim=(0, 2))  # [Hq]
    kept = min(top_k - 1, last_past)
    blocks = torch.arange(last_past, device=q.device)
    for lo in range(0, q.shape[0], _ROUTING_SLICE):
        qs = q[lo : lo + _ROUTING_SLICE].float()
        current = (chunk_start + lo + torch.arange(qs.shape[0], device=q.device)) // block_size
        past = blocks[None, :] < current[:, None]  # [Lq, nb]
        scores = torch.einsum("qhd,nhd->hqn", qs, past_means)  # [Hq, Lq, nb]
        margin = qs.abs().sum(-1).T * scale[:, None] * _SCORE_MARGIN  # [Hq, Lq]
        if gqa_shared_routing:
            scores = scores.view(heads_kv, group, *scores.shape[1:]).sum(1)
            margin = margin.view(heads_kv, group, -1).sum(1)
        nan = torch.isnan(scores)
        finite = scores.masked_fill(nan | ~past, float("-inf"))
        threshold = finite.topk(kept, dim=-1).values[..., -1:]  # [H, Lq, 1]; -inf: take all
        selectable = past & ((finite >= threshold - margin[..., None]) | nan)  # [H, Lq, nb]
        per_kv = selectable.any(1).view(heads_kv, -1, last_past).any(1)  # [Hkv, nb]
        needed |= per_kv[:, :first_block]
    return needed


def _owners(
    all_chunks: list[list[_Chunk]], block_size: int, n_blocks: int
) -> tuple[list[int], list[int]]:
    """For each block of the batch: the rank holding it and its first token in that rank's shard."""
    owner = [0] * n_blocks
    local_start = [0] * n_blocks
    for rank, chunks in enumerate(all_chunks):
        offset = 0
        for c in chunks:
            for b in range(c.start // block_size, -(-c.end // block_size)):
                owner[c.block_base + b] = rank
                local_start[c.block_base + b] = offset + b * block_size - c.start
            offset += c.end - c.start
    return owner, local_start


def _token_index(starts: list[int], block_size: int, device: torch.device) -> Tensor:
    if not starts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    base = torch.tensor(starts, dtype=torch.int64, device=device)
    return (base[:, None] + torch.arange(block_size, device=device)).flatten()


def _split_range(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` items split into ``parts`` contiguous, near-equal ranges."""
    return [(i * count // parts, (i + 1) * count // parts) for i in range(parts)]


class _Stage(NamedTuple):
    """One kv-head group of a rank's context-parallel problem: its fetch and its keys.

    The op runs on this rank's queries of the group's query heads against, per local
    chunk, [the chunk's candidate past blocks for these heads, in sequence order] +
    [the chunk]: a chunked-prefill problem whose routing equals the whole sequence's.
    """

    kv_heads: tuple[int, int]  # [first, last) kv heads
    q_heads: tuple[int, int]  # the query heads that read them
    send_index: Tensor  # local token rows sent, rank after rank
    send_splits: list[int]
    recv_splits: list[int]
    key_index: Tensor  # rows of [local tokens ; received tokens] forming the keys
    cu_seqlens_k: Tensor
    max_seqlen_k: int
    block_maps: list[list[int]]  # per local chunk: the sequence's index of each key block
    fetched_blocks: list[int]  # batch-wide indices of the remote blocks received


class _Plan(NamedTuple):
    stages: list[_Stage]
    cu_seqlens_q: Tensor
    max_seqlen_q: int
    max_seqlen: int  # the longest sequence of the batch


def _plan(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    block_size: int,
    top_k: int,
    cu_seqlens: Tensor | Sequence[int] | None,
    seqlen: int | None,
    gqa_shared_routing: bool,
    layout: str,
    group: dist.ProcessGroup | None,
    stages: int | None,
) -> _Plan:
    """Routes this rank's queries on the all-gathered block means and plans the fetches."""
    rank, world = _group_info(group)
    if block_size < 1 or top_k < 1:
        raise ValueError(f"moba_chunk_size, moba_topk: expected >= 1, got {block_size}, {top_k}")
    if stages is not None and stages < 1:
        raise ValueError(f"overlap_stages: expected >= 1 or None, got {stages}")
    seqlens = _resolve_seqlens(cu_seqlens, seqlen, q_local, group)
    all_chunks = _layout(seqlens, world, block_size, _check_layout(layout))
    chunks = all_chunks[rank]
    _check_inputs(q_local, k_local, v_local, chunks, rank)
    device = q_local.device
    heads_q, heads_kv, dim = q_local.shape[1], k_local.shape[1], k_local.shape[2]
    group_size = heads_q // heads_kv
    n_stages = min(heads_kv, _DEFAULT_STAGES if stages is None else stages)
    head_ranges = _split_range(heads_kv, n_stages)
    n_blocks = sum(-(-length // block_size) for length in seqlens)

    # 1. Block means of every rank, in batch order (tiny: all-gathered, padded).
    blocks_of = [sum(-(-(c.end - c.start) // block_size) for c in cs) for cs in all_chunks]
    width = max(max(blocks_of), 1)
    with torch.no_grad():
        local_means = k_local.new_zeros((width, heads_kv, dim))
        local_means[: blocks_of[rank]] = _block_means(k_local.detach(), chunks, block_size)
        gathered = [torch.empty_like(local_means) for _ in range(world)]
        dist.all_gather(gathered, local_means, group=group)
        means = k_local.new_empty((n_blocks, heads_kv, dim))
        for r, rank_chunks in enumerate(all_chunks):
            used = 0
            for c in rank_chunks:
                first = c.block_base + c.start // block_size
                count = -(-(c.end - c.start) // block_size)
                means[first : first + count] = gathered[r][used : used + count]
                used += count

        # 2. Route this rank's queries: per kv head, the past blocks each local chunk
        #    may select; a stage needs the union over its kv heads.
        chunk_needs: list[Tensor] = []  # per chunk: bool [stages, blocks before it]
        request = torch.zeros((n_stages, n_blocks), dtype=torch.bool, device=device)
        offset = 0
        for c in chunks:
            need = _candidate_blocks(
                q_local.detach()[offset : offset + c.end - c.start],
                means[c.block_base :],
                c.start,
                block_size,
                top_k,
                gqa_shared_routing,
            )
            per_stage = torch.stack([need[lo:hi].any(0) for lo, hi in head_ranges])
            request[:, c.block_base : c.block_base + need.shape[1]] |= per_stage
            chunk_needs.append(per_stage)
            offset += c.end - c.start
        owner, local_start = _owners(all_chunks, block_size, n_blocks)
        request &= torch.tensor(owner, device=device) != rank
        plans = [torch.empty_like(request, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(plans, request.to(torch.uint8), group=group)
        plan = [p.bool().tolist() for p in plans]  # [rank][stage][block]
        needs = [n.cpu().tolist() for n in chunk_needs]  # [chunk][stage][block]

    # 3. Per stage: who sends what to whom, and the keys of the constructed problem.
    n_local = q_local.shape[0]
    planned: list[_Stage] = []
    for s, (lo, hi) in enumerate(head_ranges):
        send_starts: list[int] = []
        send_splits: list[int] = []
        recv_splits: list[int] = []
        recv_blocks: list[int] = []
        for r in range(world):
            mine_for_r = [b for b in range(n_blocks) if plan[r][s][b] and owner[b] == rank]
            send_starts += [local_start[b] for b in mine_for_r]
            send_splits.append(len(mine_for_r) * block_size)
            theirs = [b for b in range(n_blocks) if plan[rank][s][b] and owner[b] == r]
            recv_blocks += theirs
            recv_splits.append(len(theirs) * block_size)
        pool_start = {b: n_local + i * block_size for i, b in enumerate(recv_blocks)}
        key_index: list[Tensor] = []
        block_maps: list[list[int]] = []
        cu_k = [0]
        offset = 0
        for c, chunk_need in zip(chunks, needs, strict=True):
            need_list = [c.block_base + b for b, wanted in enumerate(chunk_need[s]) if wanted]
            starts = [local_start[b] if owner[b] == rank else pool_start[b] for b in need_list]
            key_index.append(_token_index(starts, block_size, device))
            key_index.append(torch.arange(offset, offset + c.end - c.start, device=device))
            # Block indices within the sequence, as moba.routing reports them.
            block_maps.append(
                [b - c.block_base for b in need_list]
                + list(range(c.start // block_size, -(-c.end // block_size)))
            )
            offset += c.end - c.start
            cu_k.append(cu_k[-1] + len(starts) * block_size + c.end - c.start)
        planned.append(
            _Stage(
                kv_heads=(lo, hi),
                q_heads=(lo * group_size, hi * group_size),
                send_index=_token_index(send_starts, block_size, device),
                send_splits=send_splits,
                recv_splits=recv_splits,
                key_index=(
                    torch.cat(key_index)
                    if key_index
                    else torch.zeros(0, dtype=torch.int64, device=device)
                ),
                cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
                max_seqlen_k=max((b - a for a, b in itertools.pairwise(cu_k)), default=0),
                block_maps=block_maps,
                fetched_blocks=recv_blocks,
            )
        )
    cu_q = [0, *itertools.accumulate(c.end - c.start for c in chunks)]
    return _Plan(
        stages=planned,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        max_seqlen_q=max((b - a for a, b in itertools.pairwise(cu_q)), default=0),
        max_seqlen=max(seqlens, default=0),
    )


class _InFlight(NamedTuple):
    """An all-to-all started with ``async_op=True``: its buffers must live until it is waited on."""

    work: Any  # dist.Work, or None when nothing moved
    sent: Tensor
    received: Tensor

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        return self.received


def _start_all_to_all(
    send: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
) -> _InFlight:
    """Starts ``all_to_all_single`` (rows ``send_splits[r]`` to rank ``r``) without waiting.

    NCCL needs contiguous tensors on the ranks' devices; both are made here. Every rank
    calls this for every exchange, in the same order, even with nothing to move.
    """
    send = send.contiguous()
    received = send.new_empty((sum(recv_splits), *send.shape[1:]))
    work = dist.all_to_all_single(
        received, send, recv_splits, send_splits, group=group, async_op=True
    )
    return _InFlight(work, send, received)


def _stage_keys(kv: Tensor, received: Tensor, stage: _Stage) -> Tensor:
    """[keys, kv heads of the stage, 2D]: the stage's constructed keys and values."""
    lo, hi = stage.kv_heads
    return torch.cat([kv[:, lo:hi], received], dim=0).index_select(0, stage.key_index)


class _OpOptions(NamedTuple):
    block_size: int
    top_k: int
    softmax_scale: float | None
    gqa_shared_routing: bool
    backend: str


class _ContextParallel(torch.autograd.Function):
    """The pipelined context-parallel attention: stage ``s + 1``'s fetch is in flight while
    the op runs on stage ``s``; the backward overlaps each stage's return of key/value
    gradients with the next stage's op backward."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: _Plan,
        options: _OpOptions,
        group: dist.ProcessGroup | None,
    ) -> tuple[Tensor, Tensor]:
        dim = k.shape[2]
        kv = torch.cat([k, v], dim=-1)  # [n_r, Hkv, 2D]: K and V travel together

        def start(stage: _Stage) -> _InFlight:
            lo, hi = stage.kv_heads
            send = kv[:, lo:hi].index_select(0, stage.send_index)
            return _start_all_to_all(send, stage.send_splits, stage.recv_splits, group)

        outs: list[Tensor] = []
        lses: list[Tensor] = []
        received: list[Tensor] = []
        in_flight = start(plan.stages[0])
        for i, stage in enumerate(plan.stages):
            following = start(plan.stages[i + 1]) if i + 1 < len(plan.stages) else None
            recv = in_flight.wait()
            keys = _stage_keys(kv, recv, stage)
            lo, hi = stage.q_heads
            out, lse = _attn_fwd(
                q[:, lo:hi].contiguous(),
                keys[..., :dim],
                keys[..., dim:],
                plan.cu_seqlens_q,
                stage.cu_seqlens_k,
                plan.max_seqlen_q,
                stage.max_seqlen_k,
                *options,
            )
            outs.append(out)
            lses.append(lse)
            received.append(recv)
            if following is not None:
                in_flight = following
        out = torch.cat(outs, dim=1)
        lse = torch.cat(lses, dim=0)
        ctx.save_for_backward(q, kv, out, lse, *received)
        ctx.plan, ctx.options, ctx.group = plan, options, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, kv, out, lse, *received = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dim = kv.shape[2] // 2
        n_local = kv.shape[0]
        dq = torch.empty_like(q)
        dkv = torch.zeros_like(kv)
        pending: tuple[_Stage, _InFlight] | None = None

        def finish(stage: _Stage, in_flight: _InFlight) -> None:
            # Gradients of the blocks this rank sent, summed over the ranks that read them.
            lo, hi = stage.kv_heads
            dkv[:, lo:hi].index_add_(0, stage.send_index, in_flight.wait())

        for stage, recv in zip(plan.stages, received, strict=True):
            keys = _stage_keys(kv, recv, stage)
            lo, hi = stage.q_heads
            dq_s, dk_s, dv_s = _attn_bwd(
                dout[:, lo:hi].contiguous(),
                q[:, lo:hi].contiguous(),
                keys[..., :dim],
                keys[..., dim:],
                out[:, lo:hi].contiguous(),
                lse[lo:hi].contiguous(),
                plan.cu_seqlens_q,
                stage.cu_seqlens_k,
                plan.max_seqlen_q,
                stage.max_seqlen_k,
                *ctx.options,
            )
            dq[:, lo:hi] = dq_s
            kv_lo, kv_hi = stage.kv_heads
            dpool = kv.new_zeros((n_local + recv.shape[0], kv_hi - kv_lo, 2 * dim))
            dpool.index_add_(0, stage.key_index, torch.cat([dk_s, dv_s], dim=-1))
            dkv[:, kv_lo:kv_hi] += dpool[:n_local]
            # The fetched blocks' gradients go back to their owners (the reverse exchange)
            # while the next stage's op backward runs.
            returning = _start_all_to_all(
                dpool[n_local:], stage.recv_splits, stage.send_splits, ctx.group
            )
            if pending is not None:
                finish(*pending)
            pending = (stage, returning)
        if pending is not None:
            finish(*pending)
        return dq, dkv[..., :dim], dkv[..., dim:], None, None, None


def context_parallel_attn(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    seqlen: int | None = None,
    softmax_scale: float | None = None,
    gqa_shared_routing: bool = False,
    layout: Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    overlap_stages: int | None = None,
    stats: dict[str, int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA of causal sequences sharded over the ranks of ``group``, by fetching selected blocks.

    ``q_local`` ``[n_r, Hq, D]`` and ``k_local``/``v_local`` ``[n_r, Hkv, D]`` are this rank's
    tokens as :func:`shard` cuts them (``moba_chunk_size``, ``layout``): of one sequence
    of length ``seqlen`` (one ``all_reduce`` finds it when omitted), or of every sequence of
    a packed batch when ``cu_seqlens`` (the whole batch's offsets, on any device) is given.
    Returns this rank's output ``[n_r, Hq, D]`` (and ``lse`` ``[Hq, n_r]`` float32, no
    gradient), equal to the matching rows of :func:`moba.moba_attn_varlen` on the whole
    batch, with the same routing. Every rank of ``group`` must call it with the same
    arguments.

    ``overlap_stages`` (default ``min(Hkv, 4)``) splits the kv heads into that many
    groups, each with its own fetch: the op runs on one group while the next group's
    blocks are in flight, and in the backward each group's key/value gradients travel
    back while the op's backward runs on the next. ``1`` is the unpipelined form.
    ``stats``, when given, receives ``stages``, ``fetched_blocks`` (remote blocks fetched
    for at least one kv head), ``fetched_bytes`` and ``sent_bytes``.

    Communication: one ``all_gather`` of block means (``n_blocks * Hkv * D`` elements),
    one of the fetch plan (``stages * n_blocks`` bytes per rank) and per stage one
    ``all_to_all_single`` of the candidate remote blocks' keys and values for its kv
    heads; the backward sends their gradients back with the reverse exchanges.
    """
    block_size, top_k = int(moba_chunk_size), int(moba_topk)
    _check_qkv(q_local, k_local, v_local, _FLOAT_DTYPES)
    options = _OpOptions(
        block_size,
        top_k,
        _check_scale(softmax_scale),
        bool(gqa_shared_routing),
        _check_backend(backend),
    )
    plan = _plan(
        q_local,
        k_local,
        v_local,
        block_size,
        top_k,
        cu_seqlens,
        seqlen,
        gqa_shared_routing,
        layout,
        group,
        overlap_stages,
    )
    if stats is not None:
        width = 2 * k_local.shape[2] * k_local.element_size()
        stats["stages"] = len(plan.stages)
        stats["fetched_blocks"] = len({b for s in plan.stages for b in s.fetched_blocks})
        stats["fetched_bytes"] = sum(
            sum(s.recv_splits) * (s.kv_heads[1] - s.kv_heads[0]) * width for s in plan.stages
        )
        stats["sent_bytes"] = sum(
            sum(s.send_splits) * (s.kv_heads[1] - s.kv_heads[0]) * width for s in plan.stages
        )
    out, lse = cast(
        tuple[Tensor, Tensor],
        _ContextParallel.apply(q_local, k_local, v_local, plan, options, group),
    )
    return (out, lse) if return_lse else out


def context_parallel_routing(
    q_local: Tensor,
    k_local: Tensor,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    seqlen: int | None = None,
    gqa_shared_routing: bool = False,
    layout: Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """The blocks this rank's queries select in :func:`context_parallel_attn`.

    ``[n_r, Hq, W]`` int32 block indices within each query's sequence, ascending, padded
    with -1, ``W`` as in :func:`moba.routing` on the whole batch (whose rows for this
    shard it equals).
    """
    block_size, top_k = int(moba_chunk_size), int(moba_topk)
    # One stage: the routing needs every kv head's keys at once (values are not moved).
    plan = _plan(
        q_local,
        k_local,
        k_local,
        block_size,
        top_k,
        cu_seqlens,
        seqlen,
        gqa_shared_routing,
        layout,
        group,
        1,
    )
    stage = plan.stages[0]
    send = k_local.detach().index_select(0, stage.send_index)
    received = _start_all_to_all(send, stage.send_splits, stage.recv_splits, group).wait()
    keys = torch.cat([k_local.detach(), received]).index_select(0, stage.key_index)
    local = routing(
        q_local.detach(),
        keys,
        plan.cu_seqlens_q,
        plan.max_seqlen_q,
        block_size,
        top_k,
        gqa_shared_routing=gqa_shared_routing,
        backend=backend,
        cu_seqlens_k=stage.cu_seqlens_k,
        max_seqlen_k=stage.max_seqlen_k,
    )
    width = max(1, min(top_k, -(-plan.max_seqlen // block_size)))
    out = torch.full((*q_local.shape[:2], width), -1, dtype=torch.int32, device=q_local.device)
    cu = plan.cu_seqlens_q.tolist()
    for chunk, block_map in enumerate(stage.block_maps):
        rows = local[cu[chunk] : cu[chunk + 1]].long()
        lookup = torch.tensor([*block_map, -1], dtype=torch.int32, device=q_local.device)
        mapped = lookup[torch.where(rows < 0, len(block_map), rows)]
        out[cu[chunk] : cu[chunk + 1], :, : mapped.shape[-1]] = mapped
    return out


# --------------------------------------------------------------------------
# Head parallelism
# --------------------------------------------------------------------------


def _batch_order(all_chunks: list[list[_Chunk]], device: torch.device) -> Tensor:
    """Index that reorders the rank-ordered concatenation of shards into batch order."""
    pieces: list[tuple[int, int, int]] = []  # (token in the batch, position in concat, length)
    position = 0
    for chunks in all_chunks:
        for c in chunks:
            pieces.append((c.seq_start + c.start, position, c.end - c.start))
            position += c.end - c.start
    index = [torch.arange(p, p + n, device=device) for _, p, n in sorted(pieces)]
    return torch.cat(index) if index else torch.zeros(0, dtype=torch.int64, device=device)


class _HeadStage(NamedTuple):
    """One kv-head group of head parallelism: rank ``j`` takes the ``j``-th slice of
    ``heads_q`` query heads and ``heads_kv`` kv heads of the group."""

    q_first: int  # the group's first query head
    kv_first: int  # the group's first kv head
    heads_q: int  # query heads per rank
    heads_kv: int  # kv heads per rank


class _HeadPlan(NamedTuple):
    stages: list[_HeadStage]
    lengths: list[int]  # tokens per rank
    order: Tensor  # rank-ordered concatenation of the shards -> batch order
    inverse: Tensor  # batch order -> rank-ordered concatenation
    cu_seqlens: Tensor
    max_seqlen: int
    rank: int
    world: int
    group: dist.ProcessGroup | None
    want_lse: bool


def _to_heads(parts: list[Tensor], plan: _HeadPlan) -> _InFlight:
    """Starts the sequence-shard -> head-shard exchange of ``parts`` ``[n_r, W * h_i, D_i]``,
    packed per token: rank ``j`` receives the ``j``-th head slice of every part."""
    world, n_local = plan.world, parts[0].shape[0]
    packed = torch.cat(
        [p.reshape(n_local, world, p.shape[1] // world * p.shape[2]) for p in parts], dim=-1
    )
    send = packed.transpose(0, 1).reshape(world * n_local, packed.shape[2])
    return _start_all_to_all(send, [n_local] * world, plan.lengths, plan.group)


def _from_heads(parts: list[Tensor], plan: _HeadPlan) -> _InFlight:
    """Starts the head-shard -> sequence-shard exchange of ``parts`` ``[total, h_i, D_i]``."""
    total = plan.order.numel()
    packed = torch.cat([p.reshape(total, p.shape[1] * p.shape[2]) for p in parts], dim=-1)
    local = plan.lengths[plan.rank]
    return _start_all_to_all(
        packed.index_select(0, plan.inverse), plan.lengths, [local] * plan.world, plan.group
    )


def _unpack_heads(received: Tensor, widths: list[int], plan: _HeadPlan) -> list[Tensor]:
    """The parts of a finished :func:`_to_heads` in batch order, ``[total, widths_i, D]``."""
    rows = received.index_select(0, plan.order)
    dim = rows.shape[1] // sum(widths)
    pieces = torch.split(rows, [w * dim for w in widths], dim=-1)
    return [p.reshape(rows.shape[0], w, dim) for p, w in zip(pieces, widths, strict=True)]


def _unpack_seq(received: Tensor, widths: list[int], plan: _HeadPlan) -> list[Tensor]:
    """The parts of a finished :func:`_from_heads`, ``[n_r, W * widths_i, D]``."""
    world, local = plan.world, plan.lengths[plan.rank]
    dim = received.shape[1] // sum(widths)
    per_token = received.view(world, local, received.shape[1]).transpose(0, 1)  # [n_r, W, width]
    pieces = torch.split(per_token, [w * dim for w in widths], dim=-1)
    return [p.reshape(local, world * w, dim) for p, w in zip(pieces, widths, strict=True)]


class _HeadParallel(torch.autograd.Function):
    """Head parallelism pipelined over kv-head groups: group ``s + 1``'s q/k/v exchange is
    in flight while the op runs on group ``s``, and group ``s``'s output travels back
    while the op runs on the next; the backward does the same with the output gradient
    going out and dq/dk/dv coming back."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: _HeadPlan,
        options: _OpOptions,
    ) -> tuple[Tensor, Tensor]:
        world = plan.world

        def start(st: _HeadStage) -> _InFlight:
            q_end, kv_end = st.q_first + st.heads_q * world, st.kv_first + st.heads_kv * world
            parts = [
                q[:, st.q_first : q_end],
                k[:, st.kv_first : kv_end],
                v[:, st.kv_first : kv_end],
            ]
            return _to_heads(parts, plan)

        saved: list[Tensor] = []
        out_flights: list[_InFlight] = []
        lse_flights: list[_InFlight] = []
        in_flight = start(plan.stages[0])
        for i, st in enumerate(plan.stages):
            following = start(plan.stages[i + 1]) if i + 1 < len(plan.stages) else None
            qh, kh, vh = _unpack_heads(
                in_flight.wait(), [st.heads_q, st.heads_kv, st.heads_kv], plan
            )
            out_h, lse_h = _attn_fwd(
                qh, kh, vh, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                *options,
            )  # fmt: skip
            out_flights.append(_from_heads([out_h], plan))
            if plan.want_lse:
                lse_flights.append(_from_heads([lse_h.T[..., None]], plan))
            saved += [qh, kh, vh, out_h, lse_h]
            if following is not None:
                in_flight = following
        out = torch.empty_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("nan"), device=q.device)
        for st, flight in zip(plan.stages, out_flights, strict=True):
            (part,) = _unpack_seq(flight.wait(), [st.heads_q], plan)
            out[:, st.q_first : st.q_first + st.heads_q * world] = part
        for st, flight in zip(plan.stages if plan.want_lse else [], lse_flights, strict=True):
            (part,) = _unpack_seq(flight.wait(), [st.heads_q], plan)
            lse[st.q_first : st.q_first + st.heads_q * world] = part[..., 0].T
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.options, ctx.kv_shape = plan, options, k.shape
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor | None, ...]:
        plan: _HeadPlan = ctx.plan
        world, saved = plan.world, ctx.saved_tensors
        dq = torch.empty_like(dout)
        dk = dout.new_empty(ctx.kv_shape)
        dv = dout.new_empty(ctx.kv_shape)

        def start(st: _HeadStage) -> _InFlight:
            return _to_heads([dout[:, st.q_first : st.q_first + st.heads_q * world]], plan)

        returning: list[_InFlight] = []
        in_flight = start(plan.stages[0])
        for i, st in enumerate(plan.stages):
            following = start(plan.stages[i + 1]) if i + 1 < len(plan.stages) else None
            (dout_h,) = _unpack_heads(in_flight.wait(), [st.heads_q], plan)
            qh, kh, vh, out_h, lse_h = saved[5 * i : 5 * i + 5]
            grads = _attn_bwd(
                dout_h, qh, kh, vh, out_h, lse_h, plan.cu_seqlens, plan.cu_seqlens,
                plan.max_seqlen, plan.max_seqlen, *ctx.options,
            )  # fmt: skip
            returning.append(_from_heads(list(grads), plan))
            if following is not None:
                in_flight = following
        for st, flight in zip(plan.stages, returning, strict=True):
            dq_p, dk_p, dv_p = _unpack_seq(
                flight.wait(), [st.heads_q, st.heads_kv, st.heads_kv], plan
            )
            dq[:, st.q_first : st.q_first + st.heads_q * world] = dq_p
            dk[:, st.kv_first : st.kv_first + st.heads_kv * world] = dk_p
            dv[:, st.kv_first : st.kv_first + st.heads_kv * world] = dv_p
        return dq, dk, dv, None, None


def head_parallel_attn(
    q_local: Tensor,
    k_local: Tensor,
    v_local: Tensor,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    seqlen: int | None = None,
    softmax_scale: float | None = None,
    gqa_shared_routing: bool = False,
    layout: Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    overlap_stages: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA of sharded sequences by head parallelism (the paper's approach).

    The same arguments and results as :func:`context_parallel_attn`. An all-to-all
    gives each rank the whole batch for ``Hq / world`` query heads and ``Hkv / world``
    kv heads (so ``Hkv`` must be a multiple of the world size), the op runs locally,
    and an all-to-all returns each rank its tokens for all heads. Communication per
    rank: ``(world - 1) / world`` of its tokens' ``(2 * Hq + 2 * Hkv) * D`` elements each
    way, forward and again backward; memory: the whole batch for a slice of heads.

    ``overlap_stages`` (a divisor of ``Hkv / world``; default the largest up to 4)
    pipelines the kv heads in that many groups: the next group's exchange is in flight
    while the op runs on the current one, and the current group's output travels back
    meanwhile (the backward likewise).
    """
    rank, world = _group_info(group)
    block_size = int(moba_chunk_size)
    if block_size < 1:
        raise ValueError(f"moba_chunk_size: expected >= 1, got {block_size}")
    _check_qkv(q_local, k_local, v_local, _FLOAT_DTYPES)
    options = _OpOptions(
        block_size,
        int(moba_topk),
        _check_scale(softmax_scale),
        bool(gqa_shared_routing),
        _check_backend(backend),
    )
    heads_q, heads_kv = q_local.shape[1], k_local.shape[1]
    if heads_kv % world != 0:
        raise ValueError(
            f"k_local: head parallelism needs the kv heads ({heads_kv}) to be a multiple "
            f"of the world size ({world}); use context_parallel_attn"
        )
    per_rank = heads_kv // world
    if overlap_stages is None:
        n_stages = max(s for s in range(1, min(per_rank, _DEFAULT_STAGES) + 1) if per_rank % s == 0)
    elif overlap_stages < 1 or per_rank % overlap_stages != 0:
        raise ValueError(
            f"overlap_stages: expected a divisor of Hkv / world = {per_rank}, got {overlap_stages}"
        )
    else:
        n_stages = overlap_stages
    seqlens = _resolve_seqlens(cu_seqlens, seqlen, q_local, group)
    all_chunks = _layout(seqlens, world, block_size, _check_layout(layout))
    _check_inputs(q_local, k_local, v_local, all_chunks[rank], rank)
    device = q_local.device
    order = _batch_order(all_chunks, device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    group_size = heads_q // heads_kv
    kv_per_stage = heads_kv // n_stages
    plan = _HeadPlan(
        stages=[
            _HeadStage(
                q_first=s * kv_per_stage * group_size,
                kv_first=s * kv_per_stage,
                heads_q=kv_per_stage // world * group_size,
                heads_kv=kv_per_stage // world,
            )
            for s in range(n_stages)
        ],
        lengths=[sum(c.end - c.start for c in chunks) for chunks in all_chunks],
        order=order,
        inverse=inverse,
        cu_seqlens=torch.tensor(
            [0, *itertools.accumulate(seqlens)], dtype=torch.int32, device=device
        ),
        max_seqlen=max(seqlens, default=0),
        rank=rank,
        world=world,
        group=group,
        want_lse=return_lse,
    )
    out, lse = cast(
        tuple[Tensor, Tensor], _HeadParallel.apply(q_local, k_local, v_local, plan, options)
    )
    return (out, lse) if return_lse else out
