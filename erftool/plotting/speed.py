"""Operator speed: each op's time next to conv2d's, per benchmark case."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._style import color, new_figure


def speed_figure(cases: Mapping[str, Mapping[str, float]], *, baseline: str = "conv2d",
                 unit: str = "ms", title: str = ""):
    """`cases` maps a case label (shape, pass) -> {op label: time}. Bars on a log axis,
    each annotated with its multiple of the baseline's time in the same case."""
    if not cases:
        raise ValueError("no benchmark cases to plot")
    ops: list[str] = []
    for times in cases.values():
        for op in times:
            if op not in ops:
                ops.append(op)
    # Baseline first so it is the top bar of every group.
    ops.sort(key=lambda o: (o != baseline,))
    labels = list(cases)
    h = 0.8 / len(ops)
    fig = new_figure(7.5, 1.0 + 0.28 * len(ops) * len(labels) + 0.4)
    ax = fig.subplots()
    for j, op in enumerate(ops):
        ys = np.arange(len(labels)) + j * h
        vals = [cases[c].get(op, np.nan) for c in labels]
        ax.barh(ys, vals, height=h * 0.9, color=color(j), label=op)
        for y, c, v in zip(ys, labels, vals):
            base = cases[c].get(baseline)
            if np.isfinite(v) and base and op != baseline:
                ax.text(v, y, f" {v / base:.1f}x", va="center", fontsize=6)
    ax.set_yticks(np.arange(len(labels)) + 0.4 - h / 2, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"time per call ({unit}, log scale; labels: multiple of {baseline})")
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    return fig
