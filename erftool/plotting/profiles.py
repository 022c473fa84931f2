"""Radial ERF profiles and cumulative mass of several models on one plot."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ._style import as_map, color, marker, new_figure, short


def radial_profile(erf, centre: Sequence[float] | None = None):
    """Mean |ERF| per integer radius around `centre` and the cumulative mass fraction.

    Returns (radii, mean_profile, cumulative_fraction); radius r holds pixels whose
    distance rounds to r. The centre defaults to the map's centre of mass, so a DC/DK
    ERF that moved off the probed pixel is still profiled around where its mass is."""
    e = np.abs(as_map(erf))
    h, w = e.shape
    total = float(e.sum())
    if centre is None:
        if total > 0:
            yy, xx = np.indices(e.shape)
            centre = (float((yy * e).sum() / total), float((xx * e).sum() / total))
        else:
            centre = ((h - 1) / 2, (w - 1) / 2)
    yy, xx = np.indices(e.shape)
    r = np.rint(np.hypot(yy - centre[0], xx - centre[1])).astype(int)
    nbins = int(r.max()) + 1
    mass = np.bincount(r.ravel(), weights=e.ravel(), minlength=nbins)
    count = np.bincount(r.ravel(), minlength=nbins)
    mean = mass / np.maximum(count, 1)
    cum = np.cumsum(mass) / total if total > 0 else np.zeros(nbins)
    return np.arange(nbins), mean, cum


def mass_radius(cum: np.ndarray, fraction: float) -> float:
    """Smallest radius whose cumulative mass reaches `fraction` (nan if never)."""
    idx = np.nonzero(cum >= fraction)[0]
    return float(idx[0]) if idx.size else float("nan")


def profiles_figure(maps: Mapping[str, object], *,
                    centres: Mapping[str, Sequence[float]] | None = None,
                    rf_radius: Mapping[str, float] | None = None, title: str = ""):
    """Left: mean |ERF| against radius, each model scaled to its own peak.
    Right: fraction of total |ERF| mass within radius r, with 50% / 90% guides.
    Dotted verticals mark each model's theoretical RF half-width when given."""
    if not maps:
        raise ValueError("no ERF maps to plot")
    fig = new_figure(10.0, 4.0)
    ax_p, ax_c = fig.subplots(1, 2)
    for i, (name, m) in enumerate(maps.items()):
        r, mean, cum = radial_profile(m, (centres or {}).get(name))
        peak = mean.max()
        c = color(i)
        every = max(1, len(r) // 12)
        ax_p.plot(r, mean / peak if peak > 0 else mean, color=c, marker=marker(i),
                  markevery=every, markersize=4, label=short(name))
        r50 = mass_radius(cum, 0.5)
        note = f"r50={r50:.0f}px" if np.isfinite(r50) else "all-zero ERF"
        ax_c.plot(r, cum, color=c, marker=marker(i), markevery=every, markersize=4,
                  label=f"{short(name)} ({note})")
        if rf_radius and name in rf_radius:
            for ax in (ax_p, ax_c):
                ax.axvline(rf_radius[name], color=c, linestyle=":", linewidth=1)
    for frac in (0.5, 0.9):
        ax_c.axhline(frac, color="0.5", linestyle="--", linewidth=0.8)
        ax_c.text(0.99, frac, f"{frac:.0%}", transform=ax_c.get_yaxis_transform(),
                  ha="right", va="bottom", fontsize=7, color="0.35")
    ax_p.set_xlabel("distance from ERF centre of mass (px)")
    ax_p.set_ylabel("mean |ERF| / model's peak")
    ax_p.set_title("radial profile", fontsize=10)
    ax_p.set_ylim(bottom=0)
    ax_c.set_xlabel("radius r (px)")
    ax_c.set_ylabel("fraction of |ERF| mass within r")
    ax_c.set_title("cumulative mass", fontsize=10)
    ax_c.set_ylim(0, 1.02)
    for ax in (ax_p, ax_c):
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if rf_radius:
        ax_p.text(0.99, 0.97, "dotted: theoretical RF half-width", transform=ax_p.transAxes,
                  ha="right", va="top", fontsize=7, color="0.35")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
