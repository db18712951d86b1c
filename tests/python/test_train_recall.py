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
    script: ModuleType,
    stages: tuple[tuple[int, int], ...],
    repeats: int = 1,
    repeat_fraction: float = 0.0,
) -> Any:
    return script.Settings(
        device="cpu",
        stages=stages,
        tokens_per_step=400,
        pairs=8,
        repeats=repeats,
        repeat_fraction=repeat_fraction,
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


def test_passages_are_contiguous_runs_in_their_segment_that_grow_with_the_stage() -> None:
    script = load_script()
    # Segments of (200 - 8) // 8 = 24 and (392 - 8) // 8 = 48 tokens: a quarter of
    # them is a passage of 6, then of 12 places.
    settings = small_settings(script, ((200, 1), (392, 1)), repeat_fraction=0.25)
    starts_in_segment = set()
    for step, (seq_len, segment, length) in enumerate(((200, 24, 6), (392, 48, 12))):
        assert settings.places_of(seq_len) == length
        batch = script.make_batch(settings, step)
        assert batch.ids.shape[1] == seq_len
        context = seq_len - 8
        for row in range(batch.ids.shape[0]):
            ids, extra = batch.ids[row].tolist(), batch.extra[row].tolist()
            places = [i for i in range(context) if batch.has_extra[row, i]]
            # `length` places in each segment, in segment order, then filler only.
            assert [i // segment for i in places] == [s for s in range(8) for _ in range(length)]
            assert all(ids[i] < 5 for i in range(context) if not batch.has_extra[row, i])
            by_key: dict[int, list[int]] = {}
            for i in places:
                by_key.setdefault(ids[i], []).append(i)
            assert len(by_key) == 8
            for key, run in by_key.items():
                # One contiguous run, all of it holding the key's one value.
                assert run == list(range(run[0], run[0] + length)), (key, run)
                assert len({extra[i] for i in run}) == 1
                starts_in_segment.add(run[0] % segment)
            # The queries are unchanged: every key once, answered by its value.
            queries = ids[context:]
            assert sorted(queries) == sorted(by_key)
            assert extra[context:] == [settings.vocab - 1] * 8
            assert batch.answers[row].tolist() == [extra[by_key[k][0]] for k in queries]
    # At a random offset of the segment, not at its start.
    assert len(starts_in_segment) > 3


def test_the_command_line_stores_the_repeat_fraction() -> None:
    script = load_script()
    args = script.parse_args(["--device", "cpu", "--tiny", "--repeat-fraction", "0.25"])
    settings = script.settings_from(args)
    assert settings.repeat_fraction == 0.25 and settings.repeats == 1
    # --tiny: 16 pairs at 64 and 256 tokens, segments of 3 and 15 tokens.
    assert [settings.places_of(n) for n, _ in settings.stages] == [1, 4]
    assert settings.placement().endswith("0.25 of its segment: 1, 4 places at 64, 256 tokens")
    off = script.settings_from(script.parse_args(["--device", "cpu", "--tiny"]))
    assert off.repeat_fraction == 0.0 and off.places_of(256) == 1


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
    for fraction in ("0", "-0.1", "0.6", "nan"):
        args = script.parse_args(["--device", "cpu", "--tiny", "--repeat-fraction", fraction])
        with pytest.raises(SystemExit, match=r"--repeat-fraction: expected 0 < F <= 0\.5, got"):
            script.settings_from(args)
    with pytest.raises(SystemExit, match=r"expected 0 < F <= 0\.5, got 0\.51"):
        script.check(small_settings(script, ((200, 1),), repeat_fraction=0.51))
    args = script.parse_args(
        ["--device", "cpu", "--tiny", "--repeats", "2", "--repeat-fraction", "0.1"]
    )
    with pytest.raises(SystemExit, match="--repeat-fraction and --repeats 2: expected one"):
        script.settings_from(args)
    # A passage fits any segment of one position or more: 16 tokens, not 15.
    script.check(small_settings(script, ((16, 1),), repeat_fraction=0.5))
    with pytest.raises(SystemExit, match=r"expected lengths >= 2 \* --pairs \(16\)"):
        script.check(small_settings(script, ((15, 1),), repeat_fraction=0.5))


def test_plot_draws_passage_runs_and_older_jsons(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    script = load_script()
    settings = small_settings(script, ((200, 3), (392, 2)), repeat_fraction=0.25)
    curve = [1.0, 0.8, 0.5, 0.4, 0.2]
    run = {"loss": curve, "accuracy": [1 - x for x in curve]}
    result = {
        "settings": script.asdict(settings),
        "device": "cpu",
        "runs": {"moba": run, "sdpa": run},
    }
    script.plot(result, tmp_path / "new.png")
    # A JSON written before --repeats and --repeat-fraction existed.
    older = {k: v for k, v in result["settings"].items() if "repeat" not in k}
    script.plot(result | {"settings": older}, tmp_path / "old.png")
    assert (tmp_path / "new.png").stat().st_size > 10_000
    assert (tmp_path / "old.png").stat().st_size > 10_000


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
