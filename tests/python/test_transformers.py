"""The transformers backends "moba" / "moba_naive" on tiny random models:
prefill logits and greedy generation against "sdpa" and against each other,
padding, packed sequences, the layer-wise hybrid, switching without reloading,
decode modes, training gradients, and argument errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import moba
from moba import _hf

transformers = pytest.importorskip("transformers")

VOCAB = 128
BLOCK, TOP_K = 8, 2  # prompts of 24-40 tokens have 3-5 blocks


def tiny_config(family: str = "llama", layers: int = 3, head_dim: int = 64) -> object:
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 256,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


def tiny_model(family: str = "llama", layers: int = 3, head_dim: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers, head_dim))
    return model.eval()


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    moba.register(block_size=BLOCK, top_k=TOP_K)
    yield
    moba.register(block_size=BLOCK, top_k=TOP_K)


def batch(
    left_pad: int = 0, right_pad: int = 0, length: int = 36
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of `length` slots: row 0 padded, row 1 full."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    if right_pad:
        mask[0, length - right_pad :] = 0
    ids[mask == 0] = 0
    return ids, mask


def logits(
    model: torch.nn.Module, implementation: str, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def generate(
    model: torch.nn.Module, implementation: str, ids: torch.Tensor, mask: torch.Tensor, new: int = 6
) -> list:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    return out[:, ids.shape[1] :].tolist()


def valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_prefill_top_k_covering_all_blocks_matches_sdpa(family: str) -> None:
    model = tiny_model(family)
    moba.configure(model, top_k=64)
    ids, mask = batch(left_pad=5)
    sdpa = logits(model, "sdpa", ids, mask)
    for implementation in ("moba", "moba_naive"):
        got = logits(model, implementation, ids, mask)
        torch.testing.assert_close(valid(got, mask), valid(sdpa, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_prefill_sparse_matches_naive_and_differs_from_sdpa(family: str) -> None:
    model = tiny_model(family)
    ids, mask = batch(left_pad=5)
    native = logits(model, "moba", ids, mask)
    naive = logits(model, "moba_naive", ids, mask)
    sdpa = logits(model, "sdpa", ids, mask)
    torch.testing.assert_close(valid(native, mask), valid(naive, mask), atol=1e-4, rtol=1e-4)
    assert (valid(native, mask) - valid(sdpa, mask)).abs().max() > 1e-2


@pytest.mark.parametrize(("left", "right"), [(7, 0), (0, 6), (17, 0)])
def test_padded_batch_equals_each_sequence_alone(left: int, right: int) -> None:
    model = tiny_model()
    ids, mask = batch(left_pad=left, right_pad=right)
    padded = logits(model, "moba", ids, mask)
    for row in range(2):
        keep = mask[row].bool()
        alone = logits(model, "moba", ids[row : row + 1, keep], mask[row : row + 1, keep])
        torch.testing.assert_close(padded[row, keep], alone[0], atol=1e-4, rtol=1e-4)


def test_packed_sequences_by_position_ids() -> None:
    model = tiny_model()
    ids, _ = batch(length=40)
    first, second = ids[0, :16], ids[1, :24]
    packed = torch.cat([first, second])[None]
    position_ids = torch.cat([torch.arange(16), torch.arange(24)])[None]
    model.set_attn_implementation("moba")
    # MoBA layers and full-attention layers both keep the sequences apart.
    for full_layers in ([], [1]):
        moba.configure(model, full_attention_layers=full_layers)
        with torch.no_grad():
            out = model(packed, position_ids=position_ids).logits[0]
            alone = [model(seq[None]).logits[0] for seq in (first, second)]
        torch.testing.assert_close(out, torch.cat(alone), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode", ["full", "moba"])
def test_greedy_generation_matches_naive(decode: str) -> None:
    model = tiny_model()
    moba.configure(model, decode=decode)
    ids, mask = batch(left_pad=6)
    assert generate(model, "moba", ids, mask) == generate(model, "moba_naive", ids, mask)


def test_greedy_generation_with_all_blocks_matches_sdpa() -> None:
    model = tiny_model()
    moba.configure(model, top_k=64, decode="moba")
    ids, mask = batch(left_pad=6)
    assert generate(model, "moba", ids, mask) == generate(model, "sdpa", ids, mask)


class _Calls:
    """Records which layers ran MoBA and which full attention, per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.moba: list[tuple[int, int]] = []
        self.full: list[tuple[int, int]] = []
        moba_fn, full_fn = _hf._moba_attention, _hf._full_attention

        def moba_spy(module: torch.nn.Module, query: torch.Tensor, *args: object) -> torch.Tensor:
            self.moba.append((module.layer_idx, query.shape[2]))
            return moba_fn(module, query, *args)

        def full_spy(module: torch.nn.Module, query: torch.Tensor, *args: object) -> torch.Tensor:
            self.full.append((module.layer_idx, query.shape[2]))
            return full_fn(module, query, *args)

        monkeypatch.setattr(_hf, "_moba_attention", moba_spy)
        monkeypatch.setattr(_hf, "_full_attention", full_spy)


