#!/usr/bin/env python3
"""Forward + backward of one MoBA attention layer against the dense peers (shared/BENCHMARKS.md).

MoBA runs through the public op ``moba.moba_attn_varlen`` with autograd (the
``torch.library`` custom op of the installed package) or, with ``--lib``, through
the C API of a ``libmoba.so`` (``moba_forward`` with the lse, then ``moba_backward``,
by ctypes on torch's stream, outputs and gradients allocated once per case): the
same kernels without the package, for machines where it is not installed. In both
backward modes:
``moba_fast`` (the default: dK/dV by atomics) and ``moba_deterministic``
(``torch.use_deterministic_algorithms(True)``: bitwise reproducible gradients).
The dense peers are ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
forced to ``FLASH_ATTENTION`` (``sdpa_flash``) and ``CUDNN_ATTENTION``
(``sdpa_cudnn``) with ``torch.nn.attention.sdpa_kernel``, in the same process.
GQA runs natively (``enable_gqa=True``) where the backend takes it; otherwise K
and V are expanded to the query heads before timing, and the JSON says so.

Every timed call is one training step of the layer: forward, then
``torch.autograd.grad`` of (q, k, v) for a fixed random dO, with CUDA events
before, between and after, so one call gives the forward time, the backward
time and their sum. Reported: the medians of each after one warm-up call, and
the peak GPU memory of the method (``torch.cuda.max_memory_allocated``, inputs
included). The case of config P at 1M tokens is the 1M memory check: it must fit
an 80 GB GPU.

  python3 bench/cuda/bench_backward.py --out bwd.json
  python3 bench/cuda/bench_backward.py --configs P --tokens 1048576 --methods moba_fast
  python3 bench/cuda/bench_backward.py --lib build/src/libmoba.so --configs P --methods moba_fast
  python3 bench/cuda/bench_backward.py --configs P --tokens 1048576 --methods moba_fast --kernels
      # ... plus the GPU time of each kernel of one more step (torch.profiler): kernel_ms

Large dense cases take minutes: a case runs only when its estimated time (from
the method's throughput at the previous, smaller case) is within --max-call-s
(per call) and the whole run's --budget-s; otherwise it is recorded as skipped,
without a time. Nothing is extrapolated into the results.

FLOP counts (TFLOP/s count only the work each method must do):
  forward:  4*D per attended (query, key) pair and head (QK^T and PV, 2*D each),
            plus, for MoBA, 2*D per (query, past block) gate score (the routing);
  backward: 2.5x the forward's attention part, 10*D per attended pair (S = QK^T
            recomputed, dP = dO V^T, dV += P^T dO, dQ += dS K, dK += dS^T Q);
            MoBA's routing passes no gradient, so it counts nothing here.
For MoBA a query at position p in block c = p // block attends to
min(c, top_k - 1) full past blocks plus the p - c*block + 1 causal keys of its
own block; dense causal attention attends to p + 1 keys.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import Moba as MobaLib
from bench_forward import Problem, git_commit, kernel_times_us

try:
    import moba
except ImportError:  # --lib runs without the package
    moba = None

GIB = 2**30


@dataclass(frozen=True)
class Config:
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    block: int
    top_k: int
    tokens: tuple[int, ...]


CONFIGS = {
    # P ("paper"): the attention layer of Llama-3.1-8B.
    "P": Config(1, 32, 8, 128, 4096, 12, (131072, 262144, 524288, 1048576)),
    # S ("small blocks"): the setting of "Optimizing Mixture of Block Attention".
    "S": Config(2, 16, 16, 128, 128, 8, (8192, 32768, 131072, 524288)),
}
MOBA_METHODS = ("moba_fast", "moba_deterministic")
DENSE_METHODS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}
# The order the methods run in: the headline numbers first, so that a tight
# budget trims the least important cases.
METHODS = ("moba_fast", "sdpa_cudnn", "sdpa_flash", "moba_deterministic")


# ---------------------------------------------------------------- flops ----


def moba_counts(tokens: int, block: int, top_k: int) -> tuple[int, int]:
    """(attended (query, key) pairs, (query, past block) gate scores) of one
    head of one causal sequence of ``tokens`` queries."""
    p = np.arange(tokens, dtype=np.int64)
    c = p // block
    keys = np.minimum(c, top_k - 1) * block + (p - c * block + 1)
    return int(keys.sum()), int(c.sum())


def flops(method: str, config: Config, tokens: int) -> tuple[float, float]:
    """(forward, backward) flops of ``method`` on one case (formulas in the module doc)."""
    d, heads = config.head_dim, config.batch * config.heads_q
    if method in MOBA_METHODS:
        pairs, gates = moba_counts(tokens, config.block, config.top_k)
        return heads * (4.0 * d * pairs + 2.0 * d * gates), heads * 2.5 * 4.0 * d * pairs
    pairs = tokens * (tokens + 1) // 2
    return heads * 4.0 * d * pairs, heads * 2.5 * 4.0 * d * pairs


# --------------------------------------------------------------- timing ----


class Timer:
    """Forward and backward times of one step: CUDA events on the GPU, the
    host clock after a synchronize on the CPU (the --device cpu smoke mode)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        self.host: list[float] = []

    def mark(self) -> None:
        if self.cuda:
            self.events[len(self.host)].record()
            self.host.append(0.0)
        else:
            self.host.append(time.perf_counter())

    def read(self) -> tuple[float, float]:
        """(forward ms, backward ms) of the three marks, then resets."""
        if self.cuda:
            torch.cuda.synchronize()
            start, middle, end = self.events
            times = start.elapsed_time(middle), middle.elapsed_time(end)
        else:
            start_s, middle_s, end_s = self.host
            times = (middle_s - start_s) * 1e3, (end_s - middle_s) * 1e3
        self.host = []
        return times


