"""Operator speed: each op's time next to conv2d's, per benchmark case."""
from __future__ import annotations

from typing import Mapping

import numpy as np

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
                 title: str = "", ratios: Mapping[str, Cases] | None = None):
    """One panel per pass (e.g. "forward", "forward + backward"); in each, one bar group
    per case. Bars show time as a multiple of the baseline's time in the same case, on a
    linear axis from 0 (a dotted line marks 1x), each labelled with the absolute time.
    Where `ratios` (same nesting as panels) holds a measured ratio for an op -- the
    median of per-repeat ratios, which a noisy machine distorts less than a ratio of
    medians -- the bar shows that instead, labelled "paired". Ops keep one colour
    across panels."""
    if not panels or not any(panels.values()):
        raise ValueError("no benchmark cases to plot")
    ops = _ops(panels, baseline)
    n_cases = max(len(c) for c in panels.values())
    h = 0.8 / len(ops)
    fig = new_figure(5.0 * len(panels) + 1.4, 1.4 + 0.24 * len(ops) * n_cases)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    for k, (ax, (ptitle, cases)) in enumerate(zip(axes, panels.items())):
        labels = list(cases)
        top = 1.0
        for j, op in enumerate(ops):
            ys = np.arange(len(labels)) + j * h
            for y, c in zip(ys, labels):
                v, base = cases[c].get(op), cases[c].get(baseline)
                if v is None or not base or not np.isfinite(v):
                    continue
                paired = ((ratios or {}).get(ptitle) or {}).get(c, {}).get(op)
                ratio = paired if paired is not None and op != baseline else v / base
                top = max(top, ratio)
                ax.barh(y, ratio, height=h * 0.9, color=color(j),
                        label=op if y == ys[0] or c == labels[0] else None)
                shown = f"{v:.0f}" if v >= 100 else f"{v:.3g}"
                kind = " paired" if paired is not None and op != baseline else ""
                ax.text(ratio, y, f" {ratio:.1f}x{kind} ({shown} {unit})", va="center",
                        fontsize=6)
        ax.axvline(1.0, color="0.3", linestyle=":", linewidth=1)
        ax.set_yticks(np.arange(len(labels)) + 0.4 - h / 2, labels if k == 0 else
                      [""] * len(labels), fontsize=7)
        ax.set_ylim(len(labels) - 0.2 + h / 2, -h)
        # Room on the right for the labels of the longest bars.
        ax.set_xlim(0, top * 1.45)
        ax.set_xlabel(f"time / {baseline} time (same shape)")
        ax.grid(alpha=0.3, axis="x")
        ax.set_title(ptitle, fontsize=9)
    handles, names = [], []
    for ax in axes:  # one legend entry per op, in bar order
        for hd, nm in zip(*ax.get_legend_handles_labels()):
            if nm not in names:
                handles.append(hd)
                names.append(nm)
    order = [names.index(o) for o in ops if o in names]
    # Outside the axes, so it never hides bars.
    fig.legend([handles[i] for i in order], [names[i] for i in order],
               loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
