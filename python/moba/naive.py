"""MoBA written plainly in PyTorch: materializes the mask, loops over sequences.

This is for teaching and for cross-checking the native op: it follows the
specification step by step (blocks, block means rounded to the input dtype,
gate scores, causal top-k with ties toward the lower block index and NaN scores
ranked lowest, one softmax over the selected keys). It is differentiable by
autograd (the routing is computed on detached tensors, so, as in the original,
no gradient flows through it) and, unlike the native op, also accepts float64,
which makes ``torch.autograd.gradcheck`` possible.

Memory is O(Hq * Lq * Lk) per sequence: keep it to small inputs.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from ._ops import _check_problem, _check_qkv, _check_scale, _routing_width

_NAIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scores and softmax statistics are fp32 (the spec); fp64 inputs stay fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_means(k: Tensor, block_size: int) -> Tensor:
    """[n, Hkv, D] means of each block's keys, summed in fp32, rounded to k's dtype."""
    length, heads, dim = k.shape
    n = -(-length // block_size)
    acc = _accumulation_dtype(k.dtype)
    padded = k.new_zeros((n * block_size, heads, dim), dtype=acc)
    padded[:length] = k.to(acc)
    sums = padded.view(n, block_size, heads, dim).sum(dim=1)
    starts = torch.arange(n, device=k.device) * block_size
    counts = (length - starts).clamp(max=block_size).to(acc)
    means = sums / counts[:, None, None]
    # The original rounds the means to the input dtype, so that q·kbar is a
    # product of two input-dtype values (exact on tensor cores).
    return means.to(k.dtype).to(acc)


def _select(
    q: Tensor,
    k: Tensor,
    q_offset: int,
    block_size: int,
    top_k: int,
    gqa_shared_routing: bool,
) -> Tensor:
    """Selection mask [Hq, Lq, n] of one sequence: True where a query attends to a block."""
    len_q, heads_q, _ = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    acc = _accumulation_dtype(q.dtype)
    means = _block_means(k, block_size)  # [n, Hkv, D]
    n = means.shape[0]
    means_per_q_head = means.repeat_interleave(
        group, dim=1
    )  # query head h reads kv head h // group
    scores = torch.einsum("qhd,nhd->hqn", q.to(acc), means_per_q_head)  # [Hq, Lq, n]
    if gqa_shared_routing:
        shared = scores.view(heads_kv, group, len_q, n).sum(dim=1, keepdim=True)
        scores = shared.expand(heads_kv, group, len_q, n).reshape(heads_q, len_q, n)

    blocks = torch.arange(n, device=q.device)
    current = (q_offset + torch.arange(len_q, device=q.device)) // block_size  # [Lq]
    past = blocks[None, :] < current[:, None]  # [Lq, n]
    nan = torch.isnan(scores)
    # Rank the blocks: past blocks with a number first (by score, descending),
    # then past blocks scoring NaN, then the rest; equal scores keep the block
    # order. Two stable sorts make that lexicographic order.
    category = torch.where(past, nan.long(), torch.full_like(nan, 2, dtype=torch.long))
    ordered_scores = torch.where(nan | ~past, torch.zeros_like(scores), scores)
    by_score = torch.sort(ordered_scores, dim=-1, descending=True, stable=True).indices
    by_category = torch.sort(category.gather(-1, by_score), dim=-1, stable=True).indices
    ranked = by_score.gather(-1, by_category)  # block indices, best first
    rank = torch.empty_like(ranked).scatter_(-1, ranked, blocks.expand_as(ranked).contiguous())
    # The first `current` ranks are exactly the past blocks; keep the best K - 1.
    kept_past = torch.clamp(current, max=top_k - 1)  # [Lq]
    chosen_past = past & (rank < kept_past[:, None])
    return chosen_past | (blocks[None, :] == current[:, None])


def _sequences(cu_q: Tensor, cu_k: Tensor) -> list[tuple[int, int, int, int]]:
    bounds_q = cu_q.tolist()
    bounds_k = cu_k.tolist()
    seqs = []
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 < q0 or k1 < k0:
            raise ValueError(f"cu_seqlens: must be non-decreasing (sequence {b})")
        if q1 - q0 > k1 - k0:
            raise ValueError(
                f"cu_seqlens: sequence {b} has {q1 - q0} queries but only {k1 - k0} keys; "
                "expected len_q <= len_k (queries are the last positions)"
            )
        seqs.append((q0, q1, k0, k1))
    return seqs


def _check_totals(q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor) -> None:
    if int(cu_q[0]) != 0 or int(cu_k[0]) != 0:
        raise ValueError("cu_seqlens: must start at 0")
    if int(cu_q[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens: last entry must equal total_q = {q.shape[0]}")
    if int(cu_k[-1]) != k.shape[0]:
        raise ValueError(f"cu_seqlens_k: last entry must equal total_k = {k.shape[0]}")


@overload
def moba_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = ...,
    return_lse: Literal[False] = ...,
    gqa_shared_routing: bool = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_k: int | None = ...,
) -> Tensor: ...


@overload
def moba_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = ...,
    return_lse: Literal[True],
    gqa_shared_routing: bool = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_k: int | None = ...,
) -> tuple[Tensor, Tensor]: ...


def moba_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    gqa_shared_routing: bool = False,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA by masking dense attention: the same arguments and results as
    :func:`moba.moba_attn_varlen` (``backend`` aside), in pure PyTorch.

    Scores, softmax and the output accumulate in float32 (float64 for float64
    inputs); ``out`` is returned in q's dtype and ``lse`` ``[Hq, total_q]`` in
    the accumulation dtype. Unlike the native op's, this ``lse`` is
    differentiable.
    """
    _check_qkv(q, k, v, _NAIVE_DTYPES)
    problem = _check_problem(
        q, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, cu_seqlens_k, max_seqlen_k
    )
    block_size, top_k, cu_k = problem.block_size, problem.top_k, problem.cu_seqlens_k
    scale = _check_scale(softmax_scale) or q.shape[2] ** -0.5
    _check_totals(q, k, cu_seqlens, cu_k)

    heads_q, heads_kv = q.shape[1], k.shape[1]
    group = heads_q // heads_kv
    acc = _accumulation_dtype(q.dtype)
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    for q0, q1, k0, k1 in _sequences(cu_seqlens, cu_k):
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == 0:
            continue
        qs, ks, vs = q[q0:q1], k[k0:k1], v[k0:k1]
        offset = len_k - len_q
        with torch.no_grad():
            selected = _select(
                qs.detach(), ks.detach(), offset, block_size, top_k, gqa_shared_routing
            )
            key_block = torch.arange(len_k, device=q.device) // block_size
            positions = offset + torch.arange(len_q, device=q.device)
            causal = torch.arange(len_k, device=q.device)[None, :] <= positions[:, None]
            allowed = selected[:, :, key_block] & causal  # [Hq, Lq, Lk]
        k_heads = ks.to(acc).repeat_interleave(group, dim=1)
        v_heads = vs.to(acc).repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", qs.to(acc), k_heads) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [Hq, Lq]; every query sees its own key
        probs = torch.exp(logits - lse[..., None])
        outs.append(torch.einsum("hqk,khd->qhd", probs, v_heads).to(q.dtype))
        lses.append(lse)
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
    lse_all = torch.cat(lses, dim=1) if lses else q.new_zeros((heads_q, 0), dtype=acc)
    return (out, lse_all) if return_lse else out


