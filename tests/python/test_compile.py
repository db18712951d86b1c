"""torch.compile traces the op without graph breaks (fake kernels, autograd)."""

from __future__ import annotations

import torch

import moba

from helpers import cu_seqlens, random_qkv


def _attention_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = moba.moba_attn_varlen(q * 1.5, k, v, cu, 40, 8, 2, return_lse=True)
    return torch.nn.functional.silu(out).sum(dim=-1), lse


def test_compile_fullgraph_forward_and_backward_match_eager() -> None:
    torch._dynamo.reset()
    q, k, v = random_qkv(57, 57, 4, 2, 16)
    cu = cu_seqlens([17, 0, 40])
    compiled = torch.compile(_attention_block, fullgraph=True)

    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    out_c, lse_c = compiled(*leaves_c, cu)
    out_e, lse_e = _attention_block(*leaves_e, cu)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(lse_c, lse_e)

    out_c.square().sum().backward()
    out_e.square().sum().backward()
    for got, want in zip(leaves_c, leaves_e, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_compile_routing_fullgraph() -> None:
    torch._dynamo.reset()
    q, k, _ = random_qkv(30, 30, 2, 1, 8)
    cu = cu_seqlens([30])

    def route(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return moba.routing(q, k, cu, 30, 4, 3)

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), route(q, k))
