"""moba.plot_routing: the image matches the routing; the figure renders headless."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moba
from moba.plot import routing_image

from helpers import cu_seqlens, random_qkv

pytest.importorskip("matplotlib")


def test_routing_image_marks_current_selected_and_future_blocks() -> None:
    q, k, _ = random_qkv(13 + 40, 13 + 40, 2, 1, 8)
    cu = cu_seqlens([13, 40])
    selected = moba.routing(q, k, cu, 40, 8, 3)
    image = routing_image(selected, cu, 8, head=1, sequence=1)
    assert image.shape == (40, 5)
    for t in range(40):
        current = t // 8
        row = image[t].tolist()
        assert row[current] == 3
        assert all(value == 0 for value in row[current + 1 :])
        chosen = {b for b in selected[13 + t, 1].tolist() if b >= 0 and b != current}
        assert {b for b in range(current) if row[b] == 2} == chosen
        assert all(row[b] == 1 for b in range(current) if b not in chosen)


def test_plot_routing_returns_and_saves_a_figure(tmp_path: Path) -> None:
    q, k, _ = random_qkv(64, 64, 2, 2, 16)
    path = tmp_path / "routing.png"
    figure = moba.plot_routing(q, k, cu_seqlens([64]), 64, 8, 3, head=1, path=path)
    assert path.stat().st_size > 1000
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (64, 8)
    assert figure.axes[0].get_title() == "MoBA routing: sequence 0, head 1, top-k 3"


def test_plot_routing_decode_geometry_and_naive_backend() -> None:
    q, k, _ = random_qkv(4, 30, 2, 1, 8)
    figure = moba.plot_routing(
        q,
        k,
        cu_seqlens([4]),
        4,
        8,
        2,
        backend="naive",
        cu_seqlens_k=cu_seqlens([30]),
        max_seqlen_k=30,
    )
    image = torch.as_tensor(figure.axes[0].images[0].get_array())
    assert image.shape == (4, 4)
    assert image[:, 3].tolist() == [3, 3, 3, 3]  # positions 26..29 are all in block 3


def test_plot_routing_rejects_bad_head_and_sequence() -> None:
    q, k, _ = random_qkv(10, 10, 2, 1, 8)
    cu = cu_seqlens([10, 0])
    with pytest.raises(ValueError, match="head"):
        moba.plot_routing(q, k, cu, 10, 4, 2, head=2)
    with pytest.raises(ValueError, match="sequence"):
        moba.plot_routing(q, k, cu, 10, 4, 2, sequence=2)
    with pytest.raises(ValueError, match="no queries"):
        moba.plot_routing(q, k, cu, 10, 4, 2, sequence=1)