def naive_routing(
    q: Tensor,
    k: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    gqa_shared_routing: bool = False,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    """The selection of :func:`moba_naive` in the layout of :func:`moba.routing`."""
    _check_qkv(q, k, k, _NAIVE_DTYPES)
    problem = _check_problem(
        q, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, cu_seqlens_k, max_seqlen_k
    )
    block_size, top_k, cu_k = problem.block_size, problem.top_k, problem.cu_seqlens_k
    max_k = problem.max_seqlen_k
    _check_totals(q, k, cu_seqlens, cu_k)
    seqs = _sequences(cu_seqlens, cu_k)
    if max_k == 0:
        max_k = max((k1 - k0 for _, _, k0, k1 in seqs), default=0)
    width = _routing_width(max_k, block_size, top_k)
    selected = torch.full((q.shape[0], q.shape[1], width), -1, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        for q0, q1, k0, k1 in seqs:
            if q1 == q0:
                continue
            mask = _select(
                q[q0:q1], k[k0:k1], (k1 - k0) - (q1 - q0), block_size, top_k, gqa_shared_routing
            )
            n = mask.shape[-1]
            if min(top_k, n) > width:
                raise ValueError(
                    f"max_seqlen_k: {max_k} is less than the longest key sequence ({k1 - k0})"
                )
            blocks = torch.arange(n, device=q.device).expand_as(mask)
            # Selected blocks first, in ascending order; the rest become -1.
            ordered = torch.where(mask, blocks, n + blocks).sort(dim=-1).values[..., :width]
            ordered = torch.where(ordered < n, ordered, -1).to(torch.int32)
            selected[q0:q1, :, : ordered.shape[-1]] = ordered.permute(1, 0, 2)
    return selected
