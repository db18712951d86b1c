"""moba.KVCache and moba.MobaCache on CUDA tensors: the CUDA append / decode /
routing kernels against the op path (moba_attn_varlen with cu_seqlens_k over
the cached keys) and moba_naive. Skipped without a GPU or without the native
CUDA backend."""

from __future__ import annotations

import pytest
import torch

import moba

HAS_CUDA_BACKEND = torch.cuda.is_available() and moba.backend_available("cuda")
pytestmark = pytest.mark.skipif(
    not HAS_CUDA_BACKEND, reason="needs a GPU and moba built with its CUDA backend"
)

# Two kernels, each within the forward's per-dtype tolerance of the exact result.
TOLERANCE = {torch.float16: 6e-3, torch.bfloat16: 3e-2}


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens_q: list[int],
    lens_k: list[int],
    block: int,
    top_k: int,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op path and moba_naive (fp32 on the CPU) over packed keys."""
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    args = (max(max(lens_q), 1), block, top_k)
    kwargs = {
        "gqa_shared_routing": shared,
        "cu_seqlens_k": cu_k.cuda(),
        "max_seqlen_k": max(max(lens_k), 1),
    }
    op = moba.moba_attn_varlen(q, k, v, cu_q.cuda(), *args, **kwargs)
    kwargs["cu_seqlens_k"] = cu_k
    naive = moba.moba_naive(
        q.cpu().float(), k.cpu().float(), v.cpu().float(), cu_q, *args, **kwargs
    )
    return op, naive


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_step_by_step_equals_op_path(dtype, page_size, shared, head_dim) -> None:
    batch, length, hq, hkv, block, top_k = 3, 45, 8, 2, 8, 3
    device = torch.device("cuda")
    q = torch.randn(batch, length, hq, head_dim, device=device).to(dtype)
    k = torch.randn(batch, length, hkv, head_dim, device=device).to(dtype)
    v = torch.randn(batch, length, hkv, head_dim, device=device).to(dtype)
    table = None
    if page_size is not None:  # shuffled pages: the layout must not matter
        pages = -(-length // page_size)
        table = torch.randperm(batch * pages, device=device).to(torch.int32).view(batch, pages)
    cache = moba.KVCache(
        batch,
        length,
        hkv,
        head_dim,
        block,
        dtype=dtype,
        page_size=page_size,
        page_table=table,
        device=device,
    )
    assert cache.k.is_cuda and cache.block_sums.is_cuda
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
    ref = moba.moba_attn_varlen(
        q.reshape(-1, hq, head_dim),
        k.reshape(-1, hkv, head_dim),
        v.reshape(-1, hkv, head_dim),
        cu,
        length,
        block,
        top_k,
        gqa_shared_routing=shared,
    ).view(batch, length, hq, head_dim)
    tol = TOLERANCE[dtype]
    for t in range(length):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        out = cache.decode(q[:, t], top_k, gqa_shared_routing=shared)
        torch.testing.assert_close(out.float(), ref[:, t].float(), atol=tol, rtol=0)
    assert cache.seqlens.tolist() == [length] * batch
    for j in range(-(-length // block)):
        expect = k[:, j * block : (j + 1) * block].float().sum(dim=1)
        torch.testing.assert_close(cache.block_sums[:, j], expect, atol=1e-4, rtol=1e-5)


def test_chunked_prefill_varlen_routing_and_bytes() -> None:
    dtype, hq, hkv, d, block, top_k = torch.bfloat16, 8, 2, 128, 16, 3
    device = torch.device("cuda")
    lens, first = [90, 0, 1, 57], [60, 0, 0, 40]
    rest = [n - f for n, f in zip(lens, first, strict=True)]
    cache = moba.KVCache(len(lens), 100, hkv, d, block, dtype=dtype, device=device)
    ks = [torch.randn(n, hkv, d, device=device).to(dtype) for n in lens]
    vs = [torch.randn(n, hkv, d, device=device).to(dtype) for n in lens]
    for begin, pieces in (([0] * len(lens), first), (first, rest)):  # prefill, then a chunk
        cache.append(
            torch.cat([x[b : b + n] for x, b, n in zip(ks, begin, pieces, strict=True)]),
            torch.cat([x[b : b + n] for x, b, n in zip(vs, begin, pieces, strict=True)]),
            torch.tensor(pieces, device=device),
        )
    q = torch.randn(sum(rest), hq, d, device=device).to(dtype)
    out, lse = cache.decode(q, top_k, rest, return_lse=True)
    k_all, v_all = torch.cat(ks), torch.cat(vs)
    op, naive = _reference(q, k_all, v_all, rest, lens, block, top_k, False)
    torch.testing.assert_close(out.float(), op.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(out.float().cpu(), naive, atol=3e-2, rtol=0)
    assert torch.isfinite(lse).all()
    cu_q = torch.tensor([0, *torch.tensor(rest).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    sel = cache.routing(q, top_k, rest)
    ref_sel = moba.routing(
        q, k_all, cu_q.cuda(), 30, block, top_k, cu_seqlens_k=cu_k.cuda(), max_seqlen_k=90
    )
    width = ref_sel.shape[-1]
    assert (sel[..., width:] == -1).all()
    # Near ties may flip a choice; random data rarely has them.
    differing = (sel[..., :width] != ref_sel).any(dim=-1).float().mean().item()
    assert differing <= 0.01
    # Bytes of one decode query per sequence with shared routing and top-k 2:
    # the current block up to the query plus one full past block per kv group.
    one = [1, 0, 1, 1]
    read = cache.bytes_read(q[:3], 2, one, gqa_shared_routing=True)
    assert read == ((90 - 80) + 16 + 1 + (57 - 48) + 16) * hkv * d * 2 * 2
    dense = (90 + 1 + 57) * hkv * d * 2 * 2
    assert cache.bytes_read(q[:3], 100, one) == dense  # top-k covers every block


def test_capacity_overflow_is_skipped_on_the_device() -> None:
    device = torch.device("cuda")
    cache = moba.KVCache(2, 8, 1, 64, 4, dtype=torch.float16, device=device)
    k = torch.randn(2, 6, 1, 64, device=device, dtype=torch.float16)
    cache.append(k, k)
    # Sequence 0 would exceed its capacity of 8: it is left untouched, no sync.
    cache.append(torch.randn(4, 1, 64, device=device, dtype=torch.float16), k[0, :4], [3, 1])
    assert cache.seqlens.tolist() == [6, 7]
    # A decode query beyond a sequence's cached tokens poisons that sequence only.
    out = cache.decode(torch.randn(8, 2, 64, device=device, dtype=torch.float16), 2, [7, 1])
    assert torch.isnan(out[:7]).all() and torch.isfinite(out[7:]).all()


def test_moba_layer_decodes_on_cuda_like_the_op() -> None:
    pytest.importorskip("transformers")
    from moba._cache import MobaLayer

    device, dtype = torch.device("cuda"), torch.float16
    batch, hq, hkv, d, block, top_k, prompt = 2, 4, 2, 64, 8, 2, 30
    layer = MobaLayer(40)
    k = torch.randn(batch, hkv, prompt + 2, d, device=device, dtype=dtype)
    v = torch.randn(batch, hkv, prompt + 2, d, device=device, dtype=dtype)
    layer.update(k[:, :, :prompt], v[:, :, :prompt])
    assert layer.decodes_on("auto") and layer.decodes_on("cuda")
    assert not layer.decodes_on("cpu")
    for step in range(2):  # two decode steps, the block sums synced lazily
        end = prompt + step + 1
        layer.update(k[:, :, end - 1 : end], v[:, :, end - 1 : end])
        cache = layer.moba_cache(None, block)
        assert cache.k.is_cuda and cache.seqlens.tolist() == [end] * batch
        q = torch.randn(batch, hq, d, device=device, dtype=dtype)
        out = cache.decode(q, top_k)
        keys = k[:, :, :end].transpose(1, 2).reshape(-1, hkv, d)
        values = v[:, :, :end].transpose(1, 2).reshape(-1, hkv, d)
        op, naive = _reference(q, keys, values, [1] * batch, [end] * batch, block, top_k, False)
        torch.testing.assert_close(out, op, atol=4e-3, rtol=0)
        torch.testing.assert_close(out.float().cpu(), naive, atol=4e-3, rtol=0)
    # Left padding: one-row pages over the same buffers skip the padded slots.
    mask = torch.ones(batch, prompt + 2, dtype=torch.bool, device=device)
    mask[0, :5] = False
    cache = layer.moba_cache(mask, block)
    assert cache.paged and cache.seqlens.tolist() == [prompt + 2 - 5, prompt + 2]
    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
    out = cache.decode(q, top_k)
    keys = torch.cat([k[0, :, 5:].transpose(0, 1), k[1].transpose(0, 1)])
    values = torch.cat([v[0, :, 5:].transpose(0, 1), v[1].transpose(0, 1)])
    op, _ = _reference(q, keys, values, [1, 1], [prompt - 3, prompt + 2], block, top_k, False)
    torch.testing.assert_close(out, op, atol=4e-3, rtol=0)


def _cuda_decode_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Records (device type, query tokens) of every KVCache.decode call made
    by the transformers integration's cached decode path."""
    from moba import _hf

    calls: list[tuple[str, int]] = []
    cached_fn = _hf._moba_decode_from_cache

    def spy(layer: object, query: torch.Tensor, *args: object) -> torch.Tensor:
        out = cached_fn(layer, query, *args)  # type: ignore[arg-type]
        routing = getattr(layer, "routing", None)
        assert routing is not None, "the cached path ran without a KVCache"
        calls.append((routing.cache.device.type, query.shape[2]))
        return out

    monkeypatch.setattr(_hf, "_moba_decode_from_cache", spy)
    return calls


