"""Operator speed: each op's time next to conv2d's, per benchmark case."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ._style import color, new_figure

Cases = Mapping[str, Mapping[str, float]]  # case label (shape) -> {op label: time}


def _ops(panels: Mapping[str, Cases], baseline: str) -> list[str]:
    ops: list[str] = []
    for cases in panels.values():
        for times in cases.values():
            ops += [op for op in times if op not in ops]
    # Baseline first so it is the top bar of every group.
    return sorted(ops, key=lambda o: o != baseline)


def speed_figure(panels: Mapping[str, Cases], *, baseline: str = "conv2d", unit: str = "ms",
                 title: str = ""):
    """One panel per pass (e.g. "forward", "forward + backward"); in each, one bar group
    per case on a log axis, each bar annotated with its multiple of the baseline's time
    in the same case. Ops keep one colour across panels."""
    if not panels or not any(panels.values()):
        raise ValueError("no benchmark cases to plot")
    ops = _ops(panels, baseline)
    n_cases = max(len(c) for c in panels.values())
    h = 0.8 / len(ops)
    fig = new_figure(5.0 * len(panels) + 1.2, 1.3 + 0.22 * len(ops) * n_cases)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=False, squeeze=False)).ravel()
    for k, (ax, (ptitle, cases)) in enumerate(zip(axes, panels.items())):
        labels = list(cases)
        for j, op in enumerate(ops):
            ys = np.arange(len(labels)) + j * h
            vals = np.array([cases[c].get(op, np.nan) for c in labels], dtype=float)
            ax.barh(ys, vals, height=h * 0.9, color=color(j), label=op)
            for y, c, v in zip(ys, labels, vals):
                base = cases[c].get(baseline)
                if np.isfinite(v) and base and op != baseline:
                    ax.text(v, y, f" {v / base:.1f}x", va="center", fontsize=6)
        ax.set_yticks(np.arange(len(labels)) + 0.4 - h / 2, labels if k == 0 else
                      [""] * len(labels), fontsize=7)
        ax.set_ylim(len(labels) - 0.1, -0.2)
        ax.set_xscale("log")
        # Plain numbers on decades only: minor labels collide on short log ranges.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"time per call ({unit}, log scale)")
        ax.grid(alpha=0.3, axis="x", which="both")
        ax.set_title(f"{ptitle} (labels: multiple of {baseline})", fontsize=9)
        # Room on the right for the ratio labels of the longest bars.
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * 2.2)
    handles, labels = axes[0].get_legend_handles_labels()
    # Outside the axes, so it never hides bars.
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
