"""moba_attn_varlen (the native op) against moba_naive (pure PyTorch) and the
native reference backend: outputs, lse, gradients, routing, varlen edge
cases, GQA, dtypes and argument errors."""

from __future__ import annotations

import pytest
import torch

import moba
from moba import _native

from helpers import TOLERANCES, cu_seqlens, random_qkv

# (lengths, Hq, Hkv, D, block, top_k): varlen with empty and length-1
# sequences, partial last blocks, GQA and MQA, top-k above the block count.
CASES = [
    ([37], 2, 2, 16, 8, 2),
    ([0, 1, 23, 0, 40], 4, 2, 16, 5, 3),
    ([64, 17], 4, 1, 32, 16, 2),
    ([1, 1, 9], 2, 1, 8, 4, 1),
    ([50], 3, 3, 24, 7, 100),
    ([96, 31, 2], 8, 2, 16, 12, 4),
]


def _ids(case: tuple) -> str:
    lengths, hq, hkv, d, block, top_k = case
    return f"L{'-'.join(map(str, lengths))}_H{hq}x{hkv}_D{d}_B{block}_K{top_k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_naive(case: tuple, dtype: torch.dtype) -> None:
    lengths, hq, hkv, d, block, top_k = case
    total = sum(lengths)
    q, k, v = random_qkv(total, total, hq, hkv, d, dtype)
    cu = cu_seqlens(lengths)
    out, lse = moba.moba_attn_varlen(q, k, v, cu, max(lengths), block, top_k, return_lse=True)
    ref, ref_lse = moba.moba_naive(q, k, v, cu, max(lengths), block, top_k, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (hq, total)
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_backend_matches_reference_backend(case: tuple) -> None:
    lengths, hq, hkv, d, block, top_k = case
    total = sum(lengths)
    q, k, v = random_qkv(total, total, hq, hkv, d)
    cu = cu_seqlens(lengths)
    results = {}
    for backend in ("cpu", "reference"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = moba.moba_attn_varlen(
            qq, kk, vv, cu, max(lengths), block, top_k, return_lse=True, backend=backend
        )
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        results[backend] = (out, lse, qq.grad, kk.grad, vv.grad)
    for got, want in zip(results["cpu"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_naive_in_float64(case: tuple) -> None:
    lengths, hq, hkv, d, block, top_k = case
    total = sum(lengths)
    q64, k64, v64 = random_qkv(total, total, hq, hkv, d, torch.float64)
    dout = torch.randn(total, hq, d, dtype=torch.float64)
    cu = cu_seqlens(lengths)

    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    moba.moba_attn_varlen(q, k, v, cu, max(lengths), block, top_k).backward(dout.float())
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    moba.moba_naive(qr, kr, vr, cu, max(lengths), block, top_k).backward(dout)

    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert got is not None and want is not None
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype: torch.dtype) -> None:
    lengths = [0, 30, 1, 45]
    q, k, v = random_qkv(76, 76, 4, 2, 16, dtype)
    dout = torch.randn(76, 4, 16, dtype=dtype)
    cu = cu_seqlens(lengths)
    grads = []
    for fn in (moba.moba_attn_varlen, moba.moba_naive):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        fn(qq, kk, vv, cu, 45, 8, 3).backward(dout)
        grads.append((qq.grad, kk.grad, vv.grad))
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.float16 else {"atol": 1e-1, "rtol": 5e-2}
    for got, want in zip(*grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_autocast_takes_mixed_precision_inputs() -> None:
    """Under torch.autocast the op runs in the autocast dtype, as SDPA does: a
    rotary embedding can leave q and k in float32 while v is bfloat16."""
    lengths = [0, 30, 45]
    q, k, v = random_qkv(75, 75, 4, 2, 16, torch.float32)
    cu = cu_seqlens(lengths)
    qq, kk = (t.clone().requires_grad_() for t in (q, k))
    vv = v.to(torch.bfloat16).requires_grad_()
    with pytest.raises(ValueError, match="dtype"):
        moba.moba_attn_varlen(qq, kk, vv, cu, 45, 8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moba.moba_attn_varlen(qq, kk, vv, cu, 45, 8, 3)
    assert out.dtype == torch.bfloat16
    want = moba.moba_naive(*(t.detach().bfloat16() for t in (q, k, v)), cu, 45, 8, 3)
    torch.testing.assert_close(out.detach(), want, **TOLERANCES[torch.bfloat16])
    out.float().sum().backward()
    assert qq.grad is not None and qq.grad.dtype == torch.float32
    assert vv.grad is not None and vv.grad.dtype == torch.bfloat16


def test_gradcheck_naive_float64() -> None:
    lengths = [0, 7, 1, 12]
    q, k, v = random_qkv(20, 20, 2, 1, 8, torch.float64)
    cu = cu_seqlens(lengths)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: moba.moba_naive(q, k, v, cu, 12, 3, 2),
        inputs,
        eps=1e-6,
        atol=1e-5,
        fast_mode=True,
    )


def test_decode_and_chunked_prefill_with_cu_seqlens_k() -> None:
    # Queries are the last positions of their keys: 1 (decode), 5 (chunk), all, none.
    lengths_q, lengths_k = [1, 5, 20, 0], [33, 29, 20, 6]
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 4, 2, 16)
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    kwargs = {"cu_seqlens_k": cu_k, "max_seqlen_k": 33, "return_lse": True}
    out, lse = moba.moba_attn_varlen(q, k, v, cu_q, 20, 8, 2, **kwargs)
    ref, ref_lse = moba.moba_naive(q, k, v, cu_q, 20, 8, 2, **kwargs)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)

    # The decode rows equal the last rows of the full prefill of the same keys.
    q_full = torch.randn(33, 4, 16)
    q_full[-1] = q[0]
    full = moba.moba_attn_varlen(q_full, k[:33], v[:33], cu_seqlens([33]), 33, 8, 2)
    torch.testing.assert_close(out[0], full[-1], **TOLERANCES[torch.float32])


def test_top_k_covering_all_blocks_is_causal_full_attention() -> None:
    q, k, v = random_qkv(45, 45, 4, 2, 16)
    out = moba.moba_attn_varlen(q, k, v, cu_seqlens([45]), 45, 8, 6)  # 6 blocks
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    # One block fewer than needed changes some outputs.
    sparse = moba.moba_attn_varlen(q, k, v, cu_seqlens([45]), 45, 8, 5)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_gqa_shared_routing() -> None:
    lengths = [40, 25]
    q, k, v = random_qkv(65, 65, 4, 2, 16)
    cu = cu_seqlens(lengths)
    shared = moba.routing(q, k, cu, 40, 5, 3, gqa_shared_routing=True)
    # Heads 0/1 share kv head 0, heads 2/3 kv head 1: one selection per group.
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 2], shared[:, 3])
    assert not torch.equal(moba.routing(q, k, cu, 40, 5, 3), shared)
    assert torch.equal(
        shared, moba.routing(q, k, cu, 40, 5, 3, gqa_shared_routing=True, backend="naive")
    )
    out = moba.moba_attn_varlen(q, k, v, cu, 40, 5, 3, gqa_shared_routing=True)
    ref = moba.moba_naive(q, k, v, cu, 40, 5, 3, gqa_shared_routing=True)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_routing_native_matches_naive(case: tuple, dtype: torch.dtype) -> None:
    lengths, hq, hkv, d, block, top_k = case
    q, k, _ = random_qkv(sum(lengths), sum(lengths), hq, hkv, d, dtype)
    cu = cu_seqlens(lengths)
    native = moba.routing(q, k, cu, max(lengths), block, top_k)
    reference = moba.routing(q, k, cu, max(lengths), block, top_k, backend="reference")
    naive = moba.routing(q, k, cu, max(lengths), block, top_k, backend="naive")
    width = max(1, min(top_k, -(-max(lengths) // block)))
    assert native.dtype == torch.int32 and native.shape == (sum(lengths), hq, width)
    assert torch.equal(native, reference)
    assert torch.equal(native, naive)


def test_routing_layout() -> None:
    q, k, _ = random_qkv(20, 20, 2, 1, 8)
    selected = moba.routing(q, k, cu_seqlens([20]), 20, 4, 3)  # 5 blocks, W = 3
    for t in range(20):
        current = t // 4
        for h in range(2):
            row = selected[t, h].tolist()
            chosen = [b for b in row if b >= 0]
            assert chosen == sorted(chosen) and chosen[-1] == current
            assert len(chosen) == min(3, current + 1)
            assert row[len(chosen) :] == [-1] * (3 - len(chosen))


def test_ties_go_to_the_lower_block_and_nan_ranks_lowest() -> None:
    # Four identical blocks: every past block scores the same for any query.
    block = torch.randn(4, 1, 8)
    k = block.repeat(5, 1, 1)  # 20 keys, blocks 0..4 identical
    q = torch.randn(20, 1, 8)
    cu = cu_seqlens([20])
    for backend in ("auto", "reference", "naive"):
        selected = moba.routing(q, k, cu, 20, 4, 3, backend=backend)
        assert selected[19, 0].tolist() == [0, 1, 4], backend  # ties -> blocks 0, 1
    # A NaN in block 0's keys makes its score NaN: it ranks below every number.
    k_nan = torch.randn(20, 1, 8)
    k_nan[1, 0, 3] = float("nan")
    for backend in ("auto", "naive"):
        selected = moba.routing(q, k_nan, cu, 20, 4, 4, backend=backend)
        assert 0 not in selected[19, 0].tolist(), backend
        selected = moba.routing(q, k_nan, cu, 20, 4, 5, backend=backend)
        assert selected[19, 0].tolist() == [0, 1, 2, 3, 4], backend


def test_block_means_are_rounded_to_the_input_dtype() -> None:
    # Keys whose fp32 block means round (in bf16) to equal values tie, so the
    # lower block wins; without rounding block 1 would win.
    k = torch.zeros(12, 1, 8)
    k[0:4, 0, 0] = 1.0
    k[4:8, 0, 0] = 1.0 + 2.0**-10  # the same in bf16 (8 bits of mantissa)
    k[8:12, 0, 0] = -1.0
    q = torch.zeros(12, 1, 8)
    q[:, 0, 0] = 1.0
    cu = cu_seqlens([12])
    for dtype, expected in ((torch.float32, [1, 2]), (torch.bfloat16, [0, 2])):
        for backend in ("auto", "naive"):
            selected = moba.routing(q.to(dtype), k.to(dtype), cu, 12, 4, 2, backend=backend)
            assert selected[11, 0].tolist() == expected, (dtype, backend)


def test_strided_inputs() -> None:
    # A packed qkv tensor: q, k, v are views with a token stride of 3 * H * D.
    qkv = torch.randn(30, 3, 2, 16)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = cu_seqlens([12, 18])
    out = moba.moba_attn_varlen(q, k, v, cu, 18, 4, 2)
    ref = moba.moba_naive(q.contiguous(), k.contiguous(), v.contiguous(), cu, 18, 4, 2)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])
    # A non-contiguous head dimension is copied, not rejected.
    out_t = moba.moba_attn_varlen(
        q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu, 18, 4, 2
    )
    torch.testing.assert_close(out_t, out)


def test_empty_batch() -> None:
    q, k, v = random_qkv(0, 0, 2, 1, 8)
    cu = cu_seqlens([0, 0])
    out, lse = moba.moba_attn_varlen(q, k, v, cu, 0, 4, 2, return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


def test_lse_carries_no_gradient_and_out_does() -> None:
    q, k, v = (t.requires_grad_() for t in random_qkv(10, 10, 2, 1, 8))
    out, lse = moba.moba_attn_varlen(q, k, v, cu_seqlens([10]), 10, 4, 2, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def test_opcheck() -> None:
    q, k, v = (t.requires_grad_() for t in random_qkv(24, 24, 4, 2, 8))
    cu = cu_seqlens([0, 9, 15])
    torch.library.opcheck(
        torch.ops.moba.attn_fwd.default, (q, k, v, cu, cu, 15, 15, 4, 2, None, False, "auto")
    )
    torch.library.opcheck(
        torch.ops.moba.routing.default,
        (q.detach(), k.detach(), cu, cu, 15, 15, 4, 2, False, "auto"),
    )


def test_softmax_scale() -> None:
    q, k, v = random_qkv(30, 30, 2, 2, 16)
    cu = cu_seqlens([30])
    out = moba.moba_attn_varlen(q, k, v, cu, 30, 8, 2, softmax_scale=0.5)
    torch.testing.assert_close(out, moba.moba_naive(q, k, v, cu, 30, 8, 2, softmax_scale=0.5))
    assert not torch.allclose(out, moba.moba_attn_varlen(q, k, v, cu, 30, 8, 2), atol=1e-3)


# -- errors -------------------------------------------------------------------


def _args() -> tuple:
    q, k, v = random_qkv(10, 10, 2, 1, 16)
    return q, k, v, cu_seqlens([10]), 10


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"moba_chunk_size": 0}, ValueError, "moba_chunk_size"),
        ({"moba_topk": 0}, ValueError, "moba_topk"),
        ({"moba_chunk_size": 2.5}, TypeError, "moba_chunk_size"),
        ({"backend": "tpu"}, ValueError, "backend"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"softmax_scale": -1.0}, ValueError, "softmax_scale"),
        ({"max_seqlen": 5}, ValueError, "max_seqlen"),
    ],
)
def test_bad_arguments(change: dict, error: type, match: str) -> None:
    q, k, v, cu, max_seqlen = _args()
    kwargs = {"moba_chunk_size": 4, "moba_topk": 2, "max_seqlen": max_seqlen, **change}
    with pytest.raises(error, match=match):
        moba.moba_attn_varlen(q, k, v, cu, **kwargs)


