"""Where a deformable kernel samples its scope, and where deformable conv samples the data,
at object centres of different scales (the paper's kernel-space figure)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from ._style import KERNEL_CMAP, as_image, as_map, new_figure
from .heatmaps import BOX_COLOR, MARK_COLOR, _outline

RIGID_COLOR = "#FFFFFF"
DK_COLOR = "#D55E00"   # vermillion
DC_COLOR = "#009E73"   # bluish green


def rigid_scope_positions(kernel_size: int, scope_size: int) -> np.ndarray:
    """(K*K, 2) scope coordinates a zero-offset DK samples: the centred K x K sub-grid."""
    pad = (scope_size - kernel_size) / 2.0
    a, b = np.meshgrid(np.arange(kernel_size), np.arange(kernel_size), indexing="ij")
    return np.stack([a.ravel() + pad, b.ravel() + pad], axis=1)


def _frame(ax, h: int, w: int, pts, label: str) -> None:
    """Axis limits covering an h x w grid and every point; the grid's edge outlined."""
    from matplotlib.patches import Rectangle
    y0, x0, y1, x1 = -0.5, -0.5, h - 0.5, w - 0.5
    if pts is not None:
        p = np.asarray(pts, dtype=float).reshape(-1, 2)
        y0, x0 = min(y0, p[:, 0].min() - 0.5), min(x0, p[:, 1].min() - 0.5)
        y1, x1 = max(y1, p[:, 0].max() + 0.5), max(x1, p[:, 1].max() + 0.5)
    ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="black", linewidth=1.2,
                           linestyle="--", label=label, zorder=2))
    pad = 0.04 * max(y1 - y0, x1 - x0)  # keeps the dashed edge off the axes frame
    ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(y1 + pad, y0 - pad)
    ax.set_aspect("equal")


def sampling_figure(rows: Sequence[Mapping], *, title: str = ""):
    """One row per object. Each row mapping holds "label" and any of:
      "image", "centre" (y, x), "box", "dc_points" (P, 2) image (y, x) points DC reads;
      "scope" (S, S) kernel weights, "dk_points" (K*K, 2) scope (row, col) DK samples,
      "kernel_size" K.
    Left column: the image with DC's sampling points; right: the DK scope with its
    samples (filled) over the rigid K x K grid (hollow)."""
    if not rows:
        raise ValueError("no rows to plot")
    has_dc = any(r.get("dc_points") is not None for r in rows)
    has_dk = any(r.get("dk_points") is not None for r in rows)
    if not (has_dc or has_dk):
        raise ValueError("rows carry neither DC nor DK sampling points")
    ncol = int(has_dc) + int(has_dk)
    fig = new_figure(3.6 * ncol + 1.2, 3.2 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    scope_norm = None
    for r, row in enumerate(rows):
        c = 0
        if has_dc:
            ax = axes[r][c]
            c += 1
            img = None
            if row.get("image") is not None:
                img = as_image(row["image"])
                # Grey, so the coloured markers are the only colour in the panel.
                grey = img.mean(axis=2) if img.ndim == 3 else img
                ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if row.get("box") is not None:
                _outline(ax, row["box"], BOX_COLOR, "-", "object box")
            pts = row.get("dc_points")
            if pts is not None:
                p = np.asarray(pts, dtype=float).reshape(-1, 2)
                ax.scatter(p[:, 1], p[:, 0], s=14, color=DC_COLOR, edgecolors="black",
                           linewidths=0.4, label="DC sampling points", zorder=3)
            if row.get("centre") is not None:
                ax.plot([row["centre"][1]], [row["centre"][0]], marker="o", markersize=9,
                        markeredgewidth=1.5, markerfacecolor="none", markeredgecolor=MARK_COLOR,
                        linestyle="none", label="object centre")
            if img is not None:
                # Points outside the image read zero padding: widen the view to show
                # them, and outline the image so the padding reads as such.
                h_, w_ = img.shape[:2]
                _frame(ax, h_, w_, pts, "image edge")
            ax.set_ylabel(f"{row['label']}\ny (px)", fontsize=9)
            ax.set_xlabel("x (px)")
            if r == 0:
                ax.set_title("deformable conv: where the data is sampled", fontsize=9)
        if has_dk:
            ax = axes[r][c]
            k = int(row.get("kernel_size", 3))
            scope = row.get("scope")
            pts = row.get("dk_points")
            if scope is not None:
                s = np.abs(as_map(scope))
                scope_norm = Normalize(0, float(s.max()) or 1.0)
                ax.imshow(s / (s.max() or 1.0), cmap=KERNEL_CMAP, vmin=0, vmax=1,
                          interpolation="nearest")
                size = s.shape[0]
            else:
                size = int(np.ceil(np.asarray(pts).max())) + 1 if pts is not None else k
            rig = rigid_scope_positions(k, size)
            # White with a black rim: visible on both ends of the colour map.
            ax.scatter(rig[:, 1], rig[:, 0], s=34, facecolors=RIGID_COLOR, edgecolors="black",
                       linewidths=1.0, label="rigid taps (zero offset)", zorder=3)
            if pts is not None:
                p = np.asarray(pts, dtype=float).reshape(-1, 2)
                ax.scatter(p[:, 1], p[:, 0], s=28, color=DK_COLOR, edgecolors="black",
                           linewidths=0.5, label="DK samples", zorder=4)
                for (y0, x0), (y1, x1) in zip(rig, p):
                    ax.plot([x0, x1], [y0, y1], color=DK_COLOR, linewidth=0.8, zorder=3)
            # Samples can leave the scope (they then read zero weight): show them all,
            # with the scope's edge drawn.
            _frame(ax, size, size, pts, "scope edge (zero weight outside)")
            ax.set_xlabel("scope column")
            ax.set_ylabel("scope row" if has_dc else f"{row['label']}\nscope row", fontsize=9)
            if r == 0:
                ax.set_title(f"deformable kernel: samples in its {size}x{size} scope",
                             fontsize=9)
    # One legend for all panels, below them: inside, it would hide sampling points.
    handles, labels = [], []
    for ax in axes.ravel():
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in labels:
                handles.append(hd)
                labels.append(lb)
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7)
    if has_dk and scope_norm is not None:
        fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=KERNEL_CMAP),
                     ax=axes[:, -1].tolist(), shrink=0.8, label="|scope weight| / peak")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
