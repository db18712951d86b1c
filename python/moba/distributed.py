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
  change). The backward is the op's, with the adjoint all-to-all returning the
  key/value gradients to the ranks that own the blocks.
* :func:`head_parallel_attn` -- the paper's approach: an all-to-all turns the
  sequence shards into head shards, each rank runs the op on the full sequences
  for its heads, and a second all-to-all turns the output back.

Both are differentiable (``torch.autograd``) and exact: the same routing, the
output and gradients of the single-process op within floating-point rounding.
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

from ._ops import moba_attn_varlen, routing

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
# Differentiable collectives
# --------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; its adjoint is the reverse exchange."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.exchange = (send_splits, recv_splits, group)
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        send_splits, recv_splits, group = ctx.exchange
        return _all_to_all(grad, recv_splits, send_splits, group), None, None, None


def _exchange(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> Tensor:
    """Differentiable all-to-all: rows ``send_splits[r]`` of ``x`` go to rank ``r``, in order."""
    return cast(Tensor, _AllToAll.apply(x, send_splits, recv_splits, group))


def _all_to_all(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


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
    """bool [chunk_start // block_size]: the blocks before a chunk that its queries select.

    ``q`` are the chunk's queries, ``means`` its sequence's block means. Each query is
    ranked against all its past blocks (those inside the chunk included, which may
    outscore earlier ones), so the result is the exact selection, plus blocks scoring
    within a small margin of a query's (top_k - 1)-th best past score: a different
    summation order in the op cannot make it select a block that was not fetched.
    """
    first_block = chunk_start // block_size
    needed = torch.zeros(first_block, dtype=torch.bool, device=q.device)
    if first_block == 0 or top_k == 1 or q.shape[0] == 0:
        return needed
    heads_q, heads_kv = q.shape[1], means.shape[1]
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
        selectable = past & ((finite >= threshold - margin[..., None]) | nan)
        needed |= selectable.flatten(0, 1).any(0)[:first_block]
    return needed
    heads_q, heads_kv = q.shape[1], means.shape[1]
    group = heads_q // heads_kv
    past_means = means[:first_block].float().repeat_interleave(group, dim=1)  # [nb, Hq, D]
    scale = past_means.abs().amax(dim=(0, 2))  # [Hq]
    kept = min(top_k - 1, first_block)
    for lo in range(0, q.shape[0], _ROUTING_SLICE):
        qs = q[lo : lo + _ROUTING_SLICE].float()
        scores = torch.einsum("qhd,nhd->hqn", qs, past_means)  # [Hq, Lq, nb]
        margin = qs.abs().sum(-1).T * scale[:, None] * _SCORE_MARGIN  # [Hq, Lq]
        if gqa_shared_routing:
            scores = scores.view(heads_kv, group, *scores.shape[1:]).sum(1)
            margin = margin.view(heads_kv, group, -1).sum(1)
        nan = torch.isnan(scores)
        finite = scores.masked_fill(nan, float("-inf"))
        threshold = finite.topk(kept, dim=-1).values[..., -1:]  # [H, Lq, 1]
        selectable = (finite >= threshold - margin[..., None]) | nan
        needed |= selectable.flatten(0, 1).any(0)
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


class _Constructed(NamedTuple):
    """A rank's chunked-prefill problem: its queries against [candidate blocks] + [its chunks]."""

    k: Tensor
    v: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_maps: list[list[int]]  # per local chunk: the sequence's index of each constructed block
    max_seqlen: int  # the longest sequence of the batch


def _construct(
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
    stats: dict[str, int] | None,
) -> _Constructed:
    rank, world = _group_info(group)
    if block_size < 1 or top_k < 1:
        raise ValueError(f"moba_chunk_size, moba_topk: expected >= 1, got {block_size}, {top_k}")
    seqlens = _resolve_seqlens(cu_seqlens, seqlen, q_local, group)
    all_chunks = _layout(seqlens, world, block_size, _check_layout(layout))
    chunks = all_chunks[rank]
    _check_inputs(q_local, k_local, v_local, chunks, rank)
    device = q_local.device
    heads_kv, dim = k_local.shape[1], k_local.shape[2]
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

        # 2. Route this rank's queries: the past blocks each local chunk may select.
        chunk_needs: list[list[int]] = []
        request = torch.zeros(n_blocks, dtype=torch.bool, device=device)
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
            request[c.block_base : c.block_base + need.shape[0]] |= need
            chunk_needs.append((need.nonzero().flatten() + c.block_base).tolist())
            offset += c.end - c.start
        owner, local_start = _owners(all_chunks, block_size, n_blocks)
        request &= torch.tensor(owner, device=device) != rank
        plans = [torch.empty_like(request, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(plans, request.to(torch.uint8), group=group)
        plan = [p.bool().tolist() for p in plans]

    # 3. Fetch: one all_to_all of the requested blocks' K and V (packed together).
    kv_local = torch.cat([k_local, v_local], dim=-1)  # [n_r, Hkv, 2D]
    send_starts: list[int] = []
    send_splits: list[int] = []
    recv_splits: list[int] = []
    recv_blocks: list[int] = []
    for r in range(world):
        mine_for_r = [b for b in range(n_blocks) if plan[r][b] and owner[b] == rank]
        send_starts += [local_start[b] for b in mine_for_r]
        send_splits.append(len(mine_for_r) * block_size)
        theirs = [b for b in range(n_blocks) if plan[rank][b] and owner[b] == r]
        recv_blocks += theirs
        recv_splits.append(len(theirs) * block_size)
    send = kv_local.index_select(0, _token_index(send_starts, block_size, device))
    received = _exchange(send, send_splits, recv_splits, group)
    if stats is not None:
        stats["fetched_blocks"] = len(recv_blocks)
        stats["fetched_bytes"] = received.numel() * received.element_size()
        stats["sent_bytes"] = send.numel() * send.element_size()

    # 4. Per local chunk, keys = [its candidate past blocks in sequence order] +
    #    [the chunk]; its queries are the chunk, i.e. the last positions.
    pool = torch.cat([kv_local, received], dim=0)
    pool_start = {b: kv_local.shape[0] + i * block_size for i, b in enumerate(recv_blocks)}
    key_index: list[Tensor] = []
    block_maps: list[list[int]] = []
    cu_q, cu_k = [0], [0]
    offset = 0
    for c, need_list in zip(chunks, chunk_needs, strict=True):
        starts = [local_start[b] if owner[b] == rank else pool_start[b] for b in need_list]
        key_index.append(_token_index(starts, block_size, device))
        key_index.append(torch.arange(offset, offset + c.end - c.start, device=device))
        # Block indices within the sequence, as moba.routing reports them.
        block_maps.append(
            [b - c.block_base for b in need_list]
            + list(range(c.start // block_size, -(-c.end // block_size)))
        )
        offset += c.end - c.start
        cu_q.append(offset)
        cu_k.append(cu_k[-1] + len(starts) * block_size + c.end - c.start)
    keys = pool.index_select(0, torch.cat(key_index))
    return _Constructed(
        k=keys[..., :dim],
        v=keys[..., dim:],
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=max((b - a for a, b in itertools.pairwise(cu_q)), default=0),
        max_seqlen_k=max((b - a for a, b in itertools.pairwise(cu_k)), default=0),
        block_maps=block_maps,
        max_seqlen=max(seqlens, default=0),
    )


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
    arguments. ``stats``, when given, receives the blocks and bytes this rank fetched and sent.

    Communication: one ``all_gather`` of block means (``n_blocks * Hkv * D`` elements),
    one of the fetch plan (``n_blocks`` bytes per rank) and one ``all_to_all_single`` of the
    candidate remote blocks' keys and values; the backward sends their gradients back
    with the reverse ``all_to_all_single``.
    """
    problem = _construct(
        q_local,
        k_local,
        v_local,
        int(moba_chunk_size),
        int(moba_topk),
        cu_seqlens,
        seqlen,
        gqa_shared_routing,
        layout,
        group,
        stats,
    )
    return moba_attn_varlen(  # type: ignore[call-overload, no-any-return]
        q_local,
        problem.k,
        problem.v,
        problem.cu_seqlens_q,
        problem.max_seqlen_q,
        int(moba_chunk_size),
        int(moba_topk),
        softmax_scale=softmax_scale,
        return_lse=return_lse,
        gqa_shared_routing=gqa_shared_routing,
        backend=backend,
        cu_seqlens_k=problem.cu_seqlens_k,
        max_seqlen_k=problem.max_seqlen_k,
    )


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
    problem = _construct(
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
        None,
    )
    local = routing(
        q_local.detach(),
        problem.k.detach(),
        problem.cu_seqlens_q,
        problem.max_seqlen_q,
        block_size,
        top_k,
        gqa_shared_routing=gqa_shared_routing,
        backend=backend,
        cu_seqlens_k=problem.cu_seqlens_k,
        max_seqlen_k=problem.max_seqlen_k,
    )
    width = max(1, min(top_k, -(-problem.max_seqlen // block_size)))
    out = torch.full((*q_local.shape[:2], width), -1, dtype=torch.int32, device=q_local.device)
    cu = problem.cu_seqlens_q.tolist()
    for chunk, block_map in enumerate(problem.block_maps):
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


def _seq_to_heads(
    x: Tensor, lengths: list[int], world: int, order: Tensor, group: dist.ProcessGroup | None
) -> Tensor:
    """[n_r, H, ...] sequence shard -> [total, H / world, ...]: this rank's heads, in order."""
    heads = x.shape[1] // world
    # [world, n_r, h, ...]: the slice of heads each rank receives, one after another.
    per_rank = x.reshape(x.shape[0], world, heads, *x.shape[2:]).transpose(0, 1)
    send = per_rank.reshape(world * x.shape[0], heads, *x.shape[2:])
    recv = _exchange(send, [x.shape[0]] * world, lengths, group)
    return recv.index_select(0, order)


def _heads_to_seq(
    y: Tensor,
    lengths: list[int],
    rank: int,
    world: int,
    inverse: Tensor,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """The inverse of :func:`_seq_to_heads`."""
    send = y.index_select(0, inverse)  # rank-ordered shards
    local = lengths[rank]
    recv = _exchange(send, lengths, [local] * world, group)  # [world * n_r, h, ...]
    per_rank = recv.view(world, local, *y.shape[1:]).transpose(0, 1)
    return per_rank.reshape(local, world * y.shape[1], *y.shape[2:])


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
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA of sharded sequences by head parallelism (the paper's approach).

    The same arguments and results as :func:`context_parallel_attn`. An all-to-all
    gives each rank the whole batch for ``Hq / world`` query heads and ``Hkv / world``
    kv heads (so ``Hkv`` must be a multiple of the world size), the op runs locally,
    and an all-to-all returns each rank its tokens for all heads. Communication per
    rank: ``(world - 1) / world`` of its tokens' ``(2 * Hq + 2 * Hkv) * D`` elements each
    way, forward and again backward; memory: the whole batch for a slice of heads.
    """
    rank, world = _group_info(group)
    block_size = int(moba_chunk_size)
    if block_size < 1:
        raise ValueError(f"moba_chunk_size: expected >= 1, got {block_size}")
    seqlens = _resolve_seqlens(cu_seqlens, seqlen, q_local, group)
    all_chunks = _layout(seqlens, world, block_size, _check_layout(layout))
    _check_inputs(q_local, k_local, v_local, all_chunks[rank], rank)
    if k_local.shape[1] % world != 0:
        raise ValueError(
            f"k_local: head parallelism needs the kv heads ({k_local.shape[1]}) to be a multiple "
            f"of the world size ({world}); use context_parallel_attn"
        )
    device = q_local.device
    lengths = [sum(c.end - c.start for c in chunks) for chunks in all_chunks]
    order = _batch_order(all_chunks, device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    q, k, v = (_seq_to_heads(t, lengths, world, order, group) for t in (q_local, k_local, v_local))
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32, device=device)
    out, lse = moba_attn_varlen(
        q,
        k,
        v,
        cu,
        max(seqlens, default=0),
        block_size,
        moba_topk,
        softmax_scale=softmax_scale,
        return_lse=True,
        gqa_shared_routing=gqa_shared_routing,
        backend=backend,
    )
    out_local = _heads_to_seq(out, lengths, rank, world, inverse, group)
    if not return_lse:
        return out_local
    with torch.no_grad():
        lse_local = _heads_to_seq(lse.T.contiguous(), lengths, rank, world, inverse, group)
    return out_local, lse_local.T.contiguous()
