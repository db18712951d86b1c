"""MoBA as a Hugging Face transformers attention backend.

``moba.register()`` adds two entries to transformers' ``AttentionInterface``:

* ``"moba"``: MoBA layers run :func:`moba.moba_attn_varlen` (the native op);
* ``"moba_naive"``: MoBA layers run :func:`moba.moba_naive` (pure PyTorch).

and, for both, an entry in ``AttentionMaskInterface`` so that the model hands
the attention function the 2-D padding mask (as for flash-attention) instead
of a dense 4-D mask: a padded batch becomes a packed varlen batch
(``cu_seqlens``), left or right padding alike, without materializing any
``[q, k]`` mask.

Then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="moba")``
or ``model.set_attn_implementation("moba")`` switches a model to MoBA, and
``model.set_attn_implementation("sdpa")`` back, without reloading.

Which layers and steps use MoBA:

* ``full_attention_layers``: layer indices (negative ones count from the end,
  e.g. ``(-3, -2, -1)`` for the paper's last 3 layers) that keep full attention;
* ``decode="full"`` (default, the paper's choice): any step whose queries are
  fewer than the keys (decoding with a KV cache, chunked prefill) attends to
  the whole cache with full attention. ``decode="moba"`` routes those queries
  too: from the layer's :class:`moba.KVCache` (running block sums, only the
  selected blocks read) when the model's cache is a :class:`moba.MobaCache`
  and the tensors are on the CPU, otherwise through the op's ``cu_seqlens_k``
  over the whole cache (queries at the last positions; the block means are
  recomputed from every cached key each step).

Full attention is PyTorch's ``scaled_dot_product_attention`` (as transformers'
``"sdpa"`` backend), with a causal/padding mask built only when needed.

Settings come from ``register()`` (process-wide defaults) and can be overridden
per model with ``moba.configure(model, ...)``, which stores them in
``model.config.moba_config`` (saved with the config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ._ops import _check_backend, _check_positive_int, moba_attn_varlen
from .naive import moba_naive

if TYPE_CHECKING:
    from ._cache import MobaLayer

#: Names under which the attention functions are registered.
MOBA = "moba"
MOBA_NAIVE = "moba_naive"
_CONFIG_ATTRIBUTE = "moba_config"


@dataclasses.dataclass(frozen=True)
class MobaSettings:
    """How the ``"moba"`` / ``"moba_naive"`` attention backends behave.

    Attributes:
        block_size: keys per block (the original's ``moba_chunk_size``).
        top_k: blocks per query, counting its own block (``moba_topk``).
        full_attention_layers: layers (``module.layer_idx``; negative counts from
            the end) that keep full attention: the layer-wise hybrid.
        decode: "full" (steps with fewer queries than keys use full attention
            over the cache) or "moba" (they are routed too).
        gqa_shared_routing: the query heads of one kv head share one selection.
        backend: the op's backend ("auto", "cpu", "reference", "cuda").
    """

    block_size: int = 4096
    top_k: int = 12
    full_attention_layers: tuple[int, ...] = ()
    decode: Literal["full", "moba"] = "full"
    gqa_shared_routing: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "top_k"):
            _check_positive_int(getattr(self, name), name)
        object.__setattr__(self, "full_attention_layers", _as_layers(self.full_attention_layers))
        if self.decode not in ("full", "moba"):
            raise ValueError(f"decode: expected 'full' or 'moba', got {self.decode!r}")
        _check_backend(self.backend)
        object.__setattr__(self, "gqa_shared_routing", bool(self.gqa_shared_routing))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (how it is stored in a model config)."""
        values = dataclasses.asdict(self)
        values["full_attention_layers"] = list(self.full_attention_layers)
        return values

    def is_full_attention_layer(self, layer_idx: int | None, num_layers: int | None) -> bool:
        """Whether layer ``layer_idx`` of a model of ``num_layers`` layers keeps full attention."""
        if layer_idx is None or not self.full_attention_layers:
            return False
        for layer in self.full_attention_layers:
            if layer < 0:
                if num_layers is None:
                    raise ValueError(
                        "full_attention_layers: negative indices need config.num_hidden_layers"
                    )
                layer += num_layers
            if layer == layer_idx:
                return True
        return False


def _as_layers(layers: object) -> tuple[int, ...]:
    if isinstance(layers, (int, str)) or not isinstance(layers, Iterable):
        raise TypeError(
            "full_attention_layers: expected an iterable of layer indices, "
            f"got {type(layers).__name__}"
        )
    result = tuple(layers)
    for layer in result:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"full_attention_layers: expected ints, got {layer!r}")
    return result


