"""moba.KVCache: decode from a cache equals the prefill op at every position."""

from __future__ import annotations

import pytest
import torch

import moba


def _fill_step_by_step(cache: moba.KVCache, k: torch.Tensor, v: torch.Tensor, chunks: list[int]):
    """Appends k/v [batch, L, Hkv, D] in chunks of the given sizes."""
    at = 0
    for n in chunks:
        cache.append(k[:, at : at + n], v[:, at : at + n])
        at += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_decode_equals_prefill_op_per_position(dtype, page_size, shared) -> None:
    batch, length, hq, hkv, d, block, top_k = 2, 37, 8, 2, 32, 8, 2
    q = torch.randn(batch, length, hq, d).to(dtype)
    k = torch.randn(batch, length, hkv, d).to(dtype)
    v = torch.randn(batch, length, hkv, d).to(dtype)
    table = None
    if page_size is not None:  # shuffled pages: the layout must not matter
        pages = -(-length // page_size)
        table = torch.randperm(batch * pages).to(torch.int32).view(batch, pages)
    cache = moba.KVCache(
        batch, length, hkv, d, block, dtype=dtype, page_size=page_size, page_table=table
    )
    # The prefill op over the whole sequences: its output at every position.
    cu = torch.arange(batch + 1, dtype=torch.int32) * length
    ref = moba.moba_attn_varlen(
        q.reshape(-1, hq, d),
        k.reshape(-1, hkv, d),
        v.reshape(-1, hkv, d),
        cu,
        length,
        block,
        top_k,
        gqa_shared_routing=shared,
    ).view(batch, length, hq, d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for t in range(length):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        out = cache.decode(q[:, t], top_k, gqa_shared_routing=shared)
        torch.testing.assert_close(out.float(), ref[:, t].float(), atol=tol, rtol=tol)
    assert cache.seqlens.tolist() == [length] * batch
    # Block sums: exact fp32 sums of k's values per block.
    for j in range(-(-length // block)):
        expect = k[:, j * block : (j + 1) * block].float().sum(dim=1)
        torch.testing.assert_close(cache.block_sums[:, j], expect, atol=1e-5, rtol=1e-6)


def test_chunked_prefill_and_routing_match_the_op() -> None:
    batch, hq, hkv, d, block, top_k = 3, 4, 1, 64, 16, 3
    lens = [70, 0, 41]
    cache = moba.KVCache(batch, 80, hkv, d, block)
    ks = [torch.randn(n, hkv, d) for n in lens]
    vs = [torch.randn(n, hkv, d) for n in lens]
    first = [50, 0, 30]  # prefill, then a chunk of the rest as queries
    cache.append(
        torch.cat([x[:n] for x, n in zip(ks, first, strict=True)]),
        torch.cat([x[:n] for x, n in zip(vs, first, strict=True)]),
        first,
    )
    rest = [n - f for n, f in zip(lens, first, strict=True)]
    cache.append(
        torch.cat([x[f:] for x, f in zip(ks, first, strict=True)]),
        torch.cat([x[f:] for x, f in zip(vs, first, strict=True)]),
        rest,
    )
    q = torch.randn(sum(rest), hq, d)
    out = cache.decode(q, top_k, rest)
    cu_q = torch.tensor([0, 20, 20, 31], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 70, 111], dtype=torch.int32)
    k_all, v_all = torch.cat(ks), torch.cat(vs)
    ref = moba.moba_attn_varlen(
        q, k_all, v_all, cu_q, 20, block, top_k, cu_seqlens_k=cu_k, max_seqlen_k=70
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    sel = cache.routing(q, top_k, rest)
    ref_sel = moba.routing(q, k_all, cu_q, 20, block, top_k, cu_seqlens_k=cu_k, max_seqlen_k=70)
    assert torch.equal(sel[..., : ref_sel.shape[-1]], ref_sel)


def test_errors_name_the_argument() -> None:
    cache = moba.KVCache(1, 8, 1, 16, 4)
    with pytest.raises(ValueError, match="exceed the capacity 8"):
        cache.append(torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16))
    cache.append(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    with pytest.raises(ValueError, match="3 queries but only 2 cached tokens"):
        cache.decode(torch.randn(1, 3, 2, 16), 2)
    with pytest.raises(ValueError, match="k_new: expected dtype float32"):
        cache.append(torch.randn(1, 1, 1, 16, dtype=torch.float16), torch.randn(1, 1, 1, 16))
    with pytest.raises(ValueError, match="must be a multiple of the page size 4"):
        moba.KVCache(1, 8, 1, 16, 6, page_size=4).append(
            torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
        )
    cache.reset()
    assert cache.seqlens.tolist() == [0]


def test_caller_owned_storage() -> None:
    k_store, v_store = torch.zeros(2, 8, 1, 16), torch.zeros(2, 8, 1, 16)
    cache = moba.KVCache(2, 8, 1, 16, 4, k=k_store, v=v_store)
    k, v = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)
    cache.append(k, v)
    assert cache.k is k_store
    assert torch.equal(k_store[:, :3], k)
    assert torch.equal(v_store[:, :3], v)
    with pytest.raises(ValueError, match=r"k: expected a \[2, 8, 1, 16\] torch.float32 tensor"):
        moba.KVCache(2, 8, 1, 16, 4, k=torch.zeros(2, 7, 1, 16), v=v_store)
    with pytest.raises(ValueError, match=r"v: expected a \[16, 1, 1, 16\] torch.float32"):
        moba.KVCache(2, 8, 1, 16, 4, page_size=1, k=k_store.view(16, 1, 1, 16), v=v_store)
