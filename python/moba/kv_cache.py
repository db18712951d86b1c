"""A MoBA KV cache for generation: append keys/values, decode with MoBA routing.

:class:`KVCache` owns (as plain torch tensors, visible as attributes) the
memory the C++ cache API (``include/moba/kv_cache.hpp``) works on:

* contiguous layout: ``k``, ``v`` ``[batch, capacity, Hkv, D]``;
* paged layout (``page_size=...``): a page pool ``k``, ``v``
  ``[num_pages, page_size, Hkv, D]`` and ``page_table`` ``[batch, max_pages]``
  int32 (token ``t`` of sequence ``b`` at row ``t % page_size`` of page
  ``page_table[b, t // page_size]``), as serving engines such as vLLM keep it;
* ``seqlens`` ``[batch]`` int32 and ``block_sums`` ``[batch, max_blocks, Hkv, D]``
  float32, the running sum of k per MoBA block that makes routing a new query
  cost O(blocks x D) instead of a re-read of the cache.

:meth:`KVCache.decode` runs MoBA attention for the new queries of each
sequence, which are its last positions (their keys appended first): the same
routing and output as :func:`moba.moba_attn_varlen` over the cached keys with
``cu_seqlens_k``.

A cache built with ``device="cuda"`` (or over CUDA ``k``/``v``) runs the CUDA
kernels (float16/bfloat16, head dims 64 and 128) on PyTorch's current stream,
without synchronizing: lengths stay on the device (``seqlens``), values only
the device knows are checked there (a sequence that would overflow its
capacity is not appended; rows of an invalid sequence decode to NaN; see
``include/moba/kv_cache.hpp``). Host tensors run the CPU kernels.

CUDA graphs: :meth:`KVCache.append` and :meth:`KVCache.decode` can be captured
(``torch.cuda.graph``) when called without ``counts`` (or with ``counts`` as a
device tensor): nothing synchronizes, the per-call workspace is a
stream-ordered allocation, and the ``cu_seqlens`` of uniform batches are
built once per shape and kept (so a replay reads a tensor that outlives the
capture). Call once eagerly before capturing, as usual, so that tensor is
built outside the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native

__all__ = ["KVCache"]


def _cu_seqlens(counts: Tensor | list[int], batch: int, name: str, device: torch.device) -> Tensor:
    """cu_seqlens [batch + 1] int32 on ``device`` from per-sequence counts (a
    device tensor of counts stays on the device: no host round trip)."""
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    if counts.shape != (batch,):
        raise ValueError(
            f"{name}: expected {batch} counts (one per sequence), got {tuple(counts.shape)}"
        )
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = counts.cumsum(0)
    return cu


def _uniform_cu_seqlens(n: int, batch: int, device: torch.device) -> Tensor:
    """cu_seqlens for ``n`` rows per sequence, built on ``device``."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * n


