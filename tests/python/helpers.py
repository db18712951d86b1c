"""Helpers of the moba Python tests: small random varlen problems."""

from __future__ import annotations

import torch


def cu_seqlens(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu.to(device)


def random_qkv(
    total_q: int,
    total_k: int,
    heads_q: int,
    heads_kv: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(total_q, heads_q, dim, dtype=dtype, device=device)
    k = torch.randn(total_k, heads_kv, dim, dtype=dtype, device=device)
    v = torch.randn(total_k, heads_kv, dim, dtype=dtype, device=device)
    return q, k, v


# Output tolerances per input dtype: about two units in the last place of the
# output (the op rounds once from high precision, moba_naive from fp32).
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2.5e-2, "rtol": 2.5e-2},
}
