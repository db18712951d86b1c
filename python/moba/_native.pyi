"""Type stubs of the native module (python/src/ext.cpp). Arrays are DLPack tensors."""

from typing import Any

def forward(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: Any,
    lse: Any | None,
    block_size: int,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    backend: str,
    num_threads: int,
    stream: int,
) -> None: ...
def backward(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: Any,
    dout: Any,
    lse: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    block_size: int,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    backend: str,
    num_threads: int,
    stream: int,
    deterministic: bool,
) -> None: ...
def routing(
    q: Any,
    k: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int,
    max_seqlen_k: int,
    selected: Any,
    block_size: int,
    top_k: int,
    gqa_shared_routing: bool,
    backend: str,
    num_threads: int,
    stream: int,
) -> None: ...
def routing_width(max_seqlen_k: int, block_size: int, top_k: int) -> int: ...
def backend_available(name: str) -> bool: ...
def kv_cache_append(
    k: Any,
    v: Any,
    page_table: Any | None,
    seqlens: Any,
    block_sums: Any,
    block_size: int,
    k_new: Any,
    v_new: Any,
    cu_seqlens_new: Any,
    num_threads: int,
) -> None: ...
def kv_cache_decode(
    k: Any,
    v: Any,
    page_table: Any | None,
    seqlens: Any,
    block_sums: Any,
    block_size: int,
    q: Any,
    cu_seqlens_q: Any,
    out: Any,
    lse: Any | None,
    top_k: int,
    softmax_scale: float | None,
    gqa_shared_routing: bool,
    num_threads: int,
) -> None: ...
def kv_cache_routing(
    k: Any,
    v: Any,
    page_table: Any | None,
    seqlens: Any,
    block_sums: Any,
    block_size: int,
    q: Any,
    cu_seqlens_q: Any,
    selected: Any,
    top_k: int,
    gqa_shared_routing: bool,
    num_threads: int,
) -> None: ...
def version() -> str: ...

built_with_cuda: bool
