"""The key tests on CUDA tensors. Skipped without a GPU or without the native
CUDA backend; with a GPU but no CUDA backend, the op must refuse clearly
instead of copying to the CPU."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import moba

from helpers import TOLERANCES, cu_seqlens, random_qkv

HAS_GPU = torch.cuda.is_available()
HAS_CUDA_BACKEND = HAS_GPU and moba.backend_available("cuda")

needs_cuda_backend = pytest.mark.skipif(
    not HAS_CUDA_BACKEND, reason="needs a GPU and moba built with its CUDA backend"
)

# The CUDA kernels take half-precision inputs (tensor cores); float32 on a GPU
# is either supported or refused with a ValueError naming the dtype.
HALF = [torch.float16, torch.bfloat16]
GRAD_TOLERANCES = {
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 1e-1, "rtol": 5e-2},
}
CASES = [
    ([0, 1, 23, 0, 40], 4, 2, 64, 5, 3),
    ([96, 31, 2], 8, 2, 64, 12, 4),
    ([128], 4, 4, 128, 16, 100),
]


@pytest.mark.skipif(
    not HAS_GPU or moba._native.built_with_cuda, reason="needs a GPU and a build without CUDA"
)
def test_cuda_tensors_without_cuda_backend_raise_clearly() -> None:
    q, k, v = random_qkv(10, 10, 2, 1, 16, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA backend"):
        moba.moba_attn_varlen(q, k, v, cu_seqlens([10], "cuda"), 10, 4, 2)


@needs_cuda_backend
def test_float32_runs_or_is_refused_clearly() -> None:
    q, k, v = random_qkv(40, 40, 4, 2, 64)
    cu = cu_seqlens([40])
    gpu = [t.cuda() for t in (q, k, v, cu)]
    refusal = ""
    try:
        out = moba.moba_attn_varlen(*gpu, 40, 8, 2)
    except ValueError as error:
        refusal = str(error)
    if refusal:
        assert "float32" in refusal
    else:
        ref = moba.moba_naive(q, k, v, cu, 40, 8, 2)
        torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_routing_match_cpu(case: tuple, dtype: torch.dtype) -> None:
    lengths, hq, hkv, d, block, top_k = case
    total = sum(lengths)
    q, k, v = random_qkv(total, total, hq, hkv, d, dtype)
    cu = cu_seqlens(lengths)
    gpu = [t.cuda() for t in (q, k, v, cu)]
    out, lse = moba.moba_attn_varlen(*gpu, max(lengths), block, top_k, return_lse=True)
    ref, ref_lse = moba.moba_naive(q, k, v, cu, max(lengths), block, top_k, return_lse=True)
    assert out.is_cuda and lse.is_cuda
    torch.testing.assert_close(out.cpu(), ref, **TOLERANCES[dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-3, rtol=1e-4)
    selected = moba.routing(gpu[0], gpu[1], gpu[3], max(lengths), block, top_k)
    assert torch.equal(selected.cpu(), moba.routing(q, k, cu, max(lengths), block, top_k))


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_naive(case: tuple, dtype: torch.dtype) -> None:
    lengths, hq, hkv, d, block, top_k = case
    total = sum(lengths)
    q64, k64, v64 = random_qkv(total, total, hq, hkv, d, torch.float64)
    dout = torch.randn(total, hq, d, dtype=torch.float64)
    cu = cu_seqlens(lengths)
    q, k, v = (t.to("cuda", dtype).requires_grad_() for t in (q64, k64, v64))
    out = moba.moba_attn_varlen(q, k, v, cu.cuda(), max(lengths), block, top_k)
    out.backward(dout.to("cuda", dtype))
    # The reference sees the same (rounded) inputs, in float64.
    qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    moba.moba_naive(qr, kr, vr, cu, max(lengths), block, top_k).backward(dout.to(dtype).double())
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want, **GRAD_TOLERANCES[dtype])


@needs_cuda_backend
def test_decode_with_cu_seqlens_k_on_a_side_stream() -> None:
    lengths_q, lengths_k = [1, 5, 20], [33, 29, 20]
    q, k, v = random_qkv(sum(lengths_q), sum(lengths_k), 4, 2, 64, torch.float16)
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    ref = moba.moba_naive(q, k, v, cu_q, 20, 8, 2, cu_seqlens_k=cu_k, max_seqlen_k=33)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = [t.cuda() for t in (q, k, v, cu_q)]
        out = moba.moba_attn_varlen(*gpu, 20, 8, 2, cu_seqlens_k=cu_k.cuda(), max_seqlen_k=33)
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), ref, **TOLERANCES[torch.float16])


@needs_cuda_backend
def test_compile_fullgraph_on_cuda() -> None:
    q, k, v = random_qkv(57, 57, 4, 2, 64, torch.bfloat16, device="cuda")
    cu = cu_seqlens([17, 0, 40], "cuda")

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return moba.moba_attn_varlen(q, k, v, cu, 40, 8, 2).float().sum(-1)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v))


def _tiny_llama(transformers: ModuleType) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


@needs_cuda_backend
def test_tiny_llama_on_cuda_matches_naive() -> None:
    transformers = pytest.importorskip("transformers")
    moba.register(block_size=8, top_k=2)
    model = _tiny_llama(transformers).to("cuda", torch.float16).eval()
    ids = torch.randint(1, 128, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    results = {}
    for implementation in ("moba", "moba_naive"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = model(ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    torch.testing.assert_close(
        results["moba"][keep], results["moba_naive"][keep], atol=2e-2, rtol=2e-2
    )


@needs_cuda_backend
def test_tiny_llama_loss_backward_on_cuda_matches_naive() -> None:
    """A training step of a transformers model with attn_implementation="moba":
    loss.backward() runs the CUDA backward. Against the pure-PyTorch MoBA in
    float32, every parameter's bf16 gradient is as close as the pure-PyTorch
    MoBA's own bf16 gradient (the rounding of a bf16 model is several percent
    here; a wrong attention gradient is off by its whole size)."""
    transformers = pytest.importorskip("transformers")
    moba.register(block_size=8, top_k=2)
    torch.manual_seed(0)
    model = _tiny_llama(transformers).to("cuda").train()
    ids = torch.randint(1, 128, (2, 56), device="cuda")

    def grads(implementation: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        copy = _tiny_llama(transformers).to("cuda", dtype).train()
        copy.load_state_dict(model.state_dict())
        copy.set_attn_implementation(implementation)
        copy(ids, labels=ids).loss.backward()
        return {n: p.grad.double() for n, p in copy.named_parameters()}

    exact = grads("moba_naive", torch.float32)
    naive = grads("moba_naive", torch.bfloat16)
    got = grads("moba", torch.bfloat16)
    for name, want in exact.items():
        assert torch.isfinite(got[name]).all(), name
        error = torch.linalg.vector_norm(got[name] - want)
        naive_error = torch.linalg.vector_norm(naive[name] - want)
        bound = 3 * naive_error + 1e-2 * torch.linalg.vector_norm(want)
        assert error <= bound, (name, error.item(), naive_error.item())