def _storage(
    given: Tensor | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    if given is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if tuple(given.shape) != shape or given.dtype != dtype:
        raise ValueError(
            f"{name}: expected a {list(shape)} {dtype} tensor for this layout, "
            f"got {list(given.shape)} {given.dtype}"
        )
    if given.device != device:
        raise ValueError(f"{name}: on {given.device}, expected {device} like the cache")
    return given


class KVCache:
    """Keys and values of ``batch`` sequences plus their MoBA block sums.

    Args:
        batch: number of sequence slots.
        capacity: most tokens per sequence (rounded up to whole pages when paged).
        heads_kv, head_dim: the attention layer's kv heads and head dim.
        block_size: the MoBA block size every decode of this cache uses.
        dtype: float32, float16 or bfloat16.
        page_size: rows per page for the paged layout (``block_size`` must be a
            multiple of it); ``None`` for the contiguous layout.
        num_pages: pages in the pool (paged layout; default: enough for every
            slot at full capacity).
        page_table: ``[batch, max_pages]`` int32 to use instead of the default
            (slot ``b`` owns pages ``b * max_pages ...``); entries past a
            sequence's length are never read.
        k, v: caller-owned storage to use instead of fresh zeros, shaped
            ``[batch, capacity, Hkv, D]`` (contiguous) or
            ``[num_pages, page_size, Hkv, D]`` (paged), of ``dtype``; any strides
            with a contiguous head dim. Lets a cache share its buffers with other
            views of the same keys (e.g. :class:`moba.MobaCache`).
        device: where the cache lives (default: that of ``k`` if given, else
            the CPU). CUDA caches run the CUDA kernels.
    """

    def __init__(
        self,
        batch: int,
        capacity: int,
        heads_kv: int,
        head_dim: int,
        block_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        page_size: int | None = None,
        num_pages: int | None = None,
        page_table: Tensor | None = None,
        k: Tensor | None = None,
        v: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if batch < 0 or capacity < 0:
            raise ValueError(f"batch/capacity: expected >= 0, got {batch}/{capacity}")
        if device is None:
            device = k.device if k is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.block_size = int(block_size)
        self.page_table: Tensor | None = None
        if page_size is None:
            shape = (batch, capacity, heads_kv, head_dim)
            self.capacity = capacity
        else:
            if page_size < 1:
                raise ValueError(f"page_size: expected >= 1, got {page_size}")
            max_pages = -(-capacity // page_size)
            if page_table is None:
                page_table = torch.arange(
                    batch * max_pages, dtype=torch.int32, device=self.device
                ).view(batch, max_pages)
            self.page_table = page_table
            max_pages = page_table.shape[1] if page_table.dim() == 2 else max_pages
            if num_pages is None:
                num_pages = batch * max_pages
            shape = (num_pages, page_size, heads_kv, head_dim)
            self.capacity = max_pages * page_size
        self.k = _storage(k, "k", shape, dtype, self.device)
        self.v = _storage(v, "v", shape, dtype, self.device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        max_blocks = -(-self.capacity // self.block_size) if self.block_size > 0 else 0
        self.block_sums = torch.zeros(
            (batch, max_blocks, heads_kv, head_dim), dtype=torch.float32, device=self.device
        )
        self.batch = batch
        # cu_seqlens of uniform calls (n rows per sequence), built once: a
        # decode step then launches only the native kernels.
        self._uniform_cu: dict[int, Tensor] = {}

    def _uniform(self, n: int) -> Tensor:
        """cu_seqlens for ``n`` rows of every sequence, kept per ``n``. Not
        kept when built during a CUDA graph capture (its kernels only run at
        replay, so an eager caller would read garbage)."""
        cu = self._uniform_cu.get(n)
        if cu is not None:
            return cu
        cu = _uniform_cu_seqlens(n, self.batch, self.device)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:
            self._uniform_cu[n] = cu
        return cu

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    def _cache_args(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, int]:
        return (self.k, self.v, self.page_table, self.seqlens, self.block_sums, self.block_size)

    def _exec_args(self) -> tuple[int, int]:
        """(num_threads, stream) for the native call: the CPU kernels use
        PyTorch's thread count, the CUDA kernels its current stream."""
        if self.device.type == "cuda":
            return torch.get_num_threads(), int(torch.cuda.current_stream(self.device).cuda_stream)
        return torch.get_num_threads(), 0

    def reset(self, sequences: int | list[int] | None = None) -> None:
        """Empties some slots (all by default) for new requests: only lengths change."""
        if sequences is None:
            self.seqlens.zero_()
        else:
            self.seqlens[torch.as_tensor(sequences, dtype=torch.long)] = 0

    def append(self, k: Tensor, v: Tensor, counts: Tensor | list[int] | None = None) -> None:
        """Appends keys and values to every sequence.

        ``k``, ``v``: ``[batch, n, Hkv, D]`` (``n`` new tokens for every
        sequence; ``n = 1`` is one decode step), or packed ``[total, Hkv, D]``
        with ``counts`` giving each sequence's share (zeros allowed).
        """
        if counts is None:
            if k.dim() != 4 or k.shape[0] != self.batch:
                raise ValueError(
                    f"k: expected [batch={self.batch}, n, Hkv, D] without counts, "
                    f"got {tuple(k.shape)}"
                )
            cu = self._uniform(k.shape[1])
            k = k.reshape(-1, *k.shape[2:])
            v = v.reshape(-1, *v.shape[2:])
        else:
            cu = _cu_seqlens(counts, self.batch, "counts", self.device)
        _native.kv_cache_append(
            *self._cache_args(),
            k.detach(),
            v.detach(),
            cu,
            *self._exec_args(),
        )

    def _queries(self, q: Tensor, counts: Tensor | list[int] | None) -> tuple[Tensor, Tensor]:
        if counts is None:
            if q.dim() == 4:  # [batch, n, Hq, D]
                cu = self._uniform(q.shape[1])
                return q.reshape(-1, *q.shape[2:]), cu
            if q.dim() == 3 and q.shape[0] == self.batch:  # one query per sequence
                return q, self._uniform(1)
            raise ValueError(
                f"q: expected [batch, Hq, D], [batch, n, Hq, D] or packed with counts, "
                f"got {tuple(q.shape)}"
            )
        return q, _cu_seqlens(counts, self.batch, "counts", self.device)

    def decode(
        self,
        q: Tensor,
        top_k: int,
        counts: Tensor | list[int] | None = None,
        *,
        softmax_scale: float | None = None,
        gqa_shared_routing: bool = False,
        return_lse: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """MoBA attention of each sequence's newest positions against the cache.

        ``q``: ``[batch, Hq, D]`` (decode: one query per sequence),
        ``[batch, n, Hq, D]``, or packed ``[total, Hq, D]`` with ``counts``
        (chunked prefill: the last ``counts[b]`` positions of sequence ``b``).
        Returns ``out`` shaped like ``q`` (and ``lse`` ``[Hq, total]`` float32).
        """
        flat, cu = self._queries(q, counts)
        out = torch.empty_like(flat)
        lse = (
            torch.empty((flat.shape[1], flat.shape[0]), dtype=torch.float32, device=flat.device)
            if return_lse
            else None
        )
        _native.kv_cache_decode(
            *self._cache_args(),
            flat.detach(),
            cu,
            out,
            lse,
            int(top_k),
            softmax_scale,
            gqa_shared_routing,
            *self._exec_args(),
        )
        out = out.view(q.shape)
        if lse is None:
            return out
        return out, lse

    def routing(
        self,
        q: Tensor,
        top_k: int,
        counts: Tensor | list[int] | None = None,
        *,
        gqa_shared_routing: bool = False,
    ) -> Tensor:
        """The blocks :meth:`decode` selects: ``[total, Hq, W]`` int32, -1 padded.

        ``W`` fits the longest cached sequence (CPU) or the capacity (CUDA,
        where reading the lengths back would synchronize)."""
        flat, cu = self._queries(q, counts)
        if self.device.type == "cuda":
            longest = self.capacity
        else:
            longest = int(self.seqlens.max()) if self.batch > 0 else 0
        width = max(1, _native.routing_width(longest, self.block_size, int(top_k)))
        selected = torch.empty(
            (flat.shape[0], flat.shape[1], width), dtype=torch.int32, device=flat.device
        )
        _native.kv_cache_routing(
            *self._cache_args(),
            flat.detach(),
            cu,
            selected,
            int(top_k),
            gqa_shared_routing,
            *self._exec_args(),
        )
        return selected

    def bytes_read(
        self,
        q: Tensor,
        top_k: int,
        counts: Tensor | list[int] | None = None,
        *,
        gqa_shared_routing: bool = False,
    ) -> int:
        """Bytes of K and V :meth:`decode` reads for these queries (the
        selected blocks of every kv group, each once): for bandwidth figures.
        Routes once; synchronizes a CUDA cache's stream."""
        flat, cu = self._queries(q, counts)
        return int(
            _native.kv_cache_bytes_read(
                *self._cache_args(),
                flat.detach(),
                cu,
                int(top_k),
                gqa_shared_routing,
                *self._exec_args(),
            )
        )
