#!/usr/bin/env python3
"""CUDA forward of MoBA against the dense peers (shared/BENCHMARKS.md).

Calls libmoba.so through the C API (include/moba/moba.h) with ctypes on
torch tensors, on torch's current stream. Dense peers are
torch.nn.functional.scaled_dot_product_attention(is_causal=True) forced to
FLASH_ATTENTION and CUDNN_ATTENTION with torch.nn.attention.sdpa_kernel, in
the [batch, heads, tokens, D] layout, in the same process. Times are the
median of CUDA-event timings after a warm-up.

  python3 bench/cuda/bench_forward.py --lib build/src/libmoba.so --out results.json
  python3 bench/cuda/bench_forward.py --lib ... --check     # large-shape correctness vs torch
  python3 bench/cuda/bench_forward.py --lib ... --routing-only --out routing.json
      # moba_routing alone (S at 128K/512K, P at 1M by default), plus the
      # routing kernel's own time from one profiled call

TFLOP/s count only the work each method must do: for MoBA the attention
over the keys each query attends to (4*D flops per query, head and key) plus
its gate scores (2*D per past block); for the dense peers causal attention.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ---------------------------------------------------------------- C API ----


class MobaTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * 4),
        ("strides", ctypes.c_int64 * 4),
        ("device_type", ctypes.c_int),
        ("device_index", ctypes.c_int32),
    ]


class MobaInputs(ctypes.Structure):
    _fields_ = [(n, MobaTensor) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")] + [
        ("max_seqlen_q", ctypes.c_int64),
        ("max_seqlen_k", ctypes.c_int64),
    ]


class MobaConfig(ctypes.Structure):
    _fields_ = [
        ("block_size", ctypes.c_int64),
        ("top_k", ctypes.c_int64),
        ("softmax_scale", ctypes.c_float),
        ("gqa_shared_routing", ctypes.c_int32),
    ]


class MobaOptions(ctypes.Structure):
    _fields_ = [
        ("backend", ctypes.c_int),
        ("num_threads", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
        ("deterministic", ctypes.c_int32),
    ]


DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3}
BACKEND_CPU, BACKEND_CUDA = 2, 3


class Problem(NamedTuple):
    """One MoBA call's inputs and shape: packed q, k, v, their cu_seqlens and longest
    sequences, block size and top-k."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    block: int
    top_k: int


class Moba:
    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        self.lib.moba_forward.restype = ctypes.c_int
        self.lib.moba_backward.restype = ctypes.c_int
        self.lib.moba_routing.restype = ctypes.c_int
        self.lib.moba_backend_available.restype = ctypes.c_int
        self.lib.moba_last_error.restype = ctypes.c_char_p
        self.lib.moba_version.restype = ctypes.c_char_p

    def version(self) -> str:
        return str(self.lib.moba_version().decode())

    def cuda_available(self) -> bool:
        return bool(self.lib.moba_backend_available(BACKEND_CUDA))

    @staticmethod
    def tensor(t: torch.Tensor) -> MobaTensor:
        m = MobaTensor()
        m.data = t.data_ptr() if t.numel() else None
        m.dtype = DTYPES[t.dtype]
        m.ndim = t.dim()
        for i in range(t.dim()):
            m.shape[i] = t.shape[i]
            m.strides[i] = t.stride(i)
        m.device_type = 1 if t.is_cuda else 0
        m.device_index = (t.device.index or 0) if t.is_cuda else 0
        return m

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"moba status {status}: {self.lib.moba_last_error().decode()}")

    def _call(
        self,
        entry: Any,
        problem: Problem,
        results: tuple[torch.Tensor, ...],
        deterministic: bool = False,
    ) -> None:
        """Calls the C entry point ENTRY(inputs, config, *results, options)."""
        p = problem
        inputs = MobaInputs(
            *(self.tensor(t) for t in (p.q, p.k, p.v, p.cu_q, p.cu_k)), p.max_q, p.max_k
        )
        config = MobaConfig(p.block, p.top_k, 0.0, 0)
        # CPU tensors (a smoke test off the GPU) run on the fast CPU backend.
        if p.q.is_cuda:
            backend, stream = BACKEND_CUDA, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        else:
            backend, stream = BACKEND_CPU, ctypes.c_void_p()
        options = MobaOptions(backend, 0, stream, int(deterministic))
        views = [self.tensor(t) for t in results]
        self._check(
            entry(
                ctypes.byref(inputs),
                ctypes.byref(config),
                *(ctypes.byref(view) for view in views),
                ctypes.byref(options),
            )
        )

    def forward(self, problem: Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
        self._call(self.lib.moba_forward, problem, (out, lse))

    def backward(
        self,
        problem: Problem,
        out: torch.Tensor,
        dout: torch.Tensor,
        lse: torch.Tensor,
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        deterministic: bool = False,
    ) -> None:
        """dq, dk, dv (``grads``) from the forward's out and lse."""
        self._call(self.lib.moba_backward, problem, (out, dout, lse, *grads), deterministic)

    def routing(self, problem: Problem, selected: torch.Tensor) -> None:
        self._call(self.lib.moba_routing, problem, (selected,))


# -------------------------------------------------------------- helpers ----


def cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32, device=device)