_defaults = MobaSettings()


def _replace(base: MobaSettings, options: Mapping[str, Any]) -> MobaSettings:
    unknown = set(options) - {f.name for f in dataclasses.fields(MobaSettings)}
    if unknown:
        raise TypeError(f"unknown MoBA option(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **options)


def register(
    block_size: int = 4096,
    top_k: int = 12,
    full_attention_layers: Iterable[int] = (),
    *,
    decode: Literal["full", "moba"] = "full",
    gqa_shared_routing: bool = False,
    backend: str = "auto",
) -> MobaSettings:
    """Registers ``"moba"`` and ``"moba_naive"`` with transformers and sets the
    process-wide defaults (models can override them with :func:`configure`).

    Call it before ``from_pretrained(..., attn_implementation="moba")``. Calling
    it again replaces the defaults. Returns the settings now in force.
    """
    global _defaults
    settings = MobaSettings(
        block_size=block_size,
        top_k=top_k,
        full_attention_layers=_as_layers(full_attention_layers),
        decode=decode,
        gqa_shared_routing=gqa_shared_routing,
        backend=backend,
    )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(MOBA, moba_attention_forward)
    AttentionInterface.register(MOBA_NAIVE, moba_naive_attention_forward)
    AttentionMaskInterface.register(MOBA, padding_mask)
    AttentionMaskInterface.register(MOBA_NAIVE, padding_mask)
    _defaults = settings
    return settings


def _is_registered() -> bool:
    from transformers import AttentionInterface

    return MOBA in AttentionInterface._global_mapping


def settings_of(config: object | None) -> MobaSettings:
    """The settings in force for a model config: its ``moba_config`` over the defaults."""
    stored = getattr(config, _CONFIG_ATTRIBUTE, None) if config is not None else None
    if not stored:
        return _defaults
    if isinstance(stored, MobaSettings):
        return stored
    return _replace(_defaults, stored)


def configure(model: torch.nn.Module, **options: Any) -> MobaSettings:
    """Overrides MoBA settings for one model (``block_size``, ``top_k``,
    ``full_attention_layers``, ``decode``, ``gqa_shared_routing``, ``backend``).

    Options not given keep their current value for that model. The result is
    stored as a dict in ``model.config.moba_config`` and returned.
    """
    config = _config_of(model)
    settings = _replace(settings_of(config), options)
    setattr(config, _CONFIG_ATTRIBUTE, settings.to_dict())
    return settings


def use_moba(model: torch.nn.Module, *, naive: bool = False, **options: Any) -> MobaSettings:
    """Switches a loaded model to MoBA attention (``"moba"``, or ``"moba_naive"``),
    with optional per-model settings as in :func:`configure`. No reload: the
    weights are untouched. Registers the backends with defaults if needed."""
    if not _is_registered():
        register()
    settings = configure(model, **options) if options else settings_of(_config_of(model))
    _set_attn_implementation(model, MOBA_NAIVE if naive else MOBA)
    return settings


def use_full_attention(
    model: torch.nn.Module,
    layers: Iterable[int] | None = None,
    *,
    implementation: str = "sdpa",
) -> None:
    """Full attention for a loaded model, without reloading.

    ``layers=None``: the whole model switches to ``implementation`` (default
    "sdpa"); :func:`use_moba` switches it back. With ``layers``: those layers
    keep full attention while the others run MoBA (the layer-wise hybrid); the
    model is switched to ``"moba"`` if it runs neither MoBA backend.
    """
    if layers is None:
        _set_attn_implementation(model, implementation)
        return
    if not _is_registered():
        register()
    configure(model, full_attention_layers=_as_layers(layers))
    if _config_of(model)._attn_implementation not in (MOBA, MOBA_NAIVE):
        _set_attn_implementation(model, MOBA)


def _config_of(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"model: expected a transformers model with a .config, got {type(model).__name__}"
        )
    return config


def _set_attn_implementation(model: torch.nn.Module, implementation: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise TypeError(
            f"model: {type(model).__name__} has no set_attn_implementation (transformers >= 5)"
        )
    setter(implementation)
    actual = _config_of(model)._attn_implementation
    if actual != implementation:
        raise RuntimeError(
            f"model: {type(model).__name__} did not switch to attn_implementation="
            f"{implementation!r} (still {actual!r}); it does not dispatch through "
            "transformers' AttentionInterface"
        )


# --------------------------------------------------------------------------
# The mask function: the 2-D padding mask, as for flash-attention
# --------------------------------------------------------------------------


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """The ``AttentionMaskInterface`` entry of the MoBA backends: the boolean
    ``[batch, keys]`` padding mask, or None when nothing is padded (MoBA is
    causal by construction and needs no dense mask)."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# --------------------------------------------------------------------------
# The attention functions
# --------------------------------------------------------------------------


def moba_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function ``"moba"`` (native op). ``query`` is
    ``[batch, Hq, q_len, D]``, ``key``/``value`` ``[batch, Hkv, kv_len, D]``;
    returns ``([batch, q_len, Hq, D], None)``."""
    return _attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, False, kwargs
    )


def moba_naive_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function ``"moba_naive"`` (pure PyTorch MoBA)."""
    return _attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, True, kwargs
    )


def _attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    naive: bool,
    kwargs: dict[str, Any],
) -> tuple[Tensor, None]:
    config = getattr(module, "config", None)
    settings = settings_of(config)
    _check_supported(module, config, query, key, attention_mask, dropout, is_causal, kwargs)

    q_len, kv_len = query.shape[2], key.shape[2]
    # With a static cache the keys are longer than the mask: the tail is unused.
    num_keys = attention_mask.shape[1] if attention_mask is not None else kv_len
    if num_keys > kv_len:
        raise ValueError(f"attention_mask: covers {num_keys} keys but the layer has only {kv_len}")
    if q_len > num_keys:
        raise ValueError(f"query: {q_len} queries but only {num_keys} keys")
    layer_idx = getattr(module, "layer_idx", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    full = settings.is_full_attention_layer(layer_idx, num_layers) or (
        q_len < num_keys and settings.decode == "full"
    )
    if full:
        return _full_attention(
            module, query, key, value, attention_mask, num_keys, scaling, kwargs
        ), None
    # The KVCache decode runs where the layer's buffers live (cpu or cuda kernels).
    if not naive and q_len < num_keys:
        layer = _cached_layer(key, num_keys)
        if layer is not None and layer.decodes_on(settings.backend):
            return _moba_decode_from_cache(
                layer, query, attention_mask, num_keys, scaling, settings
            ), None
    return _moba_attention(
        module, query, key, value, attention_mask, num_keys, scaling, settings, naive, kwargs
    ), None


def _check_supported(
    module: torch.nn.Module,
    config: object | None,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: Mapping[str, Any],
) -> None:
    name = type(module).__name__
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or getattr(config, "is_causal", True) is False:
        raise ValueError(
            f"is_causal: MoBA attention is causal only, but {name} runs non-causal "
            "(bidirectional/encoder) attention; use attn_implementation='sdpa' for it"
        )
    if dropout:
        raise ValueError(
            f"dropout: MoBA has no attention dropout (got {dropout}); set "
            "config.attention_dropout = 0 or call model.eval()"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap: attention logit soft-capping is not supported by MoBA")
    if kwargs.get("s_aux") is not None:
        raise ValueError("s_aux: attention sinks are not supported by MoBA")
    if kwargs.get("cache") is not None:
        raise ValueError("cache: paged caches (continuous batching) are not supported by MoBA")
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        raise ValueError(
            f"sliding_window: {name} uses a sliding window of {window} keys, which MoBA does "
            "not combine with block routing; disable it in the config (e.g. sliding_window=None)"
        )
    if attention_mask is not None and (
        attention_mask.dim() != 2 or attention_mask.dtype != torch.bool
    ):
        raise ValueError(
            "attention_mask: expected the 2-D boolean padding mask [batch, keys] that "
            f"moba.register() arranges, got {attention_mask.dim()}-D {attention_mask.dtype}; "
            "custom 4-D masks are not supported"
        )
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError("query/key: expected [batch, heads, seq, head_dim] tensors")


def _packed_sequence_starts(position_ids: Tensor | None, batch: int, q_len: int) -> Tensor | None:
    """Where packed sequences start (position ids restarting), or None if one
    sequence fills each row. As transformers' own packed-sequence detection."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != q_len:
        return None
    position_ids = position_ids.expand(batch, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if int(starts.sum()) == batch:
        return None
    return starts


def _cu_seqlens(lengths: Tensor) -> Tensor:
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, dim=0)
    return cu


def _moba_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    num_keys: int,
    scaling: float | None,
    settings: MobaSettings,
    naive: bool,
    kwargs: Mapping[str, Any],
) -> Tensor:
    batch, heads_q, q_len, dim = query.shape
    heads_kv = key.shape[1]
    device = query.device
    # [batch, seq, heads, dim] views: the op takes any strides but the last.
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)[:, :num_keys]
    v = value.transpose(1, 2)[:, :num_keys]

    scatter_rows: Tensor | None = None
    if attention_mask is not None:
        # Padding: keep the valid keys of each row and the valid queries (the
        # last q_len columns of the mask), packed; works for left and right
        # padding since the kept queries are the last of the kept keys.
        key_valid = attention_mask
        query_valid = key_valid[:, num_keys - q_len :]
        key_rows = key_valid.reshape(-1).nonzero().squeeze(1)
        scatter_rows = query_valid.reshape(-1).nonzero().squeeze(1)
        q_flat = q.reshape(batch * q_len, heads_q, dim).index_select(0, scatter_rows)
        k_flat = k.reshape(batch * num_keys, heads_kv, dim).index_select(0, key_rows)
        v_flat = v.reshape(batch * num_keys, heads_kv, dim).index_select(0, key_rows)
        cu_q = _cu_seqlens(query_valid.sum(dim=1))
        cu_k = _cu_seqlens(key_valid.sum(dim=1))
    else:
        starts = (
            _packed_sequence_starts(kwargs.get("position_ids"), batch, q_len)
            if q_len == num_keys
            else None
        )
        q_flat = q[0] if batch == 1 else q.reshape(batch * q_len, heads_q, dim)
        k_flat = k[0] if batch == 1 else k.reshape(batch * num_keys, heads_kv, dim)
        v_flat = v[0] if batch == 1 else v.reshape(batch * num_keys, heads_kv, dim)
        if starts is not None:
            # Packed sequences (position ids restarting), as flash-attention does.
            bounds = starts.reshape(-1).nonzero().squeeze(1).to(torch.int32)
            cu_q = torch.cat(
                [bounds, torch.tensor([batch * q_len], dtype=torch.int32, device=device)]
            )
            cu_k = cu_q
        else:
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
            cu_k = torch.arange(batch + 1, dtype=torch.int32, device=device) * num_keys

    # Upper bounds suffice (and need no device sync).
    options: dict[str, Any] = {
        "softmax_scale": scaling,
        "gqa_shared_routing": settings.gqa_shared_routing,
        "cu_seqlens_k": cu_k,
        "max_seqlen_k": num_keys,
    }
    out: Tensor
    if naive:
        out = moba_naive(
            q_flat, k_flat, v_flat, cu_q, q_len, settings.block_size, settings.top_k, **options
        )
    else:
        out = moba_attn_varlen(
            q_flat,
            k_flat,
            v_flat,
            cu_q,
            q_len,
            settings.block_size,
            settings.top_k,
            backend=settings.backend,
            **options,
        )
    if scatter_rows is not None:
        # Padded queries get zeros.
        padded = out.new_zeros((batch * q_len, heads_q, dim))
        out = padded.index_copy(0, scatter_rows, out)
    return out.view(batch, q_len, heads_q, dim)


