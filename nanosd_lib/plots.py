"""Figures the notebooks share: image grids and smoothed loss curves."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib import ticker
import numpy as np
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


def prompt_grid(images: torch.Tensor, labels: list[str], title: str = "", per_row: int = 3,
                size: float = 1.0, marks: list[list[bool]] | None = None):
    """Images [P, S, 3, H, W] in [0, 1]: `per_row` prompts side by side, each with its S samples.

    `marks[p][s]` False draws a red frame (e.g. a sample whose nearest photo is another prompt's)."""
    p, s = images.shape[:2]
    rows = -(-p // per_row)
    fig, axes = plt.subplots(rows, per_row * s, figsize=(per_row * s * size, rows * (size + 0.25)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(p):
        for j in range(s):
            ax = axes[i // per_row][(i % per_row) * s + j]
            ax.imshow(images[i, j].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            if marks is not None and not marks[i][j]:
                ax.add_patch(plt.Rectangle((0, 0), images.shape[-1] - 1, images.shape[-2] - 1,
                                           fill=False, ec="red", lw=2))
            if j == 0:
                ax.set_title(labels[i], fontsize=7, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_files(paths: list, titles: list[str], width: float = 7.0):
    """Saved figures side by side (e.g. an earlier run's, kept for comparison)."""
    import matplotlib.image as mpimg

    fig, axes = plt.subplots(1, len(paths), figsize=(width * len(paths), width * 0.75), squeeze=False)
    for ax, path, title in zip(axes[0], paths, titles):
        ax.imshow(mpimg.imread(path))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def hv_traces(traces: pd.DataFrame, title: str):
    """Hypervolume against evaluations, one line per method (mean over seeds), band = min..max."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, df in traces.groupby("method"):
        g = df.groupby("evaluations").hv
        line, = ax.plot(g.mean().index, g.mean().values, label=method, lw=2)
        ax.fill_between(g.min().index, g.min().values, g.max().values, alpha=0.2, color=line.get_color())
    ax.set(xlabel="distinct candidates evaluated", ylabel="hypervolume (normalised objectives)", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


ROLE_STYLE = {"teacher": dict(marker="s", c="black"), "member": dict(marker="*", c="crimson", s=160),
              "baseline": dict(marker="^", c="tab:blue")}


def _short(value: float, _pos=None) -> str:
    """A tick label in a few characters: 50, 200, 2M, 500k."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def _one_label_per_point(where: dict) -> dict[str, object]:
    """{name: point} -> {label: point}, names that share a point joined into one label ("latency =
    params"), so that a model the search picked for two roles is not labelled twice on one spot."""
    groups: dict = {}
    for name, point in where.items():
        groups.setdefault(point, []).append(name)
    return {" = ".join(names): point for point, names in groups.items()}


def model_projections(models: pd.DataFrame, objectives: list[str], roles: dict[str, str], title: str):
    """Named models (index) in the three pairwise projections of `objectives`, marked by role ('teacher',
    'member' or 'baseline'), each labelled once. Latency and parameters span decades, so those axes are
    logarithmic; quality (a kernel distance, possibly slightly negative) is on a symlog axis."""
    together = _one_label_per_point({n: tuple(models.loc[n, objectives]) for n in models.index})
    pairs = [(0, 1), (0, 2), (1, 2)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    q = models[objectives[0]].abs()
    q = q[q > 0]  # linear within a decade of the typical distance, logarithmic beyond
    linthresh = float(10 ** np.floor(np.log10(q.median()))) if len(q) else 1e-3
    for ax, (i, j) in zip(axes, pairs):
        x, y = objectives[i], objectives[j]
        for role, style in ROLE_STYLE.items():
            names = [n for n in models.index if roles.get(n) == role]
            if names:
                ax.scatter(models.loc[names, x], models.loc[names, y], label=role,
                           **{"s": 60, **style, "zorder": 3})
        for axis, col in (("x", x), ("y", y)):
            if col == objectives[0]:
                getattr(ax, f"set_{axis}scale")("symlog", linthresh=linthresh, linscale=0.5)
            else:  # labels at 1, 2 and 5 of each decade: minor labels on a short span overlap
                getattr(ax, f"set_{axis}scale")("log")
                getattr(ax, f"{axis}axis").set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                getattr(ax, f"{axis}axis").set_major_formatter(ticker.FuncFormatter(_short))
                getattr(ax, f"{axis}axis").set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel=x, ylabel=y)
        ax.margins(0.1)  # room for a label beside a marker on the edge
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()  # the axes' final size first: label placement works in pixels
    for ax, (i, j) in zip(axes, pairs):
        _place_labels(ax, {label: (point[i], point[j]) for label, point in together.items()})
    fig.tight_layout()
    return fig


# Where a label may sit, in points from its marker: beside it (right, then left), then a line higher.
LABEL_OFFSETS = ((5, 3), (5, -11), (-5, 3), (-5, -11), (5, 13), (-5, 13))
MARKER_PX = 6  # half the width a marker covers, in pixels


def _place_labels(ax, where: dict[str, tuple[float, float]]):
    """Name each point {label: (x, y)} on the first side of its marker where the text covers no other
    label or marker and stays inside the axes (else on the first side): two members a few pixels apart
    would otherwise print over each other."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = {label: ax.transData.transform(xy) for label, xy in where.items()}
    markers = {label: Bbox.from_extents(u - MARKER_PX, v - MARKER_PX, u + MARKER_PX, v + MARKER_PX)
               for label, (u, v) in px.items()}
    placed = []

    def put(label, offset):
        return ax.annotate(label, where[label], fontsize=8, xytext=offset, textcoords="offset points",
                           ha="left" if offset[0] > 0 else "right")

    def fits(label, offset):
        text = put(label, offset)
        box = text.get_window_extent(renderer)
        text.remove()
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        others = placed + [b for name, b in markers.items() if name != label]
        return inside and not any(box.overlaps(b) for b in others)

    for label in sorted(where, key=lambda name: (-px[name][1], px[name][0])):  # top to bottom
        offset = next((o for o in LABEL_OFFSETS if fits(label, o)), LABEL_OFFSETS[0])
        placed.append(put(label, offset).get_window_extent(renderer))


def front_projections(points: pd.DataFrame, objectives: list[str], marks: dict[str, str], title: str):
    """Every evaluated point in the three pairwise projections; the 3-D front in colour, named ids marked."""
    from .search import pareto_mask

    on_front = pareto_mask(points[objectives].to_numpy())
    starred = _one_label_per_point(marks)
    rows = {arch_id: points[points.id == arch_id].iloc[0] for arch_id in starred.values()}
    pairs = [(0, 1), (0, 2), (1, 2)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (i, j) in zip(axes, pairs):
        x, y = objectives[i], objectives[j]
        ax.scatter(points[x][~on_front], points[y][~on_front], s=12, c="lightgrey", label="evaluated")
        ax.scatter(points[x][on_front], points[y][on_front], s=18, c="tab:blue", label="3-D front")
        for row in rows.values():
            ax.scatter(row[x], row[y], s=120, marker="*", c="crimson", zorder=3)
        ax.set(xlabel=x, ylabel=y)
        ax.margins(0.1)  # room for a label beside a star on the edge
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()  # the axes' final size first: label placement works in pixels
    for ax, (i, j) in zip(axes, pairs):  # only the starred members are obstacles, not every grey dot
        x, y = objectives[i], objectives[j]
        _place_labels(ax, {f"{names} {arch_id}": (rows[arch_id][x], rows[arch_id][y])
                           for names, arch_id in starred.items()})
    fig.tight_layout()
    return fig
