"""A transformers ``Cache`` backed by :class:`moba.KVCache`, for MoBA decoding.

With ``attn_implementation="moba"`` and ``decode="moba"``, the existing decode
path runs the prefill op over the whole cache every step, which recomputes
every block mean from the cached keys (O(context x D) per step before any
attention). :class:`MobaCache` keeps, per layer, the keys and values in one
preallocated buffer and, next to it, a :class:`moba.KVCache` over the same
memory with the running per-block key sums, so a decode step of a MoBA layer
routes in O(blocks x D) and attention reads only the selected blocks.

Layout and sharing: each layer owns ``k``, ``v`` buffers ``[batch,
max_cache_len, Hkv, D]``. ``update()`` (called by the model's attention
module before the attention function) copies the new states in and returns
``[batch, Hkv, length, D]`` views of the buffers (no copy), as transformers
expects; full-attention layers, prefill, ``decode="full"`` and the other
attention backends read those views. The block sums are brought up to date
lazily, by the ``"moba"`` attention function on a decode step
(:meth:`MobaLayer.moba_cache`), because only it knows the padding mask and
the block size in force:

* no padding: a contiguous :class:`~moba.KVCache` whose ``k``/``v`` are the
  layer buffers, all sequences of equal length;
* a padding mask (left-padded batches): a paged :class:`~moba.KVCache` with
  one-row pages over the same buffers, whose page table lists each
  sequence's valid (unpadded) positions in order, so every sequence is
  routed and attended exactly as the prefill op sees it with padding removed.

How the attention function finds the layer: ``update()`` tags the key view
it returns with the layer (attribute ``_moba_cache_layer``); the attention
function receives that same tensor object as ``key``.

CPU buffers decode with the CPU kernels; CUDA buffers (float16/bfloat16, head
dims 64 and 128) with the CUDA kernels on PyTorch's current stream
(:meth:`MobaLayer.decodes_on` says whether a backend setting can use them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _native
from .kv_cache import KVCache

__all__ = ["MobaCache", "MobaLayer"]

#: The attribute of the key view that names the layer it came from.
LAYER_ATTRIBUTE = "_moba_cache_layer"


class _Routing:
    """The :class:`KVCache` over a layer's buffers and how far it is synced."""

    def __init__(self, cache: KVCache, block_size: int, paged: bool) -> None:
        self.cache = cache
        self.block_size = block_size
        self.paged = paged
        self.synced = 0  # buffer columns already appended to ``cache``