def test_layerwise_hybrid_runs_the_right_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(layers=4)
    calls = _Calls(monkeypatch)
    moba.use_full_attention(model, layers=[-1, 1])  # switches the model to "moba"
    assert model.config._attn_implementation == "moba"
    ids, mask = batch()
    logits(model, "moba", ids, mask)
    assert calls.moba == [(0, 36), (2, 36)]
    assert calls.full == [(1, 36), (3, 36)]

    # Decode steps: full attention everywhere by default, MoBA with decode="moba".
    calls.moba.clear()
    calls.full.clear()
    generate(model, "moba", ids, mask, new=2)
    assert calls.moba == [(0, 36), (2, 36)]
    assert calls.full == [(1, 36), (3, 36), (0, 1), (1, 1), (2, 1), (3, 1)]
    moba.configure(model, decode="moba")
    calls.moba.clear()
    calls.full.clear()
    generate(model, "moba", ids, mask, new=2)
    assert calls.moba == [(0, 36), (2, 36), (0, 1), (2, 1)]
    assert calls.full == [(1, 36), (3, 36), (1, 1), (3, 1)]


def test_all_layers_full_equals_sdpa_and_hybrid_differs() -> None:
    model = tiny_model(layers=3)
    ids, mask = batch(left_pad=4)
    sdpa = logits(model, "sdpa", ids, mask)
    moba.configure(model, full_attention_layers=[0, 1, 2])
    torch.testing.assert_close(valid(logits(model, "moba", ids, mask), mask), valid(sdpa, mask))
    moba.configure(model, full_attention_layers=[-1])
    hybrid = logits(model, "moba", ids, mask)
    moba.configure(model, full_attention_layers=[])
    sparse = logits(model, "moba", ids, mask)
    assert (valid(hybrid, mask) - valid(sdpa, mask)).abs().max() > 1e-3
    assert (valid(hybrid, mask) - valid(sparse, mask)).abs().max() > 1e-3


def test_from_pretrained_and_switching_without_reloading(tmp_path: object) -> None:
    tiny_model().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="moba"
    ).eval()
    assert model.config._attn_implementation == "moba"
    ids, mask = batch(left_pad=3)
    with torch.no_grad():
        sparse = model(ids, attention_mask=mask).logits
    moba.use_full_attention(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    moba.use_moba(model)
    with torch.no_grad():
        again = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(again, sparse)
    assert (valid(full, mask) - valid(sparse, mask)).abs().max() > 1e-2
    torch.testing.assert_close(valid(full, mask), valid(logits(model, "sdpa", ids, mask), mask))


def test_per_model_settings_are_saved_with_the_config(tmp_path: object) -> None:
    model = tiny_model()
    settings = moba.configure(model, block_size=4, top_k=3, full_attention_layers=[-1])
    assert settings == moba.MobaSettings(block_size=4, top_k=3, full_attention_layers=(-1,))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="moba")
    assert _hf.settings_of(loaded.config) == settings
    # Other models keep the process-wide defaults.
    assert _hf.settings_of(tiny_model().config) == moba.MobaSettings(block_size=BLOCK, top_k=TOP_K)


def test_training_gradients_match_naive() -> None:
    grads = {}
    ids, mask = batch(left_pad=5)
    for implementation in ("moba", "moba_naive"):
        model = tiny_model(layers=2)
        model.set_attn_implementation(implementation)
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads[implementation] = {
            n: p.grad for n, p in model.named_parameters() if p.grad is not None
        }
    assert grads["moba"].keys() == grads["moba_naive"].keys()
    for name, grad in grads["moba"].items():
        torch.testing.assert_close(grad, grads["moba_naive"][name], atol=1e-4, rtol=1e-3, msg=name)


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"block_size": 0}, ValueError, "block_size"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"block_size": 1.5}, TypeError, "block_size"),
        ({"decode": "sparse"}, ValueError, "decode"),
        ({"backend": "tpu"}, ValueError, "backend"),
        ({"full_attention_layers": 3}, TypeError, "full_attention_layers"),
    ],
)
def test_register_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        moba.register(**kwargs)


def test_configure_rejects_unknown_options() -> None:
    with pytest.raises(TypeError, match="chunk"):
        moba.configure(tiny_model(layers=1), chunk=4)


def test_unsupported_head_dim() -> None:
    model = tiny_model(layers=1, head_dim=12)
    ids, mask = batch()
    with pytest.raises(ValueError, match="head dim 12"):
        logits(model, "moba", ids, mask)


def test_non_causal_use_is_rejected() -> None:
    model = tiny_model(layers=1)
    ids, mask = batch()
    model.model.layers[0].self_attn.is_causal = False
    with pytest.raises(ValueError, match="is_causal"):
        logits(model, "moba", ids, mask)
    model = tiny_model(layers=1)
    model.config.is_causal = False
    with pytest.raises(ValueError, match="is_causal"):
        logits(model, "moba_naive", ids, mask)


def test_dropout_and_sliding_window_are_rejected() -> None:
    model = tiny_model(layers=1)
    model.config.attention_dropout = 0.1
    model.model.layers[0].self_attn.attention_dropout = 0.1
    model.train()
    ids, mask = batch()
    model.set_attn_implementation("moba")
    with pytest.raises(ValueError, match="dropout"):
        model(ids, attention_mask=mask)
    config = tiny_config("mistral", layers=1)
    config.sliding_window = 16
    window_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding_window"):
        logits(window_model, "moba", ids, mask)
