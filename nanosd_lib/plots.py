"""Figures the notebooks share: image grids and smoothed loss curves."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch


def image_grid(images: torch.Tensor, row_labels: list[str], title: str = "", size: float = 1.3):
    """Show images [rows, cols, 3, H, W] in [0, 1] (or [-1, 1] if `images.min() < 0`)."""
    if images.min() < 0:
        images = (images + 1) / 2
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.6, rows * size), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curves(panels: list[tuple[list[dict], str, str]], title: str, window: int = 20):
    """One panel per (log, column, name): raw per-step losses (faint) and their rolling mean."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (log, y, name) in zip(axes[0], panels):
        df = pd.DataFrame(log)
        sns.lineplot(df, x="step", y=y, ax=ax, alpha=0.3, lw=0.8)
        sns.lineplot(x=df["step"], y=df[y].rolling(window, min_periods=1).mean(), ax=ax, lw=1.8)
        ax.set_yscale("log")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
