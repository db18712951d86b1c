"""examples/train_recall.py: the recall task's layout, and the --tiny CPU run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_recall.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_recall", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_recall"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def small_settings(
    script: ModuleType, stages: tuple[tuple[int, int], ...], repeats: int = 1
) -> Any:
    return script.Settings(
        device="cpu",
        stages=stages,
        tokens_per_step=400,
        pairs=8,
        repeats=repeats,
        layers=1,
        hidden=64,
        heads=1,
        kv_heads=1,
        head_dim=64,
        rope_theta=1e6,
        filler_vocab=5,
        key_vocab=20,
        value_vocab=7,
        block_size=16,
        top_k=2,
        full_attention_layers=(),
        lr=1e-3,
        warmup=1,
        weight_decay=0.0,
        clip=1.0,
        seed=3,
        dtype="float32",
        time_budget_s=1e9,
    )


def test_batches_hold_each_pair_once_then_ask_every_key() -> None:
    script = load_script()
    settings = small_settings(script, ((200, 2), (100, 1)))
    batch = script.make_batch(settings, 0)
    again = script.make_batch(settings, 0)
    assert batch.ids.equal(again.ids) and batch.extra.equal(again.extra)
    assert not batch.ids.equal(script.make_batch(settings, 1).ids)
    # Stage 1 (200 tokens, 2 sequences of the 400 tokens per step), then stage 2.
    assert batch.ids.shape == (2, 200) and batch.answers.shape == (2, 8)
    assert script.make_batch(settings, 2).ids.shape == (4, 100)
    context = 200 - 8
    key_base, value_base, marker = 5, 25, settings.vocab - 1
    for row in range(2):
        ids, extra = batch.ids[row].tolist(), batch.extra[row].tolist()
        has = batch.has_extra[row].tolist()
        pairs = {ids[i]: extra[i] for i in range(context) if has[i]}
        assert len(pairs) == 8  # distinct keys, each once in the context
        assert all(key_base <= key < value_base for key in pairs)
        assert all(value_base <= value < value_base + 7 for value in pairs.values())
        # Filler everywhere else in the context, one pair per 24-token segment.
        assert all(ids[i] < key_base for i in range(context) if not has[i])
        assert [i // 24 for i in range(context) if has[i]] == list(range(8))
        queries = ids[context:]
        assert sorted(queries) == sorted(pairs)
        assert extra[context:] == [marker] * 8 and all(has[context:])
        assert batch.answers[row].tolist() == [pairs[k] for k in queries]


def test_repeated_pairs_stay_in_their_segment() -> None:
    script = load_script()
    settings = small_settings(script, ((200, 1),), repeats=3)
    batch = script.make_batch(settings, 0)
    context = 200 - 8
    for row in range(2):
        ids, extra = batch.ids[row].tolist(), batch.extra[row].tolist()
        places = [i for i in range(context) if batch.has_extra[row, i]]
        assert [i // 24 for i in places] == [s for s in range(8) for _ in range(3)]
        by_key: dict[int, set[int]] = {}
        for i in places:
            by_key.setdefault(ids[i], set()).add(extra[i])
        # 8 keys, each 3 times with one value, which is its answer.
        assert len(by_key) == 8 and all(len(values) == 1 for values in by_key.values())
        queries = ids[context:]
        assert batch.answers[row].tolist() == [next(iter(by_key[k])) for k in queries]


def test_bad_settings_get_clear_errors() -> None:
    script = load_script()
    with pytest.raises(SystemExit, match="--stages: a 10-token stage has no room for 8 pairs"):
        script.check(small_settings(script, ((200, 2), (10, 1))))
    with pytest.raises(
        SystemExit, match=r"expected lengths >= \(--repeats \+ 1\) \* --pairs \(40\)"
    ):
        script.check(small_settings(script, ((39, 1),), repeats=4))
    with pytest.raises(SystemExit, match="--stages: expected LENGTH:STEPS"):
        script.parse_stages("128:10,512")


def test_tiny_cpu_run_learns_and_moba_equals_full_attention_within_its_blocks(
    tmp_path: Path,
) -> None:
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny"]
    command += ["--out-dir", str(tmp_path), "--log-every", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "train_recall.json").read_text())
    settings = data["settings"]
    assert settings["stages"] == [[64, 80], [256, 10]] and data["complete"]
    assert set(data["runs"]) == {"moba", "sdpa"}
    moba, sdpa = data["runs"]["moba"], data["runs"]["sdpa"]
    assert moba["moba_settings"]["block_size"] == 64 and moba["moba_settings"]["top_k"] == 2
    for name, run in data["runs"].items():
        for key in ("loss", "accuracy", "step_ms"):
            assert len(run[key]) == 90, (name, key)
        assert all(math.isfinite(x) for x in run["loss"]), name
        assert all(0.0 <= x <= 1.0 for x in run["accuracy"]), name
    # 64 tokens are one MoBA block: MoBA is then exact causal attention, so both
    # models (same initialisation, same batches, float32) follow the same curve.
    # Only the first 20 steps are compared: later, near the abrupt transition,
    # AdamW can turn rounding-level gradient differences into full-size updates.
    gap = max(abs(a - b) for a, b in zip(moba["loss"][:20], sdpa["loss"][:20], strict=True))
    assert gap < 1e-3, gap
    # Retrieval is learnt, not only which tokens are values: from chance (1/16)
    # the accuracy of the 64-token stage's last 10 steps is far above it (1.0 with
    # seeds 0, 1 and 2), and full attention keeps it on 256 tokens.
    assert data["chance_accuracy"] == 1 / 16
    assert sum(sdpa["accuracy"][:5]) / 5 < 0.15
    assert sum(sdpa["accuracy"][70:80]) / 10 > 0.5
    assert sum(sdpa["loss"][70:80]) / 10 < math.log(16) - 1.0
    assert sdpa["stages"][1]["accuracy_mean_last"] > 0.5
    png = tmp_path / "train_recall.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 10_000