def test_bad_tensors() -> None:
    q, k, v, cu, n = _args()
    with pytest.raises(ValueError, match="head dim"):
        moba.moba_attn_varlen(q[..., :12], k[..., :12], v[..., :12], cu, n, 4, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected dtype torch\.int32"):
        moba.moba_attn_varlen(q, k, v, cu.long(), n, 4, 2)
    with pytest.raises(ValueError, match="float64"):
        moba.moba_attn_varlen(q.double(), k.double(), v.double(), cu, n, 4, 2)
    with pytest.raises(ValueError, match="k: dtype"):
        moba.moba_attn_varlen(q, k.half(), v, cu, n, 4, 2)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        moba.moba_attn_varlen(
            q[:, :1].repeat(1, 3, 1), k.repeat(1, 2, 1), v.repeat(1, 2, 1), cu, n, 4, 2
        )
    with pytest.raises(ValueError, match="cu_seqlens_q: last entry"):
        moba.moba_attn_varlen(q, k, v, cu_seqlens([9]), n, 4, 2)
    with pytest.raises(ValueError, match="q: expected 3 dimensions"):
        moba.moba_attn_varlen(q[None], k, v, cu, n, 4, 2)


def test_native_errors_map_to_python_exceptions() -> None:
    q, k, v, cu, _ = _args()
    out, lse = torch.empty_like(q), torch.empty(2, 10)

    def forward(block_size: int = 4, backend: str = "auto") -> None:
        _native.forward(q, k, v, cu, cu, 0, 0, out, lse, block_size, 2, None, False, backend, 1, 0)

    with pytest.raises(ValueError, match="block_size: expected >= 1, got 0"):
        forward(block_size=0)
    with pytest.raises(ValueError, match="backend: unknown name"):
        forward(backend="tpu")
    if _native.built_with_cuda:
        with pytest.raises(ValueError, match="expects tensors on a CUDA device"):
            forward(backend="cuda")
    else:
        # backend_unavailable is not the caller's argument error: RuntimeError.
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            forward(backend="cuda")
    forward()
    torch.testing.assert_close(out, moba.moba_naive(q, k, v, cu, 10, 4, 2))


def test_backend_available() -> None:
    assert moba.backend_available("cpu") and moba.backend_available("reference")
    assert isinstance(moba.backend_available("cuda"), bool)
    with pytest.raises(ValueError, match="backend"):
        moba.backend_available("tpu")
