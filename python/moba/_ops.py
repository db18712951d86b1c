"""The MoBA PyTorch ops: the native library registered through ``torch.library``.

Three custom ops live in the ``moba`` namespace:

* ``moba::attn_fwd``  -> (out, lse), with a fake (meta) kernel and an autograd
  formula, so ``torch.compile`` traces it without graph breaks and training works;
* ``moba::attn_bwd``  -> (dq, dk, dv), the backward as its own op so that the
  backward graph is traceable too;
* ``moba::routing``   -> the selected blocks, int32.

Each kernel hands the tensors to the native module as DLPack views (no copy)
together with the thread count (CPU) or the current CUDA stream (GPU). The
native module is built without torch, so it does not depend on the torch
version.

This module deliberately does not use ``from __future__ import annotations``:
``torch.library.custom_op`` reads the annotations to infer the op schema.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor

from . import _native

#: Backend names accepted by the ops ("auto" picks cuda for GPU tensors and
#: cpu for host tensors).
BACKENDS = ("auto", "cpu", "reference", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_available(name: str) -> bool:
    """Whether the native backend ``name`` ("auto", "reference", "cpu", "cuda") can run here.

    ``backend_available("cuda")`` is true only when the library was built with its
    CUDA kernels and a GPU is present.
    """
    return bool(_native.backend_available(_check_backend(name)))


# --------------------------------------------------------------------------
# Helpers shared by the kernels
# --------------------------------------------------------------------------


def _native_view(t: Tensor) -> Tensor:
    # DLPack refuses tensors that require grad; the kernels never differentiate.
    return t.detach()


def _require_native_device(t: Tensor, backend: str) -> None:
    """Refuses tensors the native library cannot run on, instead of copying them."""
    if t.device.type == "cuda":
        if backend in ("cpu", "reference"):
            raise ValueError(
                f"backend: {backend!r} runs on host tensors, but q is on {t.device}; "
                "use backend='auto' or 'cuda', or move the tensors to the CPU"
            )
        if not _native.built_with_cuda:
            raise RuntimeError(
                f"moba: q is on {t.device}, but this build of moba has no CUDA backend "
                "(moba.backend_available('cuda') is False). Rebuild moba with CUDA "
                "(pip install . with nvcc on PATH) or move the tensors to the CPU explicitly."
            )
        if not _native.backend_available("cuda"):
            raise RuntimeError(
                f"moba: q is on {t.device}, but the CUDA backend cannot run here "
                "(moba.backend_available('cuda') is False: no usable CUDA device)"
            )
    elif t.device.type == "cpu":
        if backend == "cuda":
            raise ValueError("backend: 'cuda' needs tensors on a CUDA device, but q is on the CPU")
    else:
        raise ValueError(
            f"q: tensors on {t.device.type} are not supported; expected CPU or CUDA tensors"
        )


def _stream_of(t: Tensor) -> int:
    """The CUDA stream PyTorch is using for ``t``'s device (0 for host tensors)."""
    if t.device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _threads_of(t: Tensor) -> int:
    # Follow torch.set_num_threads so the op and the rest of the model agree.
    return torch.get_num_threads() if t.device.type == "cpu" else 0


@contextmanager
def _native_call(q: Tensor, backend: str) -> Iterator[tuple[int, int]]:
    """Frames a native call: refuses tensors the backend cannot run on, makes q's
    device the current one (DLPack export of a CUDA tensor requires it) and yields
    the (num_threads, stream) arguments that every native call ends with."""
    _require_native_device(q, backend)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
        yield _threads_of(q), _stream_of(q)


def _native_geometry(
    q: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int
) -> tuple[Tensor, Tensor, int, int]:
    """The sequence arguments of the native calls, in their order."""
    # On a GPU the library cannot read cu_seqlens, so it needs positive bounds.
    if q.device.type == "cuda":
        return cu_seqlens_q, cu_seqlens_k, max(int(max_seqlen_q), 1), max(int(max_seqlen_k), 1)
    return cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k)