def _cached_layer(key: Tensor, num_keys: int) -> MobaLayer | None:
    """The :class:`moba.MobaCache` layer ``key`` is a view of, when its
    :class:`moba.KVCache` can serve this step (all keys cached)."""
    if not hasattr(key, "_moba_cache_layer"):
        return None  # not from a MobaCache: no need to import transformers' cache module
    from ._cache import layer_of

    layer = layer_of(key)
    if layer is None or layer.length != num_keys:
        return None
    if key.shape[2] != num_keys:
        return None
    return layer


def _moba_decode_from_cache(
    layer: MobaLayer,
    query: Tensor,
    attention_mask: Tensor | None,
    num_keys: int,
    scaling: float | None,
    settings: MobaSettings,
) -> Tensor:
    """A decode (or chunked-prefill) step of a MoBA layer from the layer's
    :class:`moba.KVCache`: routing from the running block sums, attention over
    the selected blocks only. Padded queries get zeros, as in the op path."""
    batch, heads_q, q_len, dim = query.shape
    cache = layer.moba_cache(attention_mask, settings.block_size)
    q = query.transpose(1, 2)  # [batch, q_len, Hq, D]
    options: dict[str, Any] = {
        "softmax_scale": scaling,
        "gqa_shared_routing": settings.gqa_shared_routing,
    }
    if attention_mask is None:
        out = cache.decode(q, settings.top_k, **options)
        assert isinstance(out, Tensor)
        return out
    query_valid = attention_mask[:, num_keys - q_len :]
    rows = query_valid.reshape(-1).nonzero().squeeze(1)
    packed = q.reshape(batch * q_len, heads_q, dim).index_select(0, rows)
    out = cache.decode(packed, settings.top_k, query_valid.sum(dim=1), **options)
    assert isinstance(out, Tensor)
    result = out.new_zeros((batch * q_len, heads_q, dim)).index_copy(0, rows, out)
    return result.view(batch, q_len, heads_q, dim)


