"""ERF heatmaps: model comparison grids, image overlays, the paper's object-centre figure."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.patches import Rectangle

from ._style import HEAT_CMAP, NORM_CMAP, as_image, as_map, new_figure, short

Box = Sequence[float]  # (y0, x0, y1, x1) in pixels, end-exclusive
RF_COLOR = "#56B4E9"   # sky blue: visible on magma and on grey images
BOX_COLOR = "#E69F00"  # orange: object boxes
MARK_COLOR = "#00E5FF"


def _grid_shape(n: int, max_cols: int = 5) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _outline(ax, box: Box, color: str, style: str, label: str | None = None) -> None:
    y0, x0, y1, x1 = box
    # Pixel centres sit on integers, so pixel edges are at +-0.5.
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                           edgecolor=color, linestyle=style, linewidth=1.4, label=label))


def _mark(ax, pos, label: str | None = None) -> None:
    y, x = pos
    # An open ring: the pixel under it (often the ERF peak) stays visible.
    ax.plot([x], [y], marker="o", markersize=9, markeredgewidth=1.5, markerfacecolor="none",
            markeredgecolor=MARK_COLOR, linestyle="none", label=label)


def comparison_grid(maps: Mapping[str, object], *, mode: str = "shared", title: str = "",
                    positions: Mapping[str, Sequence[float]] | None = None,
                    rf_boxes: Mapping[str, Box] | None = None, log: bool = False):
    """One panel per model. mode="shared": one colour scale for all models, so magnitudes
    compare; mode="normalised": each map divided by its own peak, so shapes compare."""
    if mode not in ("shared", "normalised"):
        raise ValueError(f"mode must be 'shared' or 'normalised', got {mode!r}")
    if not maps:
        raise ValueError("no ERF maps to plot")
    names = list(maps)
    data = {k: np.abs(as_map(maps[k])) for k in names}
    peaks = {k: float(data[k].max()) for k in names}
    if mode == "normalised":
        data = {k: (data[k] / peaks[k] if peaks[k] > 0 else data[k]) for k in names}
        vmax = 1.0
        cbar_label = "|ERF| / model's own peak"
    else:
        vmax = max(peaks.values()) or 1.0
        cbar_label = "|ERF| (shared scale)"
    if log:
        positive = [d[d > 0].min() for d in data.values() if (d > 0).any()]
        vmin = max(min(positive) if positive else vmax * 1e-6, vmax * 1e-6)
        norm = LogNorm(vmin=vmin, vmax=vmax)
        cbar_label += ", log scale"
    else:
        norm = Normalize(vmin=0.0, vmax=vmax)

    rows, cols = _grid_shape(len(names))
    fig = new_figure(3.0 * cols + 1.0, 3.0 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = colormaps[HEAT_CMAP if mode == "shared" else NORM_CMAP]
    for i, (ax, name) in enumerate(zip(axes, names)):
        d = data[name]
        shown = np.where(d > 0, d, np.nan) if log else d
        ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
        sub = f"peak {peaks[name]:.3g}"
        if mode == "shared" and peaks[name] > 0:
            sub += f" ({100 * peaks[name] / vmax:.0f}% of max)"
        ax.set_title(f"{short(name)}\n{sub}", fontsize=9)
        if peaks[name] == 0:
            ax.text(0.5, 0.9, "all-zero ERF", transform=ax.transAxes, ha="center",
                    va="top", color="white", fontsize=10)
        if rf_boxes and name in rf_boxes:
            _outline(ax, rf_boxes[name], RF_COLOR, "--")
        if positions and name in positions:
            _mark(ax, positions[name])
        ax.set_xlim(-0.5, d.shape[1] - 0.5)
        ax.set_ylim(d.shape[0] - 0.5, -0.5)
        if i % cols == 0:
            ax.set_ylabel("y (px)")
        if i // cols == rows - 1 or i + cols >= len(names):
            ax.set_xlabel("x (px)")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[: len(names)].tolist(),
                 shrink=0.85, label=cbar_label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _overlay_rgba(erf: np.ndarray, cmap_name: str = HEAT_CMAP,
                  percentile: float | None = None) -> np.ndarray:
    """ERF as RGBA whose opacity follows its value, so the image shows where ERF is ~0.
    With `percentile`, values are scaled to that percentile and clipped, so a few hot
    pixels of a single-image ERF do not wash out the rest."""
    peak = float(erf.max()) if percentile is None else float(np.percentile(erf, percentile))
    if peak <= 0:
        peak = float(erf.max())
    v = np.clip(erf / peak, 0, 1) if peak > 0 else erf
    rgba = colormaps[cmap_name](v)
    rgba[..., 3] = np.clip(np.sqrt(v) * 0.9, 0.0, 0.9)
    return rgba


def _show_image(ax, image, alpha: float = 1.0, grey: bool = False) -> None:
    img = as_image(image)
    if grey and img.ndim == 3:
        img = img.mean(axis=2)
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, alpha=alpha, interpolation="nearest")
    else:
        ax.imshow(img, alpha=alpha, interpolation="nearest")


def overlay(image, erf, *, positions: Sequence[Sequence[float]] = (),
            rf_boxes: Sequence[Box] = (), title: str = "",
            cbar_label: str = "|ERF| (opacity follows value)",
            marker_label: str = "probed unit"):
    """One image (in grey, so only the ERF carries colour) with its ERF on top
    (opacity = ERF value) and theoretical RFs outlined."""
    e = np.abs(as_map(erf))
    img = as_image(image)
    if img.shape[:2] != e.shape:
        raise ValueError(f"image {img.shape[:2]} and ERF {e.shape} sizes differ")
    fig = new_figure(5.4, 4.6)
    ax = fig.subplots()
    _show_image(ax, img, alpha=0.7, grey=True)
    ax.imshow(_overlay_rgba(e), interpolation="nearest")
    for j, box in enumerate(rf_boxes):
        _outline(ax, box, RF_COLOR, "--", "theoretical RF" if j == 0 else None)
    for j, pos in enumerate(positions):
        _mark(ax, pos, marker_label if j == 0 else None)
    ax.set_xlim(-0.5, e.shape[1] - 0.5)
    ax.set_ylim(e.shape[0] - 0.5, -0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    if rf_boxes or positions:
        ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    peak = float(e.max())
    fig.colorbar(ScalarMappable(norm=Normalize(0, peak or 1.0), cmap=HEAT_CMAP), ax=ax,
                 label=cbar_label)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def object_centre_comparison(rows: Sequence[Mapping], models: Sequence[str], *,
                             title: str = "", percentile: float = 99.5):
    """The paper's ERF figure: rows = images (e.g. small / large object), columns = models.

    Each row is a mapping with "label", "image", "maps" {model: ERF}, and optionally
    "centre" (y, x) and "box" (y0, x0, y1, x1). Each panel is scaled to its own
    `percentile` (clipped above), as the paper shows where each network looks, not how
    strongly; single-image ERFs have a few extreme pixels that a max would let dominate."""
    if not rows or not models:
        raise ValueError("need at least one image row and one model")
    nr, nc = len(rows), len(models)
    fig = new_figure(2.5 * nc + 1.6, 2.5 * nr + 0.8)
    axes = fig.subplots(nr, nc, squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(models):
            ax = axes[r][c]
            e = np.abs(as_map(row["maps"][name]))
            # Faint image: the object stays recognisable without competing with the ERF.
            _show_image(ax, row["image"], alpha=0.4, grey=True)
            ax.imshow(_overlay_rgba(e, percentile=percentile), interpolation="nearest")
            if row.get("box") is not None:
                _outline(ax, row["box"], BOX_COLOR, "-")
            if row.get("centre") is not None:
                _mark(ax, row["centre"])
            if e.max() == 0:
                ax.text(0.5, 0.9, "all-zero ERF", transform=ax.transAxes, ha="center",
                        va="top", color="black", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(short(name, 22), fontsize=10)
            if c == 0:
                ax.set_ylabel(row["label"], fontsize=9)
    fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=HEAT_CMAP), ax=axes.ravel().tolist(),
                 shrink=0.8, label=f"|ERF| / panel's {percentile:g}th percentile (clipped at 1)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