def _routing_width(max_seqlen_k: int, block_size: int, top_k: int) -> int:
    # Mirrors moba::routing_width; the routing op needs at least one column.
    return max(1, min(top_k, -(-max(max_seqlen_k, 0) // block_size)))


# --------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------


@torch.library.custom_op("moba::attn_fwd", mutates_args=())
def _attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    with _native_call(q, backend) as context:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        _native.forward(
            _native_view(q),
            _native_view(k),
            _native_view(v),
            *_native_geometry(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
            out,
            lse,
            block_size,
            top_k,
            softmax_scale,
            gqa_shared_routing,
            backend,
            *context,
        )
    return out, lse


@_attn_fwd.register_fake
def _attn_fwd_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("moba::attn_bwd", mutates_args=())
def _attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    with _native_call(q, backend) as context:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        _native.backward(
            _native_view(q),
            _native_view(k),
            _native_view(v),
            *_native_geometry(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
            _native_view(out),
            _native_view(_last_dim_contiguous(dout)),
            _native_view(lse),
            dq,
            dk,
            dv,
            block_size,
            top_k,
            softmax_scale,
            gqa_shared_routing,
            backend,
            *context,
            torch.are_deterministic_algorithms_enabled(),
        )
    return dq, dk, dv


@_attn_bwd.register_fake
def _attn_bwd_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.options = tuple(options)
    # The routing is a discrete choice and lse is a statistic for merging and
    # inspection: as in flash-attn, gradients flow through `out` only.
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.options)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.options))


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("moba::routing", mutates_args=())
def _routing(
    q: Tensor,
    k: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    top_k: int,
    gqa_shared_routing: bool,
    backend: str,
) -> Tensor:
    with _native_call(q, backend) as context:
        width = _routing_width(max_seqlen_k, block_size, top_k)
        selected = torch.empty((q.shape[0], q.shape[1], width), dtype=torch.int32, device=q.device)
        _native.routing(
            _native_view(q),
            _native_view(k),
            *_native_geometry(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
            selected,
            block_size,
            top_k,
            gqa_shared_routing,
            backend,
            *context,
        )
    return selected


@_routing.register_fake
def _routing_fake(
    q: Tensor,
    k: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    top_k: int,
    gqa_shared_routing: bool,
    backend: str,
) -> Tensor:
    width = _routing_width(max_seqlen_k, block_size, top_k)
    return q.new_empty((q.shape[0], q.shape[1], width), dtype=torch.int32)


# --------------------------------------------------------------------------
# Argument checking shared by the public functions (and moba_naive)
# --------------------------------------------------------------------------


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # The library takes any strides except in the head dimension.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected >= 1, got {value}")
    return value


def _check_cu_seqlens(cu: Tensor, name: str, q: Tensor) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [batch + 1], got {list(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name}: on {cu.device}, expected {q.device} like q")


def _autocast(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under torch.autocast, q, k and v in the autocast dtype, as SDPA takes them:
    a model's rotary embedding can leave q and k in float32 while v is bf16."""
    device = q.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    return q, k, v


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    for t, name, layout in (
        (q, "q", "[total_q, Hq, D]"),
        (k, "k", "[total_k, Hkv, D]"),
        (v, "v", "[total_k, Hkv, D]"),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected 3 dimensions {layout}, got shape {list(t.shape)}")
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        hint = " (moba_naive runs in float64 for gradcheck)" if q.dtype == torch.float64 else ""
        raise ValueError(f"q: unsupported dtype {q.dtype}; expected one of {names}{hint}")
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, expected {q.device} like q")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {list(k.shape)} (that of k), got {list(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: head dim {k.shape[2]} differs from q's {q.shape[2]}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q: heads ({q.shape[1]}) must be a multiple of k's heads ({k.shape[1]}) (GQA/MQA)"
        )


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"backend: unknown name {backend!r}; expected one of {', '.join(BACKENDS)}"
        )
    return backend


def _resolve_geometry(
    q: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    cu_seqlens_k: Tensor | None,
    max_seqlen_k: int | None,
) -> tuple[Tensor, int, int]:
    """cu_seqlens_k and the two max_seqlen bounds (0 = let the library compute it)."""
    _check_cu_seqlens(cu_seqlens, "cu_seqlens", q)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected an int >= 0, got {max_seqlen!r}")
    if cu_seqlens_k is None:
        if max_seqlen_k is not None and max_seqlen_k != max_seqlen:
            raise ValueError(
                "max_seqlen_k: given without cu_seqlens_k; expected None or max_seqlen"
            )
        return cu_seqlens, max_seqlen, max_seqlen
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens.shape[0]} entries like cu_seqlens, "
            f"got {cu_seqlens_k.shape[0]}"
        )
    if max_seqlen_k is None:
        if q.device.type == "cuda":
            raise ValueError("max_seqlen_k: required with cu_seqlens_k for CUDA tensors")
        max_seqlen_k = 0
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int) or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_k: expected an int >= 0, got {max_seqlen_k!r}")
    return cu_seqlens_k, max_seqlen, max_seqlen_k


class _Problem(NamedTuple):
    """The checked sequence layout and block parameters of a call, in the order
    the custom ops take them after their tensors (so ``*problem`` passes them on)."""

    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_size: int
    top_k: int


def _check_problem(
    q: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    cu_seqlens_k: Tensor | None,
    max_seqlen_k: int | None,
) -> _Problem:
    """Checks the arguments every public function takes after q, k, v (checked
    first, by _check_qkv, with the dtypes that function accepts)."""
    block_size = _check_positive_int(moba_chunk_size, "moba_chunk_size")
    top_k = _check_positive_int(moba_topk, "moba_topk")
    cu_k, max_q, max_k = _resolve_geometry(q, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    return _Problem(cu_seqlens, cu_k, max_q, max_k, block_size, top_k)


def _check_scale(softmax_scale: float | None) -> float | None:
    if softmax_scale is None:
        return None
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale: expected a finite value > 0, got {softmax_scale}")
    return scale


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@overload
def moba_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = ...,
    return_lse: Literal[False] = ...,
    gqa_shared_routing: bool = ...,
    backend: str = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_k: int | None = ...,
) -> Tensor: ...


@overload
def moba_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = ...,
    return_lse: Literal[True],
    gqa_shared_routing: bool = ...,
    backend: str = ...,
    cu_seqlens_k: Tensor | None = ...,
    max_seqlen_k: int | None = ...,
) -> tuple[Tensor, Tensor]: ...


