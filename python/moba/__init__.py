"""MoBA (Mixture of Block Attention) for PyTorch and Hugging Face transformers.

* :func:`moba_attn_varlen` -- the op (native kernels, ``torch.library`` custom op:
  autograd, ``torch.compile``), with the original MoBA release's arguments;
* :func:`moba_naive` -- the same computation written plainly in PyTorch;
* :func:`routing` -- the blocks each query selects;
* :func:`register`, :func:`use_moba`, :func:`use_full_attention`, :func:`configure`
  -- the transformers attention backends ``"moba"`` and ``"moba_naive"``;
* :class:`KVCache` -- decode from a cache with running block sums, and
  :class:`MobaCache` / :func:`cache_for` -- a transformers ``Cache`` over it;
* :func:`plot_routing` -- a picture of the routing of one head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch  # noqa: F401  (first: the native module must bind to torch's CUDA runtime, not the reverse)

from . import _native
from ._ops import BACKENDS, backend_available, moba_attn_varlen, routing
from .naive import moba_naive

if TYPE_CHECKING:
    from ._cache import MobaCache, cache_for
    from ._hf import MobaSettings, configure, register, use_full_attention, use_moba
    from .kv_cache import KVCache
    from .plot import plot_routing

__version__: str = _native.version()

__all__ = [
    "BACKENDS",
    "KVCache",
    "MobaCache",
    "MobaSettings",
    "__version__",
    "backend_available",
    "cache_for",
    "configure",
    "moba_attn_varlen",
    "moba_naive",
    "plot_routing",
    "register",
    "routing",
    "use_full_attention",
    "use_moba",
]

# transformers and matplotlib are optional: imported on first use only.
_LAZY = {
    "KVCache": ".kv_cache",
    "MobaCache": "._cache",
    "MobaSettings": "._hf",
    "cache_for": "._cache",
    "configure": "._hf",
    "register": "._hf",
    "use_full_attention": "._hf",
    "use_moba": "._hf",
    "plot_routing": ".plot",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moba' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
