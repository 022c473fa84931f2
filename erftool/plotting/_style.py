"""Shared look of every erftool figure: colour maps, palette, saving.

Figures are built on `matplotlib.figure.Figure` directly (never pyplot), so no GUI
backend or global figure state is involved and plotting works headless and in threads.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

# Perceptually uniform, colour-blind-safe maps only.
HEAT_CMAP = "magma"        # ERF magnitudes (dark = no influence)
NORM_CMAP = "viridis"      # per-model normalised maps
KERNEL_CMAP = "cividis"    # kernel weights behind sampling points

# Okabe-Ito palette: distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

FORMATS = ("png", "pdf", "svg")
DPI = 150


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def new_figure(width: float, height: float) -> Figure:
    # constrained layout keeps titles, colour bars and tick labels from clipping.
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, path: str | os.PathLike, fmt: str = "png") -> Path:
    """Write `fig` to `path` with the extension replaced by `fmt`; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r} (choose from {', '.join(FORMATS)})")
    out = Path(path).with_suffix("." + fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata keeps PDF/SVG output byte-stable between runs (no creation date).
    meta = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None},
            "svg": {"Date": None}}[fmt]
    # A fixed hash salt makes SVG element ids repeatable too.
    with matplotlib.rc_context({"svg.hashsalt": "erftool"}):
        fig.savefig(out, format=fmt, dpi=DPI, metadata=meta)
    return out


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def short(text: str, limit: int = 28) -> str:
    """Keep long model/layer names from overflowing narrow panel titles."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_map(a) -> np.ndarray:
    """Any 2-D array-like (numpy, torch) -> float64 numpy with NaN/inf made 0."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    m = np.asarray(a, dtype=np.float64)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"an ERF map must be 2-D, got shape {m.shape}")
    return np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)


def as_image(img) -> np.ndarray:
    """(H,W), (H,W,C) or (C,H,W) in any range -> (H,W) or (H,W,3) floats in [0, 1]."""
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3):
        raise ValueError(f"an image must be (H,W), (H,W,C) or (C,H,W), got shape {a.shape}")
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    # Normalised datasets hold negative values; stretch for display only.
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.nan_to_num(a)