def _full_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    num_keys: int,
    scaling: float | None,
    kwargs: Mapping[str, Any],
) -> Tensor:
    """Causal full attention with PyTorch SDPA, as transformers' "sdpa" backend."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    starts = None
    if attention_mask is None and q_len == kv_len:
        starts = _packed_sequence_starts(kwargs.get("position_ids"), batch, q_len)
    mask: Tensor | None = None
    # SDPA's own causal flag (q_len == kv_len) or no mask at all (one query
    # attending to the whole cache) cover the unpadded cases; everything else
    # gets an explicit boolean mask [batch, 1, q_len, kv_len].
    if attention_mask is not None or starts is not None or (1 < q_len != kv_len):
        device = query.device
        positions = (num_keys - q_len) + torch.arange(q_len, device=device)
        key_index = torch.arange(kv_len, device=device)
        allowed = (key_index[None, :] <= positions[:, None])[None]  # [1, q, kv]
        if attention_mask is not None:
            valid = torch.zeros((batch, kv_len), dtype=torch.bool, device=device)
            valid[:, :num_keys] = attention_mask
            allowed = allowed & valid[:, None, :]
        if starts is not None:
            sequence = torch.cumsum(starts.to(torch.int32), dim=1)  # [batch, q_len == kv_len]
            allowed = allowed & (sequence[:, :, None] == sequence[:, None, :])
        mask = allowed.expand(batch, q_len, kv_len)[:, None]
    out, _ = sdpa_attention_forward(
        module, query, key, value, mask, dropout=0.0, scaling=scaling, is_causal=True, **kwargs
    )
    return out
