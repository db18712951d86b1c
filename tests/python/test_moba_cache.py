"""moba.MobaCache: generation whose MoBA decode steps run moba.KVCache.decode
(running block sums) equals the op path (prefill op with cu_seqlens_k over
the whole cache), moba_naive, and "sdpa" when top-k covers every block; with
padding, the layer-wise hybrid, chunked prefill and decode="full"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import moba
from moba import _hf

transformers = pytest.importorskip("transformers")

from test_transformers import BLOCK, TOP_K, batch, tiny_config, tiny_model  # noqa: E402

NEW = 6


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    moba.register(block_size=BLOCK, top_k=TOP_K)
    yield
    moba.register(block_size=BLOCK, top_k=TOP_K)


class _Spy:
    """Counts (layer, q_len) of cached decode steps and of op-path MoBA calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cached: list[tuple[int, int]] = []
        self.op: list[tuple[int, int]] = []
        cached_fn, op_fn = _hf._moba_decode_from_cache, _hf._moba_attention

        def cached_spy(layer: object, query: torch.Tensor, *args: object) -> torch.Tensor:
            self.cached.append((self._layer_index(layer), query.shape[2]))
            return cached_fn(layer, query, *args)

        def op_spy(module: torch.nn.Module, query: torch.Tensor, *args: object) -> torch.Tensor:
            self.op.append((module.layer_idx, query.shape[2]))
            return op_fn(module, query, *args)

        self.layers: list[object] = []
        monkeypatch.setattr(_hf, "_moba_decode_from_cache", cached_spy)
        monkeypatch.setattr(_hf, "_moba_attention", op_spy)

    def _layer_index(self, layer: object) -> int:
        for index, known in enumerate(self.layers):
            if known is layer:
                return index
        return -1


def run(
    model: torch.nn.Module,
    implementation: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: object | None = None,
    new: int = NEW,
) -> tuple[list, torch.Tensor]:
    """Greedy generation: (new tokens, stacked logits [steps, batch, vocab])."""
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            past_key_values=cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, ids.shape[1] :].tolist(), torch.stack(out.logits)


def new_cache(model: torch.nn.Module, ids: torch.Tensor) -> moba.MobaCache:
    return moba.cache_for(model, NEW, ids.shape[1])


@pytest.mark.parametrize("left_pad", [0, 7])
@pytest.mark.parametrize("shared", [False, True])
def test_cached_decode_equals_op_path_and_naive(
    monkeypatch: pytest.MonkeyPatch, left_pad: int, shared: bool
) -> None:
    model = tiny_model()
    moba.configure(model, decode="moba", gqa_shared_routing=shared)
    ids, mask = batch(left_pad=left_pad)  # two sequences, row 0 left-padded or not
    op_tokens, op_logits = run(model, "moba", ids, mask)
    naive_tokens, naive_logits = run(model, "moba_naive", ids, mask)
    sdpa_tokens, sdpa_logits = run(model, "sdpa", ids, mask)

    spy = _Spy(monkeypatch)
    cache = new_cache(model, ids)
    spy.layers = list(cache.layers)
    tokens, cached_logits = run(model, "moba", ids, mask, cache)
    assert tokens == op_tokens == naive_tokens
    torch.testing.assert_close(cached_logits, op_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached_logits, naive_logits, atol=1e-4, rtol=1e-4)
    # Sparse routing matters here: the decode logits differ from full attention.
    assert (cached_logits - sdpa_logits).abs().max() > 1e-3 or tokens != sdpa_tokens
    # Prefill ran the op once per layer; every decode step of every layer the cache.
    assert spy.op == [(layer, ids.shape[1]) for layer in range(3)]
    assert spy.cached == [(layer, 1) for _ in range(NEW - 1) for layer in range(3)]
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    routing = cache.layers[0].routing
    assert routing is not None and routing.paged == (left_pad > 0)
    valid = mask.sum(dim=1) + NEW - 1
    assert routing.cache.seqlens.tolist() == valid.tolist()


