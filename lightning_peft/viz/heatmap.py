"""The AdaLoRA rank heatmap: kept rank per layer (rows) and adapted matrix (columns). Drawing needs matplotlib
(optional); :func:`heatmap_grid` does not."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

HEATMAP_FILE = "adalora_rank_heatmap.png"


def heatmap_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels, column labels, values): one row per layer index, one column per matrix within a layer.

    ``bert.encoder.layer.3.attention.self.query`` goes to row ``layer.3``, column ``attention.self.query``;
    names without a layer index go to a row ``(other)``.
    """
    cells: dict[tuple[tuple[str, int], str], int] = {}
    for name, rank in ranks.items():
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None:
            row, col = ("(other)", -1), name
        else:
            row, col = (".".join(parts[:idx]), int(parts[idx])), ".".join(parts[idx + 1 :]) or name
        cells[(row, col)] = rank
    rows = sorted({r for r, _ in cells})
    cols = list(dict.fromkeys(c for _, c in cells))
    prefixes = {p for p, i in rows if i >= 0}
    labels = [
        p if i < 0 else (f"{p.rsplit('.', 1)[-1]}.{i}" if len(prefixes) == 1 else f"{p}.{i}") for p, i in rows
    ]
    values = [[float(cells.get((r, c), float("nan"))) for c in cols] for r in rows]
    return labels, cols, values


def plot_rank_heatmap(
    ranks: Mapping[str, int], init_r: int, path: str, title: str = "AdaLoRA kept rank"
) -> Any:
    """Draw the kept rank per layer and matrix, annotated, into ``path`` (PNG); returns the figure."""
    # a bare Figure on the Agg canvas: no pyplot state, and the user's interactive backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, cols, values = heatmap_grid(ranks)
    fig = Figure(figsize=(1.2 + 1.1 * len(cols), 1.0 + 0.45 * len(labels)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(torch.tensor(values).numpy(), cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(
                    j,
                    i,
                    f"{int(v)}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.6 * init_r else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=f"kept rank (of {init_r})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return fig


__all__ = ["HEATMAP_FILE", "heatmap_grid", "plot_rank_heatmap"]
