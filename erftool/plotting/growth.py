"""ERF growth with depth for linear conv stacks: sigma ~ sqrt(n), theoretical RF ~ n."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ._style import color, marker, new_figure


def uniform_sigma(n, k: int = 3, dilation: int = 1) -> np.ndarray:
    """Per-axis std of the n-fold convolution of a uniform k-tap kernel: sqrt(n(k^2-1)/12)*d."""
    n = np.asarray(n, dtype=float)
    return dilation * np.sqrt(n * (k * k - 1) / 12.0)


def rf_size(n, k: int = 3, dilation: int = 1) -> np.ndarray:
    """Theoretical RF side of n stride-1 layers: n*d*(k-1)+1."""
    return np.asarray(n, dtype=float) * dilation * (k - 1) + 1


def growth_figure(depths: Sequence[int], measured: Mapping[str, Sequence[float]], *,
                  kernel_size: int = 3, title: str = ""):
    """Log-log plot of measured per-axis ERF sigma for each weight setting (points) over
    the theory curves sqrt(n(k^2-1)/12) and n(k-1)+1 (lines); right panel: sigma / RF,
    which falls as 1/sqrt(n)."""
    n = np.asarray(depths, dtype=float)
    if n.size == 0 or not measured:
        raise ValueError("no depths or measurements to plot")
    fine = np.geomspace(n.min(), n.max(), 100)
    fig = new_figure(10.0, 4.2)
    ax, ax_r = fig.subplots(1, 2)
    ax.plot(fine, uniform_sigma(fine, kernel_size), color="0.2", linewidth=1.5,
            label=r"theory $\sigma=\sqrt{n(k^2-1)/12}$")
    ax.plot(fine, rf_size(fine, kernel_size), color="0.2", linestyle="--", linewidth=1.5,
            label=r"theoretical RF $n(k-1)+1$")
    ax_r.plot(fine, uniform_sigma(fine, kernel_size) / rf_size(fine, kernel_size), color="0.2",
              linewidth=1.5, label="theory (uniform)")
    for i, (name, sig) in enumerate(measured.items()):
        s = np.asarray(sig, dtype=float)
        slope = np.polyfit(np.log(n), np.log(s), 1)[0] if n.size > 1 and (s > 0).all() else np.nan
        lab = f"measured, {name} (log-log slope {slope:.2f})"
        ax.scatter(n, s, color=color(i), marker=marker(i), s=36, zorder=3, label=lab)
        ax_r.scatter(n, s / rf_size(n, kernel_size), color=color(i), marker=marker(i), s=36,
                     zorder=3, label=f"measured, {name}")
    for a in (ax, ax_r):
        a.set_xscale("log")
        a.set_yscale("log")
        # Plain numbers at 1-2-5 steps read better than mixed 10^k / 2x10^k labels.
        for axis in (a.xaxis, a.yaxis):
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        a.set_xlabel("depth n (layers)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    ax.set_ylabel("size (px)")
    ax.set_title(f"ERF sigma vs theoretical RF, k={kernel_size}", fontsize=10)
    ax_r.set_ylabel(r"ERF $\sigma$ / theoretical RF")
    ax_r.set_title("relative ERF shrinks as 1/sqrt(n)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