def test_cached_decode_with_all_blocks_equals_sdpa() -> None:
    model = tiny_model()
    moba.configure(model, top_k=64, decode="moba")
    ids, mask = batch(left_pad=6)
    sdpa_tokens, sdpa_logits = run(model, "sdpa", ids, mask)
    tokens, cached_logits = run(model, "moba", ids, mask, new_cache(model, ids))
    assert tokens == sdpa_tokens
    torch.testing.assert_close(cached_logits, sdpa_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families(family: str) -> None:
    model = tiny_model(family)
    moba.configure(model, decode="moba")
    ids, mask = batch(left_pad=7)
    op_tokens, op_logits = run(model, "moba", ids, mask)
    tokens, logits = run(model, "moba", ids, mask, new_cache(model, ids))
    assert tokens == op_tokens
    torch.testing.assert_close(logits, op_logits, atol=1e-4, rtol=1e-4)


def test_bfloat16_model() -> None:
    model = tiny_model().to(torch.bfloat16)
    moba.configure(model, decode="moba")
    ids, mask = batch(left_pad=7)
    op_tokens, op_logits = run(model, "moba", ids, mask)
    tokens, logits = run(model, "moba", ids, mask, new_cache(model, ids))
    assert tokens == op_tokens
    torch.testing.assert_close(logits.float(), op_logits.float(), atol=2e-2, rtol=2e-2)


def test_padded_batch_equals_each_sequence_alone() -> None:
    model = tiny_model()
    moba.configure(model, decode="moba")
    ids, mask = batch(left_pad=11)
    tokens, logits = run(model, "moba", ids, mask, new_cache(model, ids))
    for row in range(2):
        keep = mask[row].bool()
        alone_ids, alone_mask = ids[row : row + 1, keep], mask[row : row + 1, keep]
        alone_tokens, alone_logits = run(
            model, "moba", alone_ids, alone_mask, new_cache(model, alone_ids)
        )
        assert alone_tokens[0] == tokens[row]
        torch.testing.assert_close(logits[:, row], alone_logits[:, 0], atol=1e-4, rtol=1e-4)


def test_layerwise_hybrid_with_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(layers=3)
    moba.configure(model, decode="moba", full_attention_layers=[1])
    ids, mask = batch(left_pad=5)
    op_tokens, op_logits = run(model, "moba", ids, mask)
    spy = _Spy(monkeypatch)
    cache = new_cache(model, ids)
    spy.layers = list(cache.layers)
    tokens, logits = run(model, "moba", ids, mask, cache)
    assert tokens == op_tokens
    torch.testing.assert_close(logits, op_logits, atol=1e-4, rtol=1e-4)
    assert spy.cached == [(layer, 1) for _ in range(NEW - 1) for layer in (0, 2)]
    assert cache.layers[1].routing is None  # full attention only reads the views


def test_decode_full_and_naive_read_the_cache_views(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    ids, mask = batch(left_pad=4)
    spy = _Spy(monkeypatch)
    for implementation, decode in (("moba", "full"), ("moba_naive", "moba")):
        moba.configure(model, decode=decode)
        expected_tokens, expected_logits = run(model, implementation, ids, mask)
        tokens, logits = run(model, implementation, ids, mask, new_cache(model, ids))
        assert tokens == expected_tokens
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert spy.cached == []


def test_chunked_prefill_from_the_cache_equals_one_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    moba.configure(model, decode="moba")
    model.set_attn_implementation("moba")
    ids, _ = batch(length=40)
    spy = _Spy(monkeypatch)
    cache = moba.MobaCache(model.config, 40)
    spy.layers = list(cache.layers)
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :29], past_key_values=cache, use_cache=True).logits
        rest = model(ids[:, 29:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=1e-4, rtol=1e-4)
    assert spy.cached == [(0, 11), (1, 11), (2, 11)]


def test_beam_search_reorders_the_cache() -> None:
    model = tiny_model()
    moba.configure(model, decode="moba")
    model.set_attn_implementation("moba")
    ids, mask = batch(left_pad=5)
    options = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **options)
        got = model.generate(
            ids, attention_mask=mask, past_key_values=new_cache(model, ids), **options
        )
    assert torch.equal(got, expected)


def test_crop_then_decode_again(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    moba.configure(model, decode="moba")
    model.set_attn_implementation("moba")
    ids, _ = batch(length=40)
    spy = _Spy(monkeypatch)
    cache = moba.MobaCache(model.config, 40)
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        first = model(ids[:, 30:], past_key_values=cache, use_cache=True).logits
        cache.crop(-10)
        assert cache.get_seq_length() == 30
        again = model(ids[:, 30:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, first)
    assert len(spy.cached) == 6  # both chunks of all 3 layers from the cache


def test_block_size_change_rebuilds_the_block_sums() -> None:
    model = tiny_model(layers=1)
    moba.configure(model, decode="moba")
    ids, mask = batch()
    cache = new_cache(model, ids)
    run(model, "moba", ids, mask, cache, new=2)
    layer = cache.layers[0]
    assert layer.routing is not None and layer.routing.block_size == BLOCK
    kv = layer.moba_cache(None, 4)
    assert kv.block_size == 4 and kv.seqlens.tolist() == [layer.length] * 2
    keys = layer.k_buffer[:, : layer.length].float()
    torch.testing.assert_close(kv.block_sums[:, 1], keys[:, 4:8].sum(dim=1))


def test_errors() -> None:
    model = tiny_model(layers=1)
    moba.configure(model, decode="moba")
    ids, mask = batch()
    with pytest.raises(ValueError, match="exceed the MobaCache capacity of 40"):
        run(model, "moba", ids, mask, moba.MobaCache(model.config, 40), new=6)
    with pytest.raises(ValueError, match="max_cache_len: expected >= 1"):
        moba.MobaCache(model.config, 0)
    with pytest.raises(TypeError, match="max_cache_len: expected an int"):
        moba.MobaCache(model.config, 4.5)  # type: ignore[arg-type]
    config = tiny_config("mistral", layers=1)
    config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding-window"):
        moba.MobaCache(config, 64)