def moba_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    gqa_shared_routing: bool = False,
    backend: str = "auto",
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA attention over a packed variable-length batch (causal).

    The arguments are those of the original MoBA release:

    Args:
        q: ``[total_q, Hq, D]`` queries, float32 / float16 / bfloat16.
        k, v: ``[total_k, Hkv, D]`` keys and values; ``Hq % Hkv == 0`` (GQA/MQA
            runs on the Hkv heads directly, nothing is repeated in memory).
        cu_seqlens: ``[batch + 1]`` int32 cumulative sequence lengths of q (and of
            k when ``cu_seqlens_k`` is None), on q's device.
        max_seqlen: the longest sequence (an upper bound is fine).
        moba_chunk_size: keys per block (``block_size``).
        moba_topk: blocks each query attends to, counting its own block.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[Hq, total_q]`` float32 (natural
            log, flash-attn layout). It carries no gradient.
        gqa_shared_routing: the query heads of one kv head share one selection.
        backend: "auto" (cuda for GPU tensors, cpu otherwise), "cpu", "reference"
            (the slow fp64 oracle) or "cuda".
        cu_seqlens_k, max_seqlen_k: keys of each sequence when they differ from the
            queries (decode, chunked prefill): a sequence's queries are the last
            positions of its keys.

    Returns:
        ``out`` ``[total_q, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v, _FLOAT_DTYPES)
    problem = _check_problem(
        q, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, cu_seqlens_k, max_seqlen_k
    )
    out, lse = _attn_fwd(
        _last_dim_contiguous(q),
        _last_dim_contiguous(k),
        _last_dim_contiguous(v),
        *problem,
        _check_scale(softmax_scale),
        bool(gqa_shared_routing),
        _check_backend(backend),
    )
    return (out, lse) if return_lse else out


def routing(
    q: Tensor,
    k: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    gqa_shared_routing: bool = False,
    backend: str = "auto",
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> Tensor:
    """The blocks each query attends to, as the library selects them.

    Returns ``[total_q, Hq, W]`` int32: block indices within the query's sequence
    in ascending order (its current block included), padded with -1, where
    ``W = min(moba_topk, ceil(max_seqlen_k / moba_chunk_size))`` (at least 1).

    ``backend`` is one of "auto", "cpu", "reference", "cuda", or "naive" for the
    pure-PyTorch selection of :func:`moba.moba_naive` (for cross-checking).
    """
    if backend == "naive":
        from .naive import naive_routing

        return naive_routing(
            q,
            k,
            cu_seqlens,
            max_seqlen,
            moba_chunk_size,
            moba_topk,
            gqa_shared_routing=gqa_shared_routing,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=max_seqlen_k,
        )
    q, k, _ = _autocast(q, k, k)
    _check_qkv(q, k, k, _FLOAT_DTYPES)
    problem = _check_problem(
        q, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk, cu_seqlens_k, max_seqlen_k
    )
    if problem.max_seqlen_k == 0 and q.device.type == "cpu":
        # The output width depends on the longest key sequence; read it here.
        lengths = problem.cu_seqlens_k[1:] - problem.cu_seqlens_k[:-1]
        longest = int(lengths.max().item()) if lengths.numel() else 0
        problem = problem._replace(max_seqlen_k=longest)
    selected: Tensor = _routing(
        _last_dim_contiguous(q).detach(),
        _last_dim_contiguous(k).detach(),
        *problem,
        bool(gqa_shared_routing),
        _check_backend(backend),
    )
    return selected