def test_generation_with_the_cache_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on CUDA, fp16: the decode steps of a MobaCache run the CUDA
    KVCache kernels (counted), and their teacher-forced logits match the op
    path over the full prefix as closely as the op path itself matches an
    fp32 moba_naive reference. Greedy token ids are compared only for the
    steps whose fp32 top-2 logit margin exceeds the observed fp16 errors
    (a randomly initialised model has near-uniform logits, where argmax
    flips under ~1e-3 differences even when both paths are right)."""
    transformers = pytest.importorskip("transformers")
    import copy

    from test_transformers import BLOCK, TOP_K, tiny_config

    prompt, new, layers = 36, 5, 3
    moba.register(block_size=BLOCK, top_k=TOP_K)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(tiny_config(layers=layers, head_dim=64))
    model = copy.deepcopy(base).eval().to(device="cuda", dtype=torch.float16)
    moba.configure(model, decode="moba")
    model.set_attn_implementation("moba")
    reference = copy.deepcopy(base).eval().to(device="cuda", dtype=torch.float32)
    moba.configure(reference, decode="moba")
    reference.set_attn_implementation("moba_naive")
    ids = torch.randint(1, 100, (2, prompt), device="cuda")
    mask = torch.ones_like(ids)

    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        # Reference logits along `plain` (position p predicts token p + 1):
        # the op path (prefill over the whole prefix, fp16) and fp32 moba_naive.
        positions = slice(prompt - 1, prompt + new - 1)
        op_logits = model(plain).logits[:, positions].float()
        exact = reference(plain).logits[:, positions].float()
        # Teacher-forced cached decode: prefill the prompt, then one token at a time.
        calls = _cuda_decode_spy(monkeypatch)
        cache = moba.cache_for(model, new, prompt)
        steps = [model(plain[:, :prompt], past_key_values=cache, use_cache=True).logits[:, -1]]
        for s in range(new - 1):
            token = plain[:, prompt + s : prompt + s + 1]
            steps.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
        cached_logits = torch.stack(steps, dim=1).float()

    # The CUDA KVCache served every decode step of every layer (not the prefill).
    assert calls == [("cuda", 1)] * ((new - 1) * layers), calls
    layer = cache.layers[0]
    assert layer.routing is not None and layer.routing.cache.k.is_cuda
    assert layer.routing.cache.seqlens.tolist() == [prompt + new - 1] * 2

    scale = float(exact.abs().max())
    err_op = float((op_logits - exact).abs().max())
    err_cached = float((cached_logits - exact).abs().max())
    err_between = float((cached_logits - op_logits).abs().max())
    detail = (
        f"max |logit| {scale:.3e}; fp16 op vs fp32 {err_op:.3e}; cached vs fp32 "
        f"{err_cached:.3e}; cached vs op {err_between:.3e}"
    )
    # Both fp16 paths are about equally far from the exact result; a wrong
    # block, scale or merge would put the cached path far beyond the op's error.
    assert err_cached <= 2 * err_op + 2e-3 * scale, detail
    assert err_between <= 1e-2 * max(scale, 1.0), detail

    # Greedy ids with the cache, compared while every step has a clear margin.
    with torch.no_grad():
        cached = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            past_key_values=moba.cache_for(model, new, prompt),
        )
    top2 = exact.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).amin(dim=0)  # [new]: the smaller over the batch
    needed = 2 * (err_op + err_cached)
    for s in range(new):
        if float(margin[s]) <= needed:
            break  # a near tie: either token is right, and later prefixes may differ
        assert torch.equal(cached[:, prompt + s], plain[:, prompt + s]), (
            f"step {s}: greedy tokens differ with a margin of {float(margin[s]):.3e} "
            f"(> {needed:.3e}); {detail}"
        )


def test_decode_step_captured_in_a_cuda_graph() -> None:
    """A KVCache decode step captured with torch.cuda.graph and replayed
    equals the eager call, also after the cache grew (the graph reads the
    device-side lengths, so replays follow new appends)."""
    dtype, batch, hq, hkv, d, block, top_k = torch.bfloat16, 2, 8, 2, 128, 64, 3
    cache = moba.KVCache(batch, 1024, hkv, d, block, dtype=dtype, device="cuda")
    cache.append(
        torch.randn(batch, 700, hkv, d, device="cuda").to(dtype),
        torch.randn(batch, 700, hkv, d, device="cuda").to(dtype),
    )
    q = torch.randn(batch, hq, d, device="cuda").to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph (allocator, cached cu_seqlens)
            cache.decode(q, top_k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.decode(q, top_k)
    assert isinstance(out, torch.Tensor)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        expect = cache.decode(q, top_k)
        assert torch.equal(out, expect)
        # Grow every sequence by one token: the replay must see the new length.
        cache.append(
            torch.randn(batch, 1, hkv, d, device="cuda").to(dtype),
            torch.randn(batch, 1, hkv, d, device="cuda").to(dtype),
        )
        q.copy_(torch.randn(batch, hq, d, device="cuda").to(dtype))
    assert cache.seqlens.tolist() == [702] * batch