# (transformers' __init_subclass__ and __init__ are unannotated.)
class MobaLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One layer of a :class:`MobaCache`: preallocated K/V buffers
    ``[batch, max_cache_len, Hkv, D]`` plus, once a MoBA decode step needs it,
    a :class:`moba.KVCache` with running block sums over the same memory."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.max_cache_len = int(max_cache_len)
        self.length = 0
        self.routing: _Routing | None = None
        self.k_buffer: Tensor | None = None
        self.v_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads_kv, _, head_dim = key_states.shape
        if value_states.shape[-1] != head_dim:
            raise ValueError(
                f"value_states: MobaCache needs equal key and value head dims, got "
                f"{head_dim} and {value_states.shape[-1]}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = batch
        shape = (batch, self.max_cache_len, heads_kv, head_dim)
        self.k_buffer = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_buffer = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def _views(self) -> tuple[Tensor, Tensor]:
        assert self.k_buffer is not None
        assert self.v_buffer is not None
        keys = self.k_buffer[:, : self.length].transpose(1, 2)
        values = self.v_buffer[:, : self.length].transpose(1, 2)
        setattr(keys, LAYER_ATTRIBUTE, self)
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Copies ``[batch, Hkv, n, D]`` new states in; returns views of all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.k_buffer is not None
        assert self.v_buffer is not None
        new = key_states.shape[2]
        if key_states.shape[0] != self.k_buffer.shape[0]:
            raise ValueError(
                f"key_states: batch {key_states.shape[0]}, but the MobaCache holds "
                f"{self.k_buffer.shape[0]} sequences (use a new cache per generate call)"
            )
        if self.length + new > self.max_cache_len:
            raise ValueError(
                f"max_cache_len: {self.length} cached + {new} new tokens exceed the "
                f"MobaCache capacity of {self.max_cache_len}"
            )
        end = self.length + new
        self.k_buffer[:, self.length : end].copy_(key_states.transpose(1, 2))
        self.v_buffer[:, self.length : end].copy_(value_states.transpose(1, 2))
        self.length = end
        return self._views()

    def decodes_on(self, backend: str) -> bool:
        """Whether :meth:`moba_cache` can serve a decode step of the op
        backend ``backend`` ("auto", "cpu", "cuda", ...): CPU buffers with
        "auto"/"cpu"; CUDA buffers with "auto"/"cuda" when the native library
        has the CUDA backend and the dtype / head dim are ones its kernels
        take. Other combinations keep the op path."""
        if self.k_buffer is None:
            return False
        if self.k_buffer.device.type == "cpu":
            return backend in ("auto", "cpu")
        return (
            self.k_buffer.device.type == "cuda"
            and backend in ("auto", "cuda")
            and bool(_native.built_with_cuda)
            and self.k_buffer.dtype in (torch.float16, torch.bfloat16)
            and self.k_buffer.shape[-1] in (64, 128)
        )

    def moba_cache(self, attention_mask: Tensor | None, block_size: int) -> KVCache:
        """The :class:`KVCache` over this layer's buffers, synced with them.

        ``attention_mask``: the boolean ``[batch, length]`` padding mask, or
        None when nothing is padded. Only the columns appended since the last
        call are added (their keys are copied onto themselves and summed);
        the first call, a change of ``block_size`` or the first padding mask
        after unpadded steps (re)build it from all cached columns.
        """
        assert self.k_buffer is not None
        assert self.v_buffer is not None
        if attention_mask is not None and attention_mask.shape != (
            self.k_buffer.shape[0],
            self.length,
        ):
            raise ValueError(
                f"attention_mask: expected [{self.k_buffer.shape[0]}, {self.length}] for the "
                f"cached keys, got {list(attention_mask.shape)}"
            )
        routing = self.routing
        if (
            routing is None
            or routing.block_size != block_size
            or (attention_mask is not None and not routing.paged)
        ):
            routing = self._build(block_size, paged=attention_mask is not None)
            self.routing = routing
        start, end = routing.synced, self.length
        if end > start:
            k_new = self.k_buffer[:, start:end]
            v_new = self.v_buffer[:, start:end]
            if not routing.paged:
                # Copies: append writes these rows onto themselves, and the
                # native call refuses inputs that alias the cache.
                routing.cache.append(k_new.clone(), v_new.clone())
            else:
                valid = (
                    attention_mask[:, start:end]
                    if attention_mask is not None
                    else torch.ones(k_new.shape[:2], dtype=torch.bool, device=k_new.device)
                )
                self._map_valid_columns(routing, valid, start)
                counts = valid.sum(dim=1)
                routing.cache.append(k_new[valid], v_new[valid], counts)
            routing.synced = end
        return routing.cache

    def _build(self, block_size: int, paged: bool) -> _Routing:
        assert self.k_buffer is not None
        assert self.v_buffer is not None
        batch, capacity, heads_kv, head_dim = self.k_buffer.shape
        if not paged:
            cache = KVCache(
                batch,
                capacity,
                heads_kv,
                head_dim,
                block_size,
                dtype=self.dtype,
                k=self.k_buffer,
                v=self.v_buffer,
            )
        else:
            # One-row pages: sequence b's p-th valid token is buffer row
            # page_table[b, p] of the [batch * capacity] rows.
            pool = (batch * capacity, 1, heads_kv, head_dim)
            cache = KVCache(
                batch,
                capacity,
                heads_kv,
                head_dim,
                block_size,
                dtype=self.dtype,
                page_size=1,
                page_table=torch.zeros((batch, capacity), dtype=torch.int32, device=self.device),
                k=self.k_buffer.view(pool),
                v=self.v_buffer.view(pool),
            )
        return _Routing(cache, block_size, paged)

    def _map_valid_columns(self, routing: _Routing, valid: Tensor, start: int) -> None:
        """Points the page-table entries of the next valid tokens at their rows."""
        table = routing.cache.page_table
        assert table is not None
        assert self.k_buffer is not None
        capacity = self.k_buffer.shape[1]
        rows, columns = valid.nonzero(as_tuple=True)  # row-major: each row's columns in order
        rank = torch.cumsum(valid.to(torch.int64), dim=1)[rows, columns] - 1
        slots = routing.cache.seqlens.to(torch.int64)[rows] + rank
        table[rows, slots] = (rows * capacity + start + columns).to(torch.int32)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.length = 0
        self.routing = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` tokens (or keeps the first
        ``tokens_to_remove`` when positive); the block sums are rebuilt lazily."""
        if tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
        else:
            self.length = min(self.length, tokens_to_remove)
        self.routing = None
        if self.is_initialized:
            self._views()

    def _rebatch(self, index: Tensor) -> None:
        if self.k_buffer is None or self.v_buffer is None:
            return
        index = index.to(self.k_buffer.device)
        self.k_buffer = self.k_buffer.index_select(0, index)
        self.v_buffer = self.v_buffer.index_select(0, index)
        self.batch_size = self.k_buffer.shape[0]
        self.routing = None
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebatch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.k_buffer is not None:
            self._rebatch(torch.arange(self.k_buffer.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.k_buffer is not None:
            # On the buffers' device: a CUDA ``indices`` cannot index a CPU arange.
            rows = torch.arange(self.k_buffer.shape[0], device=self.k_buffer.device)
            if isinstance(indices, Tensor):
                indices = indices.to(rows.device)
            self._rebatch(rows[indices])


class MobaCache(Cache):
    """A transformers cache whose MoBA layers decode from :class:`moba.KVCache`.

    Args:
        config: the model's config (its decoder config is used): one layer
            per ``num_hidden_layers``; sliding-window or non-attention layer
            types are refused.
        max_cache_len: most tokens per sequence (prompt, padding included,
            plus new tokens); the buffers are allocated on the first update.

    Pass it to ``model.generate(..., past_key_values=moba.MobaCache(model.config,
    max_cache_len))`` (one cache per generate call), or build it with
    :func:`moba.cache_for`. With ``attn_implementation="moba"`` and
    ``decode="moba"``, decode steps of MoBA layers then run
    :meth:`moba.KVCache.decode` (O(blocks x D) routing, selected blocks read;
    CPU tensors on the CPU kernels, CUDA tensors on the CUDA kernels);
    everything else reads the cached keys as a plain static-size cache.
    """

    def __init__(self, config: Any, max_cache_len: int) -> None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int):
            raise TypeError(f"max_cache_len: expected an int, got {type(max_cache_len).__name__}")
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len: expected >= 1, got {max_cache_len}")
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None)
        num_layers = int(text_config.num_hidden_layers)
        if layer_types is not None:
            others = sorted({t for t in layer_types if t != "full_attention"})
            if others:
                raise ValueError(
                    f"config: MobaCache supports full-attention layers only, the model also "
                    f"has {', '.join(others)} layers"
                )
        if getattr(text_config, "sliding_window", None) is not None and getattr(
            text_config, "use_sliding_window", True
        ):
            raise ValueError(
                "config: MobaCache does not support sliding-window attention "
                f"(sliding_window={text_config.sliding_window})"
            )
        super().__init__(layers=[MobaLayer(max_cache_len) for _ in range(num_layers)])
        # Some transformers versions (5.17) derive a read-only max_cache_len from the
        # layers; others read a plain attribute.
        if not isinstance(getattr(type(self), "max_cache_len", None), property):
            self.max_cache_len = max_cache_len


def cache_for(model: torch.nn.Module, max_new_tokens: int, prompt_length: int) -> MobaCache:
    """A :class:`MobaCache` for ``model`` sized for ``prompt_length`` (padding
    included) plus ``max_new_tokens`` tokens."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"model: expected a transformers model with a .config, got {type(model).__name__}"
        )
    return MobaCache(config, prompt_length + max_new_tokens)


def layer_of(key: Tensor) -> MobaLayer | None:
    """The :class:`MobaLayer` whose ``update()`` returned ``key``, if any."""
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    return layer if isinstance(layer, MobaLayer) else None
