"""A picture of MoBA's routing: which blocks each query of one head attends to."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._ops import routing

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Cell values of the image, with their legend.
_FUTURE, _SKIPPED, _SELECTED, _CURRENT = 0, 1, 2, 3
_LABELS = ("future (causal)", "not selected", "selected past block", "current block")
_COLORS = ("#ffffff", "#d9d9d9", "#2c7fb8", "#f03b20")


def routing_image(
    selected: Tensor,
    cu_seqlens: Tensor,
    moba_chunk_size: int,
    *,
    head: int = 0,
    sequence: int = 0,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """``[len_q, blocks]`` int64 image of one sequence and head from a
    :func:`moba.routing` result: 0 future block, 1 past block not selected,
    2 selected past block, 3 the query's current block."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    batch = cu_seqlens.shape[0] - 1
    if not 0 <= sequence < batch:
        raise ValueError(f"sequence: expected 0 <= sequence < {batch}, got {sequence}")
    if not 0 <= head < selected.shape[1]:
        raise ValueError(f"head: expected 0 <= head < {selected.shape[1]}, got {head}")
    q0, q1 = int(cu_seqlens[sequence]), int(cu_seqlens[sequence + 1])
    k0, k1 = int(cu_k[sequence]), int(cu_k[sequence + 1])
    len_q, len_k = q1 - q0, k1 - k0
    blocks = -(-len_k // moba_chunk_size)
    positions = (len_k - len_q) + torch.arange(len_q)
    current = positions // moba_chunk_size
    index = torch.arange(blocks)
    image = torch.where(index[None, :] <= current[:, None], _SKIPPED, _FUTURE)
    chosen = selected[q0:q1, head].detach().cpu().long()  # [len_q, W], -1 padded
    rows = torch.arange(len_q)[:, None].expand_as(chosen)
    keep = chosen >= 0
    image[rows[keep], chosen[keep]] = _SELECTED
    image[torch.arange(len_q), current] = _CURRENT
    return image


def plot_routing(
    q: Tensor,
    k: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    head: int = 0,
    sequence: int = 0,
    path: str | PathLike[str] | None = None,
    gqa_shared_routing: bool = False,
    backend: str = "auto",
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    title: str | None = None,
) -> Figure:
    """Draws which blocks each query of one head attended to: queries down,
    blocks across, the current block and the selected past blocks coloured.

    The arguments are those of :func:`moba.routing` (which computes the
    selection, with ``backend="naive"`` as an option) plus ``head`` and
    ``sequence`` (which one of the packed batch). Returns the matplotlib
    ``Figure`` (built without pyplot, so it works with any backend, Agg
    included) and saves it to ``path`` if given.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    selected = routing(
        q,
        k,
        cu_seqlens,
        max_seqlen,
        moba_chunk_size,
        moba_topk,
        gqa_shared_routing=gqa_shared_routing,
        backend=backend,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_k=max_seqlen_k,
    )
    image = routing_image(
        selected,
        cu_seqlens,
        moba_chunk_size,
        head=head,
        sequence=sequence,
        cu_seqlens_k=cu_seqlens_k,
    )
    len_q, blocks = image.shape
    if len_q == 0:
        raise ValueError(f"sequence: sequence {sequence} has no queries to plot")
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    first_position = int(cu_k[sequence + 1] - cu_k[sequence]) - len_q

    figure = Figure(
        figsize=(min(2.0 + 0.35 * blocks, 12.0), min(2.0 + 0.02 * len_q, 9.0)), layout="constrained"
    )
    axes = figure.add_subplot()
    colormap = ListedColormap(_COLORS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], colormap.N)
    axes.imshow(
        image.numpy(),
        cmap=colormap,
        norm=norm,
        aspect="auto",
        interpolation="nearest",
        extent=(-0.5, blocks - 0.5, first_position + len_q - 0.5, first_position - 0.5),
    )
    axes.set_xlabel(f"key block (block size {moba_chunk_size})")
    axes.set_ylabel("query position")
    axes.set_title(
        title
        if title is not None
        else f"MoBA routing: sequence {sequence}, head {head}, top-k {moba_topk}"
    )
    axes.legend(
        handles=[
            Patch(facecolor=c, edgecolor="#808080", label=label)
            for c, label in zip(_COLORS, _LABELS, strict=True)
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
    )
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