@dataclass
class Measurement:
    fwd_ms: list[float]
    bwd_ms: list[float]
    total_ms: list[float]
    peak_bytes: int | None


def measure(
    step: Callable[[Timer], None],
    device: torch.device,
    budget_s: float,
    min_reps: int,
    max_reps: int,
) -> Measurement:
    """One warm-up step (not counted), then as many timed steps as fit in
    ``budget_s`` (between ``min_reps`` and ``max_reps``)."""
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step(timer)
    warm = sum(timer.read())
    reps = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(warm, 1e-3))))
    fwd, bwd = [], []
    for _ in range(reps):
        step(timer)
        f, b = timer.read()
        fwd.append(f)
        bwd.append(b)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return Measurement(fwd, bwd, [f + b for f, b in zip(fwd, bwd, strict=True)], peak)


def kernel_ms(
    step: Callable[[Timer], None], device: torch.device, top: int = 8
) -> dict[str, float]:
    """One more step under torch.profiler (bench_forward's kernel_times_us): the
    GPU time of each kernel (summed over its launches, in ms), the ``top``
    largest, under short names. CUPTI sees every kernel of the process, so this
    also covers the C API path of ``--lib``."""
    totals: dict[str, float] = {}
    for full, us in kernel_times_us(lambda: step(Timer(device))).items():
        # "void ns::(anonymous namespace)::kernel<T, 128>(args)" -> "kernel<T, 128>"
        name = full.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
        base = name.split("<")[0]
        name = (base.rsplit("::", 1)[-1] + name[len(base) :])[:80]
        totals[name] = totals.get(name, 0.0) + us / 1e3
    largest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(ms, 3) for name, ms in largest}


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """MoBA's backward reads torch.are_deterministic_algorithms_enabled() when
    it runs; warn_only keeps other ops (none are timed here) from raising."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# -------------------------------------------------------------- methods ----


def randn(shape: tuple[int, ...], seed: int, device: torch.device, grad: bool) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    return t.requires_grad_(grad)


def moba_step(
    config: Config, tokens: int, device: torch.device, det: bool, lib: MobaLib | None
) -> tuple[Callable[[Timer], None], int]:
    """A step on the packed layout [batch * tokens, heads, D], through the op or,
    given ``lib``, the C API; the bytes of its inputs."""
    c = config
    total = c.batch * tokens
    grad = lib is None
    q = randn((total, c.heads_q, c.head_dim), 1, device, grad)
    k = randn((total, c.heads_kv, c.head_dim), 2, device, grad)
    v = randn((total, c.heads_kv, c.head_dim), 3, device, grad)
    dout = randn((total, c.heads_q, c.head_dim), 4, device, False)
    cu = torch.arange(c.batch + 1, dtype=torch.int32, device=device) * tokens
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, dout, cu))
    if lib is not None:
        out, grads = (
            torch.empty_like(q),
            (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)),
        )
        lse = torch.empty(c.heads_q, total, device=device, dtype=torch.float32)
        problem = Problem(q, k, v, cu, cu, tokens, tokens, c.block, c.top_k)

        def lib_step(timer: Timer) -> None:
            timer.mark()
            lib.forward(problem, out, lse)
            timer.mark()
            lib.backward(problem, out, dout, lse, grads, det)
            timer.mark()

        return lib_step, inputs

    def step(timer: Timer) -> None:
        with deterministic(det):
            timer.mark()
            out = moba.moba_attn_varlen(q, k, v, cu, tokens, c.block, c.top_k)
            timer.mark()
            torch.autograd.grad(out, (q, k, v), dout)
            timer.mark()

    return step, inputs


def dense_step(
    config: Config, tokens: int, device: torch.device, backend: SDPBackend, native_gqa: bool
) -> tuple[Callable[[Timer], None], int]:
    """A step of causal SDPA on [batch, heads, tokens, D] forced to ``backend``."""
    c = config
    kv_heads = c.heads_kv if native_gqa else c.heads_q
    q = randn((c.batch, c.heads_q, tokens, c.head_dim), 1, device, True)
    k = randn((c.batch, kv_heads, tokens, c.head_dim), 2, device, True)
    v = randn((c.batch, kv_heads, tokens, c.head_dim), 3, device, True)
    dout = randn((c.batch, c.heads_q, tokens, c.head_dim), 4, device, False)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    gqa = native_gqa and c.heads_kv != c.heads_q

    def step(timer: Timer) -> None:
        with sdpa_kernel(backend):
            timer.mark()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            timer.mark()
            torch.autograd.grad(out, (q, k, v), dout)
            timer.mark()

    return step, inputs


def probe_dense(
    backend: SDPBackend, config: Config, device: torch.device
) -> tuple[bool | None, str]:
    """Whether ``backend`` runs causal forward + backward in ``config``'s head
    layout: (True, _) with enable_gqa=True, (False, _) only with K/V expanded to
    the query heads, (None, why) not at all."""
    small = Config(1, config.heads_q, config.heads_kv, config.head_dim, 64, 1, ())
    errors = []
    for native in (True, False) if config.heads_kv != config.heads_q else (True,):
        try:
            step, _ = dense_step(small, 256, device, backend, native)
            timer = Timer(device)
            step(timer)
            timer.read()
            return native, ""
        except RuntimeError as e:
            error = first_line(e)
            if error not in errors:
                errors.append(error)
    return None, "; ".join(errors)


# ---------------------------------------------------------------- runner ----


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.records: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        # Flops per ms of the last measured case, per (method, config) and per method.
        self.rates: dict[tuple[str, str], float] = {}
        self.method_rates: dict[str, float] = {}
        self.dense_support: dict[tuple[str, str], tuple[bool | None, str]] = {}
        self.lib = MobaLib(args.lib) if args.lib else None
        if self.lib is None and moba is None:
            raise SystemExit("the moba package is not installed: install it, or pass --lib")
        self.meta: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "moba": self.lib.version() if self.lib else moba.__version__,
            "moba_entry": f"C API ({args.lib})" if self.lib else "torch op (moba.moba_attn_varlen)",
            "dtype": "bfloat16",
            "pass": "forward+backward",
        }
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            self.meta["gpu_memory_gib"] = round(total / GIB, 2)

    def moba_available(self) -> bool:
        if self.lib is not None:
            return self.device.type != "cuda" or self.lib.cuda_available()
        return moba.backend_available("cuda" if self.device.type == "cuda" else "cpu")

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def record(
        self,
        name: str,
        config: Config,
        tokens: int,
        method: str,
        m: Measurement | None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        fwd_flops, bwd_flops = flops(method, config, tokens)
        rec: dict[str, Any] = dict(
            self.meta,
            config=name,
            tokens=tokens,
            batch=config.batch,
            heads_q=config.heads_q,
            heads_kv=config.heads_kv,
            head_dim=config.head_dim,
            block_size=config.block if method in MOBA_METHODS else None,
            top_k=config.top_k if method in MOBA_METHODS else None,
            method=method,
            median_ms=None,
            fwd_median_ms=None,
            bwd_median_ms=None,
            tflops=None,
            fwd_tflops=None,
            bwd_tflops=None,
            flops_fwd=fwd_flops,
            flops_bwd=bwd_flops,
        )
        if extra:
            rec.update(extra)
        if m is not None:
            total, fwd, bwd = (statistics.median(x) for x in (m.total_ms, m.fwd_ms, m.bwd_ms))
            rec.update(
                median_ms=round(total, 3),
                fwd_median_ms=round(fwd, 3),
                bwd_median_ms=round(bwd, 3),
                tflops=round((fwd_flops + bwd_flops) / (total * 1e9), 2),
                fwd_tflops=round(fwd_flops / (fwd * 1e9), 2),
                bwd_tflops=round(bwd_flops / (bwd * 1e9), 2),
                reps=len(m.total_ms),
            )
            if m.peak_bytes is not None:
                rec["peak_memory_gib"] = round(m.peak_bytes / GIB, 3)
        if note:
            rec["note"] = note
        self.records.append(rec)
        shown = f"{rec['median_ms']:11.2f} ms" if rec["median_ms"] is not None else " " * 14
        detail = (
            f"fwd {rec['fwd_median_ms']:.2f} bwd {rec['bwd_median_ms']:.2f} ms, "
            f"{rec['tflops']} TFLOP/s, {rec['reps']} reps"
            + (f", peak {rec['peak_memory_gib']} GiB" if "peak_memory_gib" in rec else "")
            if m is not None
            else ""
        )
        print(f"{name} {tokens:>8d} {method:19s} {shown}  {detail}{note or ''}", flush=True)
        for kernel, ms in rec.get("kernel_ms", {}).items():
            print(f"    {ms:11.2f} ms  {kernel}", flush=True)
        if self.args.out:
            # Rewritten after every case: a run cut short keeps what it measured.
            Path(self.args.out).write_text(json.dumps(self.records, indent=1) + "\n")

    def estimate_ms(self, method: str, name: str, total_flops: float) -> float | None:
        rate = self.rates.get((method, name))
        if rate is None and method not in MOBA_METHODS:
            # Dense kernels run at similar throughput across the two configs.
            rate = self.method_rates.get(method)
        return None if rate is None else total_flops / rate

    def run_case(self, name: str, config: Config, tokens: int, method: str) -> None:
        args = self.args
        fwd_flops, bwd_flops = flops(method, config, tokens)
        extra: dict[str, Any] = {}
        if method in DENSE_METHODS:
            key = (method, name)
            if key not in self.dense_support:
                self.dense_support[key] = probe_dense(DENSE_METHODS[method], config, self.device)
            native, why = self.dense_support[key]
            if native is None:
                self.record(name, config, tokens, method, None, f"unsupported: {why}")
                return
            if config.heads_kv != config.heads_q:
                extra["gqa"] = (
                    "native (enable_gqa=True)"
                    if native
                    else "repeat_interleave: K/V expanded to the query heads before timing "
                    "(enable_gqa=True was refused); the expansion is not timed"
                )
        elif not self.moba_available():
            self.record(name, config, tokens, method, None, "unsupported: no MoBA backend here")
            return
        limit_s = args.moba_max_call_s if method in MOBA_METHODS else args.max_call_s
        estimate = self.estimate_ms(method, name, fwd_flops + bwd_flops)
        if estimate is not None and estimate > limit_s * 1e3:
            self.record(
                name,
                config,
                tokens,
                method,
                None,
                f"skipped: estimated {estimate / 1e3:.0f} s per forward+backward, over the "
                f"{limit_s:g} s per-call limit",
                extra,
            )
            return
        needed_s = (estimate or 0.0) / 1e3 * (1 + args.min_reps)
        if self.elapsed_s() + needed_s > args.budget_s:
            self.record(
                name,
                config,
                tokens,
                method,
                None,
                f"skipped: would overrun the {args.budget_s:g} s budget "
                f"({self.elapsed_s():.0f} s spent, about {needed_s:.0f} s needed)",
                extra,
            )
            return
        step: Callable[[Timer], None] | None = None
        try:
            if method in MOBA_METHODS:
                step, inputs = moba_step(
                    config, tokens, self.device, method == "moba_deterministic", self.lib
                )
            else:
                native = bool(self.dense_support[(method, name)][0])
                step, inputs = dense_step(
                    config, tokens, self.device, DENSE_METHODS[method], native
                )
            extra["inputs_memory_gib"] = round(inputs / GIB, 3)
            m = measure(step, self.device, args.case_budget_s, args.min_reps, args.max_reps)
            if args.kernels and method in MOBA_METHODS:
                extra["kernel_ms"] = kernel_ms(step, self.device)
        except torch.OutOfMemoryError as e:
            peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
            extra["peak_memory_gib"] = round(peak / GIB, 3)
            self.record(
                name, config, tokens, method, None, f"failed: out of memory: {first_line(e)}", extra
            )
        except RuntimeError as e:
            self.record(name, config, tokens, method, None, f"failed: {first_line(e)}", extra)
        else:
            self.record(name, config, tokens, method, m, None, extra)
            rate = (fwd_flops + bwd_flops) / statistics.median(m.total_ms)
            self.rates[(method, name)] = rate
            self.method_rates[method] = rate
        finally:
            # The step closure holds the inputs: drop it before the next case allocates.
            del step
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def print_table(records: list[dict[str, Any]]) -> None:
    """One line per case: MoBA's times, the dense peers', the speedup over the best dense."""
    cases: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in records:
        cases.setdefault((r["config"], r["tokens"]), {})[r["method"]] = r

    def ms(r: dict[str, Any] | None, key: str = "median_ms") -> str:
        return f"{r[key]:10.1f}" if r and r.get(key) is not None else f"{'-':>10}"

    print(
        f"\n{'':9}{'':>9} {'MoBA fast (fwd+bwd / fwd / bwd ms)':>34} {'determ.':>10} "
        f"{'cuDNN':>10} {'FA2':>10} {'speedup':>8} {'MoBA peak':>10}"
    )
    for (name, tokens), methods in cases.items():
        fast = methods.get("moba_fast")
        dense = [
            methods[m]["median_ms"]
            for m in DENSE_METHODS
            if m in methods and methods[m]["median_ms"] is not None
        ]
        speedup = (
            f"{min(dense) / fast['median_ms']:7.2f}x"
            if fast and fast.get("median_ms") and dense
            else f"{'-':>8}"
        )
        peak = f"{fast['peak_memory_gib']:7.1f} GiB" if fast and "peak_memory_gib" in fast else ""
        print(
            f"{name:9}{tokens:>9} {ms(fast)} {ms(fast, 'fwd_median_ms')} "
            f"{ms(fast, 'bwd_median_ms')}  {ms(methods.get('moba_deterministic'))} "
            f"{ms(methods.get('sdpa_cudnn'))} {ms(methods.get('sdpa_flash'))} {speedup} {peak}"
        )
    print("(speedup: the best measured dense forward+backward over MoBA fast's)")


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="JSON file to write (a list of case objects)")
    ap.add_argument(
        "--lib",
        help="run MoBA through this libmoba.so's C API (built with -DMOBA_CUDA=ON) "
        "instead of the installed package",
    )
    ap.add_argument("--configs", default="P,S", help="comma list of P, S")
    ap.add_argument(
        "--tokens",
        type=int_list,
        help="only these sequence lengths (comma list), e.g. 1048576; default: each config's",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of the methods")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=300.0,
        help="skip cases that would take the whole run past this many seconds",
    )
    ap.add_argument(
        "--max-call-s",
        type=float,
        default=20.0,
        help="skip dense cases whose estimated forward+backward exceeds this",
    )
    ap.add_argument(
        "--moba-max-call-s",
        type=float,
        default=60.0,
        help="skip MoBA cases whose estimated forward+backward exceeds this",
    )
    ap.add_argument(
        "--case-budget-s", type=float, default=3.0, help="timed reps per case fill about this long"
    )
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="MoBA cases on CUDA: one more step under torch.profiler, ms per kernel (kernel_ms)",
    )
    ap.add_argument("--min-reps", type=int, default=1, help="timed steps per case at least")
    ap.add_argument("--max-reps", type=int, default=10, help="timed steps per case at most")
    ap.add_argument(
        "--device",
        default="cuda",
        help="cuda (the benchmark); cpu runs the same code on the CPU backend, for a smoke test",
    )
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"--configs: unknown config {n!r}; expected one of P, S")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; expected some of {METHODS}")
    if args.kernels and device.type != "cuda":
        raise SystemExit("--kernels: profiles GPU kernels; expected --device cuda")
    if args.min_reps < 1 or args.max_reps < args.min_reps:
        raise SystemExit("--min-reps/--max-reps: expected 1 <= min-reps <= max-reps")

    runner = Runner(args, device)
    print(
        f"device {runner.meta['device']}, torch {runner.meta['torch']}, cuDNN "
        f"{runner.meta['cudnn']}, moba {runner.meta['moba']}, commit {runner.meta['git_commit']}",
        flush=True,
    )
    for method in METHODS:
        if method not in methods:
            continue
        for name in names:
            config = CONFIGS[name]
            for tokens in sorted(args.tokens or config.tokens):
                runner.run_case(name, config, tokens, method)
    print_table(runner.records)
    print(f"total {runner.elapsed_s():.0f} s")


if __name__ == "__main__":
    main()
