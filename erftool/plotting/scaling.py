"""ERF size against object scale, one series per model, with the correlation."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ._style import color, marker, new_figure, short


def correlation(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """(Pearson r, slope, intercept) of the least-squares line; nan when undefined."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else float("nan")
    return r, float(slope), float(intercept)


def scaling_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                   size_label: str = "ERF size (px)", scale_label: str = "object size (px)",
                   title: str = ""):
    """`series` maps model name -> (object scales, ERF sizes measured at those objects)."""
    if not series:
        raise ValueError("no ERF-size series to plot")
    fig = new_figure(6.4, 5.2)
    ax = fig.subplots()
    xs_all = []
    for i, (name, (xs, ys)) in enumerate(series.items()):
        xs = np.asarray(xs, dtype=float)
        ys = np.asarray(ys, dtype=float)
        xs_all.append(xs)
        r, slope, icpt = correlation(xs, ys)
        label = f"{short(name)}: r={r:+.2f}, slope={slope:.2f}" if np.isfinite(r) else short(name)
        ax.scatter(xs, ys, color=color(i), marker=marker(i), s=22, alpha=0.75, label=label,
                   edgecolors="none")
        if np.isfinite(slope):
            grid = np.linspace(np.nanmin(xs), np.nanmax(xs), 50)
            ax.plot(grid, slope * grid + icpt, color=color(i), linewidth=1.4)
    ax.set_xlabel(scale_label)
    ax.set_ylabel(size_label)
    ax.grid(alpha=0.3)
    # Below the axes: with many points any inside corner hides some.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2,
               fontsize=7, title="Pearson r, least-squares slope", title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig
