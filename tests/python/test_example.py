"""examples/llama.py runs end to end on the built-in tiny random Llama."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "llama.py"


@pytest.mark.parametrize("attn", ["moba", "moba_naive"])
def test_example_generates(attn: str) -> None:
    command = [sys.executable, str(SCRIPT), "--attn", attn, "--block-size", "16", "--top-k", "2"]
    command += ["--prompt-len", "64", "--max-new-tokens", "4", "--full-attention-layers", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"attn: {attn}, block size 16, top-k 2, prompt 64 tokens" in result.stdout
    assert "prefill:" in result.stdout and "tokens/s" in result.stdout
    ids_line = next(
        line for line in result.stdout.splitlines() if line.startswith("generated ids:")
    )
    assert len(ids_line.split(":", 1)[1].strip().strip("[]").split(",")) == 4