def moba_flops(seq_len: int, heads: int, d: int, block: int, top_k: int) -> float:
    """Flops MoBA must do for one sequence of seq_len queries (prefill)."""
    p = np.arange(seq_len, dtype=np.int64)
    c = p // block
    keys = np.minimum(c, top_k - 1) * block + (p - c * block + 1)
    return heads * (4.0 * d * keys.sum() + 2.0 * d * c.sum())


def dense_flops(seq_len: int, heads: int, d: int) -> float:
    return heads * 2.0 * d * seq_len * (seq_len + 1)


def time_ms(fn: Callable[[], object], budget_s: float = 3.0, max_reps: int = 20) -> float:
    """Median of CUDA-event timings; the first call warms up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = max(2, min(max_reps, int(budget_s * 1000 / max(first, 1e-3))))
    times = [first]
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def git_commit() -> str:
    """MOBA_GIT_COMMIT where set (a copied tree, e.g. on a lent GPU machine whose own checkout
    is not what runs), else this checkout's HEAD."""
    if os.environ.get("MOBA_GIT_COMMIT"):
        return os.environ["MOBA_GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------ benchmark ----

CONFIGS = {
    # name: (batch, heads_q, heads_kv, D, block, top_k)
    "P": (1, 32, 8, 128, 4096, 12),
    "S": (2, 16, 16, 128, 128, 8),
    # One tensor-parallel shard (4-way) of config P's layer: issue 4's memory
    # check runs it at 10M tokens (the dense peers are skipped there).
    "P_shard": (1, 8, 2, 128, 4096, 12),
}


def run_case(
    moba: Moba,
    name: str,
    tokens: int,
    peers: int,
    records: list[dict[str, Any]],
    meta: dict[str, Any],
    top_k: int | None = None,
) -> None:
    batch, hq, hkv, d, block, k = CONFIGS["P" if name == "dense_switch" else name]
    if top_k is not None:
        k = top_k
    dev = torch.device("cuda")
    total = batch * tokens
    torch.manual_seed(tokens)
    q = torch.randn(total, hq, d, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
    cu = cu_seqlens([tokens] * batch, dev)
    out = torch.empty_like(q)
    lse = torch.empty(hq, total, device=dev, dtype=torch.float32)

    def record(method: str, ms: float | None, flops: float, note: str | None = None) -> None:
        rec = dict(
            meta,
            config=name,
            tokens=tokens,
            batch=batch,
            heads_q=hq,
            heads_kv=hkv,
            head_dim=d,
            block_size=block,
            top_k=k,
            method=method,
            median_ms=round(ms, 4) if ms is not None else None,
            tflops=round(flops / (ms * 1e9), 2) if ms else None,
        )
        if note:
            rec["note"] = note
        records.append(rec)
        shown_ms = ms if ms is not None else float("nan")
        shown_tflops = rec["tflops"] if rec["tflops"] is not None else ""
        print(
            f"{name:13s} {tokens:>8d} {method:14s} {shown_ms:12.3f} ms "
            f"{shown_tflops:>8} TFLOP/s {note or ''}",
            flush=True,
        )

    # functools.partial binds the tensors themselves (a closure would bind the
    # names): the only references left after time_ms returns are the locals,
    # so the del below really frees out and lse before the dense peers run.
    ms = time_ms(
        functools.partial(
            moba.forward, Problem(q, kk, v, cu, cu, tokens, tokens, block, k), out, lse
        )
    )
    record("moba_cuda", ms, batch * moba_flops(tokens, hq, d, block, k))
    del out, lse
    torch.cuda.empty_cache()

    dflops = batch * dense_flops(tokens, hq, d)
    for peer, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):
        if tokens > peers:
            record(peer, None, dflops, f"skipped: above --peer-max-tokens {peers} (takes too long)")
            continue
        qd = q.view(batch, tokens, hq, d).transpose(1, 2).contiguous()
        kd = (
            kk.view(batch, tokens, hkv, d)
            .transpose(1, 2)
            .repeat_interleave(hq // hkv, dim=1)
            .contiguous()
        )
        vd = (
            v.view(batch, tokens, hkv, d)
            .transpose(1, 2)
            .repeat_interleave(hq // hkv, dim=1)
            .contiguous()
        )
        try:
            with sdpa_kernel(backend):
                ms = time_ms(
                    functools.partial(F.scaled_dot_product_attention, qd, kd, vd, is_causal=True),
                    budget_s=2.0,
                    max_reps=5,
                )
            record(peer, ms, dflops)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            record(peer, None, dflops, f"failed: {str(e).splitlines()[0][:160]}")
        del qd, kd, vd
        torch.cuda.empty_cache()


def forward_call(moba: Moba, name: str, tokens: int) -> Callable[[], None]:
    """One MoBA forward of config NAME (dense_switch: P with top-k over every block) on random
    bf16 inputs, ready to call."""
    batch, hq, hkv, d, block, k = CONFIGS["P" if name == "dense_switch" else name]
    if name == "dense_switch":
        k = (tokens + block - 1) // block
    dev = torch.device("cuda")
    total = batch * tokens
    q = torch.randn(total, hq, d, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
    cu = cu_seqlens([tokens] * batch, dev)
    out = torch.empty_like(q)
    lse = torch.empty(hq, total, device=dev, dtype=torch.float32)
    return functools.partial(
        moba.forward, Problem(q, kk, v, cu, cu, tokens, tokens, block, k), out, lse
    )


def profile_case(moba: Moba, name: str, tokens: int) -> None:
    """Kernel-by-kernel CUDA time of one MoBA forward (after a warm-up)."""
    call = forward_call(moba, name, tokens)
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(f"profile {name} {tokens}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    )
    # call holds the only references to the tensors: dropping it frees them.
    del call
    torch.cuda.empty_cache()


def kernel_times_us(call: Callable[[], object]) -> dict[str, float]:
    """CUDA time per kernel name (microseconds) of one call, under torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None)
        if us is None:
            us = getattr(evt, "cuda_time_total", 0.0)
        if us:
            times[evt.key] = times.get(evt.key, 0.0) + float(us)
    return times


def routing_case(
    moba: Moba, name: str, tokens: int, records: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """Times the C routing entry (moba_routing: sequence tables, block means,
    the routing kernel, the invalid-input check) for one config, and the
    routing kernel alone from one profiled call."""
    batch, hq, hkv, d, block, k = CONFIGS[name]
    dev = torch.device("cuda")
    total = batch * tokens
    torch.manual_seed(tokens)
    q = torch.randn(total, hq, d, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(total, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.empty(total, hkv, d, device=dev, dtype=torch.bfloat16)  # routing never reads v
    cu = cu_seqlens([tokens] * batch, dev)
    width = min(k, (tokens + block - 1) // block)
    sel = torch.empty(total, hq, width, device=dev, dtype=torch.int32)
    call = functools.partial(moba.routing, Problem(q, kk, v, cu, cu, tokens, tokens, block, k), sel)
    ms = time_ms(call)
    kernels = kernel_times_us(call)
    route_us = sum(us for name_, us in kernels.items() if "route" in name_)
    # Gate scores: one D-dot per (query, head, past block).
    c = np.arange(tokens, dtype=np.int64) // block
    flops = batch * hq * 2.0 * d * float(c.sum())
    rec = dict(
        meta,
        config=name,
        tokens=tokens,
        batch=batch,
        heads_q=hq,
        heads_kv=hkv,
        head_dim=d,
        block_size=block,
        top_k=k,
        method="moba_cuda_routing",
        median_ms=round(ms, 4),
        route_kernel_ms=round(route_us / 1000.0, 4),
        score_tflops=round(flops / (ms * 1e9), 2),
        kernels_us={key: round(us, 1) for key, us in sorted(kernels.items())},
    )
    records.append(rec)
    print(
        f"routing {name:2s} {tokens:>8d}: call {ms:9.3f} ms, route kernel "
        f"{route_us / 1000.0:9.3f} ms ({rec['score_tflops']} TFLOP/s of gate scores)",
        flush=True,
    )
    del call, q, kk, v, sel
    torch.cuda.empty_cache()


# -------------------------------------------------------------- checks -----


def torch_moba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    top_k: int,
    heads: list[int],
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """MoBA routing for one prefill sequence in torch (fp32 math), with the
    spec's tie rule, for the given query heads. Returns the block means kbar
    [nb, hkv, d] and, per head, the chosen-block mask [n, nb] and the gate
    scores [n, nb] (-inf for blocks that are not in the past)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nb = (n + block - 1) // block
    pad = nb * block - n
    # Block sums in fp64 (exact for bf16/fp16 inputs), the mean rounded to
    # fp32 and then to the input dtype, as the spec says.
    kf = F.pad(k.double(), (0, 0, 0, 0, 0, pad)).view(nb, block, hkv, d)
    counts = torch.full((nb,), float(block), device=q.device, dtype=torch.float64)
    counts[-1] = block - pad
    kbar = (kf.sum(1) / counts[:, None, None]).float().to(q.dtype).float()  # [nb, hkv, d]
    pos = torch.arange(n, device=q.device)
    cur = pos // block
    sels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for h in heads:
        s = q[:, h].float() @ kbar[:, h // g].T  # [n, nb]
        past = torch.arange(nb, device=q.device)[None, :] < cur[:, None]
        s = torch.where(past, s, torch.full_like(s, -float("inf")))
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, : max(top_k - 1, 0)]
        chosen = torch.zeros(n, nb + 1, dtype=torch.bool, device=q.device)
        if top_k > 1:
            valid = torch.gather(past, 1, order)
            chosen.scatter_(1, torch.where(valid, order, nb), True)
        chosen = chosen[:, :nb]
        chosen[pos, cur] = True
        sels[h] = (chosen, s)
    return kbar, sels


def max_nan_as_inf(e: torch.Tensor) -> float:
    """The largest element, NaN counting as an infinite error (Python's max
    would skip it)."""
    return torch.where(torch.isnan(e), torch.full_like(e, float("inf")), e).max().item()


def check(moba: Moba, log: Callable[[str], object]) -> bool:
    dev = torch.device("cuda")
    ok = True

    # 1. Dense switch at 32K in P's shape against cuDNN's SDPA.
    tokens, hq, hkv, d, block = 32768, 32, 8, 128, 4096
    torch.manual_seed(1)
    q = torch.randn(tokens, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(tokens, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(tokens, hkv, d, device=dev, dtype=torch.bfloat16)
    cu = cu_seqlens([tokens], dev)
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(hq, tokens, device=dev)
    moba.forward(Problem(q, k, v, cu, cu, tokens, tokens, block, 8), out, lse)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None].contiguous(),
            k.transpose(0, 1).repeat_interleave(4, 0)[None].contiguous(),
            v.transpose(0, 1).repeat_interleave(4, 0)[None].contiguous(),
            is_causal=True,
        )[0].transpose(0, 1)
    err = (out.float() - ref.float()).abs()
    line = (
        f"check dense_switch 32K P-shape vs cuDNN SDPA: max abs {err.max().item():.3e} "
        f"mean abs {err.mean().item():.3e} nan {out.isnan().any().item()}"
    )
    log(line)
    ok &= bool(err.max().item() < 3e-2 and not out.isnan().any().item())
    del q, k, v, out, lse, ref
    torch.cuda.empty_cache()

    # 2. MoBA against a torch implementation: P-like (block 4096, top-k 3) at
    #    24K and S-like (block 128, top-k 8) at 16K; heads 0..7.
    for name, tokens, hq, hkv, block, top_k in (
        ("P-like", 24576, 32, 8, 4096, 3),
        ("S-like", 16384, 16, 16, 128, 8),
    ):
        torch.manual_seed(tokens)
        q = torch.randn(tokens, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(tokens, hkv, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(tokens, hkv, d, device=dev, dtype=torch.bfloat16)
        cu = cu_seqlens([tokens], dev)
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(hq, tokens, device=dev)
        problem = Problem(q, k, v, cu, cu, tokens, tokens, block, top_k)
        moba.forward(problem, out, lse)
        nb = (tokens + block - 1) // block
        width = min(top_k, nb)
        sel = torch.full((tokens, hq, width), -7, dtype=torch.int32, device=dev)
        moba.routing(problem, sel)
        heads = list(range(8))
        kbar, ref_sel = torch_moba(q, k, v, block, top_k, heads)
        scale = 1.0 / math.sqrt(d)
        g = hq // hkv
        worst_out, worst_lse, mism, bad_ties = 0.0, 0.0, 0, 0
        pos = torch.arange(tokens, device=dev)
        for h in heads:
            chosen_ref, scores = ref_sel[h]
            # -1 padding goes to a spare column (scatter with repeated
            # indices would leave the winner undefined).
            mine = torch.zeros(tokens, nb + 1, dtype=torch.bool, device=dev)
            s = sel[:, h].long()
            mine.scatter_(1, torch.where(s >= 0, s, nb), True)
            mine = mine[:, :nb]
            diff = (mine != chosen_ref).any(1)
            mism += int(diff.sum())
            if diff.any():
                # Disagreements are allowed only between near-equal scores.
                rows = diff.nonzero()[:, 0]
                a = torch.where(mine[rows] & ~chosen_ref[rows], scores[rows], torch.nan)
                b = torch.where(chosen_ref[rows] & ~mine[rows], scores[rows], torch.nan)
                gap = (a.nan_to_num(-1e30).max(1).values - b.nan_to_num(1e30).min(1).values).abs()
                mag = (q[rows, h].float().abs() @ kbar[:, h // g].abs().T).max(1).values
                bad_ties += int((gap > 1e-5 * mag + 1e-6).sum())
            # Attention over our own selection (fp32) vs our output.
            keymask = mine.repeat_interleave(block, 1)[:, :tokens] & (pos[None, :] <= pos[:, None])
            logits = (q[:, h].float() @ k[:, h // g].float().T) * scale
            logits = logits.masked_fill(~keymask, -float("inf"))
            ref_lse = torch.logsumexp(logits, 1)
            ref_out = torch.softmax(logits, 1) @ v[:, h // g].float()
            worst_out = max(worst_out, max_nan_as_inf((out[:, h].float() - ref_out).abs()))
            worst_lse = max(worst_lse, max_nan_as_inf((lse[h] - ref_lse).abs()))
            del logits, keymask
        line = (
            f"check {name} {tokens} tokens block {block} top-k {top_k} (heads 0-7): "
            f"selection mismatches {mism} (beyond the near-tie allowance: {bad_ties}); "
            f"out max abs {worst_out:.3e}; lse max abs {worst_lse:.3e}; "
            f"nan {out.isnan().any().item()}"
        )
        log(line)
        out_has_nan = out.isnan().any().item()
        ok &= bad_ties == 0 and worst_out < 3e-2 and worst_lse < 2e-3 and not out_has_nan
        del q, k, v, out, lse, sel, kbar, ref_sel
        torch.cuda.empty_cache()
    return ok


def format_ms(x: float | None) -> str:
    return f"{x:9.2f}" if x else "        -"


def format_speedup(x: float | None, base: float | None) -> str:
    return f"{x / base:7.2f}x" if x and base else "       -"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--lib",
        required=True,
        help="path of libmoba.so built with -DMOBA_CUDA=ON -DBUILD_SHARED_LIBS=ON",
    )
    ap.add_argument("--out", help="JSON file to write (a list of case objects)")
    ap.add_argument(
        "--check", action="store_true", help="run the large-shape correctness checks and exit"
    )
    ap.add_argument("--configs", default="P,S,dense_switch")
    ap.add_argument("--p-tokens", default="131072,262144,524288,1048576")
    ap.add_argument("--s-tokens", default="8192,32768,131072,524288")
    ap.add_argument("--dense-tokens", default="32768,131072")
    ap.add_argument(
        "--shard-tokens",
        default="10485760",
        help="tokens for config P_shard (8 q / 2 kv heads); run when --configs names P_shard",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="CONFIG:TOKENS[,...]: per-kernel times of one MoBA call (torch.profiler)",
    )
    ap.add_argument(
        "--routing-only",
        action="store_true",
        help="time moba_routing alone for --routing-cases and exit",
    )
    ap.add_argument(
        "--routing-cases",
        default="S:131072,S:524288,P:1048576",
        help="CONFIG:TOKENS[,...] for --routing-only",
    )
    ap.add_argument(
        "--peer-max-tokens",
        type=int,
        default=262144,
        help="skip the dense peers above this many tokens per sequence (cuDNN needs 4.5 s at 512K)",
    )
    args = ap.parse_args()
    moba = Moba(args.lib)
    if args.check:
        ok = check(moba, print)
        print("CHECK", "PASSED" if ok else "FAILED")
        sys.exit(0 if ok else 1)

    if args.profile:
        for item in args.profile.split(","):
            name, tokens = item.split(":")
            profile_case(moba, name, int(tokens))
        return

    meta: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        torch=torch.__version__,
        cudnn=torch.backends.cudnn.version(),
        dtype="bfloat16",
    )
    print(f"device {meta['device']}, torch {meta['torch']}, cuDNN {meta['cudnn']}")
    records: list[dict[str, Any]] = []
    if args.routing_only:
        for item in args.routing_cases.split(","):
            name, tokens = item.split(":")
            if name not in CONFIGS:
                ap.error(f"--routing-cases: config {name!r} is not one of {sorted(CONFIGS)}")
            routing_case(moba, name, int(tokens), records, meta)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
        return
    configs = args.configs.split(",")
    cases: list[tuple[str, int, int | None]] = []
    if "P" in configs:
        cases += [("P", n, None) for n in map(int, args.p_tokens.split(","))]
    if "S" in configs:
        cases += [("S", n, None) for n in map(int, args.s_tokens.split(","))]
    if "P_shard" in configs:
        cases += [("P_shard", n, None) for n in map(int, args.shard_tokens.split(","))]
    if "dense_switch" in configs:
        # top-k covering every block of 4096: MoBA must equal dense attention.
        cases += [
            ("dense_switch", n, (n + 4095) // 4096) for n in map(int, args.dense_tokens.split(","))
        ]
    for name, n, top_k in cases:
        run_case(moba, name, n, args.peer_max_tokens, records, meta, top_k=top_k)
        # Written after every case, so a run stopped by a time limit keeps what it measured.
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
    # Ratios side by side.
    print("\nconfig        tokens   moba ms    cuDNN ms  speedup  FA2 ms   speedup")
    by: dict[tuple[str, int], dict[str, float | None]] = {}
    for r in records:
        by.setdefault((r["config"], r["tokens"]), {})[r["method"]] = r["median_ms"]
    for (c, n), m in by.items():
        mo, cd, fa = m.get("moba_cuda"), m.get("sdpa_cudnn"), m.get("sdpa_flash")
        print(
            f"{c:13s} {n:>8d} {format_ms(mo)} {format_ms(cd)} {format_speedup(cd, mo)} "
            f"{format_ms(fa)} {format_speedup(fa, mo)}"
        )


if __name__ == "__main__":
    main()
