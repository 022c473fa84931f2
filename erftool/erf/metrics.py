"""Scalar summaries of an ERF map M (H x W).

Unless stated otherwise a metric treats the map as a mass distribution with
weights w = M when M >= 0 everywhere and w = |M| otherwise (signed maps); the
"mass" is S = sum_yx w[y, x]. Coordinates are (row y, column x) in pixels.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

REPLKNET_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def _weights(m) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"metrics: expected a 2-D map, got shape {m.shape}")
    return np.abs(m) if np.any(m < 0) else m


def total_mass(m) -> float:
    """S = sum_yx M[y, x]  (the signed sum; for maps with negative values
    compare with sum |M| to see the cancellation)."""
    return float(np.asarray(m, dtype=np.float64).sum())


def centroid(m):
    """Centre of mass (ybar, xbar) = (sum y w / S, sum x w / S); (nan, nan) if S = 0."""
    w = _weights(m)
    s = w.sum()
    if s <= 0:
        return (math.nan, math.nan)
    ys, xs = np.indices(w.shape)
    return (float((ys * w).sum() / s), float((xs * w).sum() / s))


def axis_std(m):
    """Per-axis standard deviation (sigma_y, sigma_x),
    sigma_y^2 = sum (y - ybar)^2 w / S (likewise x)."""
    w = _weights(m)
    s = w.sum()
    if s <= 0:
        return (math.nan, math.nan)
    yb, xb = centroid(w)
    ys, xs = np.indices(w.shape)
    return (float(math.sqrt(((ys - yb) ** 2 * w).sum() / s)),
            float(math.sqrt(((xs - xb) ** 2 * w).sum() / s)))


@dataclass
class GaussianFit:
    """2-D Gaussian  A exp(-1/2 r^T R(theta) diag(sigma_y^-2, sigma_x^-2) R(theta)^T r) + c,
    r = (y - y0, x - x0); theta is the rotation (radians) of the sigma_y axis
    away from the row axis. `success` is False when the least-squares fit did
    not converge (the other fields then hold the moment estimates)."""

    sigma_y: float
    sigma_x: float
    theta: float
    y0: float
    x0: float
    amplitude: float
    offset: float
    success: bool


def _gauss(coords, amp, y0, x0, sy, sx, theta, off):
    y, x = coords
    c, s = math.cos(theta), math.sin(theta)
    dy, dx = y - y0, x - x0
    u = c * dy + s * dx    # along the sigma_y axis
    v = -s * dy + c * dx   # along the sigma_x axis
    return amp * np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2)) + off


def gaussian_fit(m, max_side: int = 256) -> GaussianFit:
    """Least-squares fit (scipy.optimize.curve_fit) of the 2-D Gaussian of
    `GaussianFit` to w, started from the moments. Maps larger than `max_side`
    are block-averaged first (sizes are scaled back to pixels)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    w = _weights(m)
    factor = max(1, int(math.ceil(max(w.shape) / max_side)))
    if factor > 1:
        h, wd = (w.shape[0] // factor) * factor, (w.shape[1] // factor) * factor
        w = w[:h, :wd].reshape(h // factor, factor, wd // factor, factor).mean(axis=(1, 3))
    yb, xb = centroid(w)
    sy, sx = axis_std(w)
    if not np.isfinite([yb, xb, sy, sx]).all():
        return GaussianFit(*(math.nan,) * 7, success=False)
    guess = [float(w.max()), yb, xb, max(sy, 0.3), max(sx, 0.3), 0.0, 0.0]
    ys, xs = np.indices(w.shape)
    coords = (ys.ravel().astype(np.float64), xs.ravel().astype(np.float64))
    try:
        with warnings.catch_warnings():
            # a perfect fit has no covariance estimate; irrelevant here
            warnings.simplefilter("ignore", OptimizeWarning)
            p, _ = curve_fit(_gauss, coords, w.ravel(), p0=guess, maxfev=4000)
        amp, y0, x0, s_y, s_x, th, off = p
        s_y, s_x = abs(s_y), abs(s_x)
        ok = bool(np.isfinite(p).all())
    except (RuntimeError, ValueError, TypeError):
        amp, y0, x0, s_y, s_x, th, off = guess
        ok = False
    # Report theta in [-pi/2, pi/2) for a unique answer.
    th = (th + math.pi / 2) % math.pi - math.pi / 2
    f = factor
    return GaussianFit(float(s_y * f), float(s_x * f), float(th), float(y0 * f + (f - 1) / 2),
                       float(x0 * f + (f - 1) / 2), float(amp), float(off), ok)


@dataclass
class AreaRatio:
    """RepLKNet's high-contribution area ratio at threshold t: the smallest
    centred square of odd side 2i+1 (i = 1 .. H//2 - 1, centred at (H//2, W//2))
    whose sum exceeds t * (total sum); ratio = side^2 / (H * W).
    When no such square exists (t never reached) `reached` is False and
    side/ratio are None/nan instead of RepLKNet's crash."""

    threshold: float
    side: Optional[int]
    ratio: float
    reached: bool


def replknet_area_ratio(m, t: float, log_scale: bool = True) -> AreaRatio:
    """r(t) exactly as RepLKNet's erf/analyze_erf.py computes it.

    log_scale=True (RepLKNet): the map is first transformed
    D = log10(w + 1) / max(log10(w + 1)); log_scale=False: D = w (raw map).
    Then the first i in 1 .. H//2 - 1 with
        sum D[H//2 - i : H//2 + i + 1, W//2 - i : W//2 + i + 1] / sum D > t
    gives side 2i + 1 and ratio (2i+1)/H * (2i+1)/W."""
    d = _weights(m)
    h, w = d.shape
    if log_scale:
        d = np.log10(d + 1.0)
        peak = d.max()
        if peak > 0:
            d = d / peak
    total = d.sum()
    if total > 0 and np.isfinite(total):
        for i in range(1, h // 2):
            area = d[h // 2 - i:h // 2 + i + 1, w // 2 - i:w // 2 + i + 1].sum()
            if area / total > t:
                side = 2 * i + 1
                return AreaRatio(float(t), side, side / h * side / w, True)
    return AreaRatio(float(t), None, math.nan, False)


def area_ratios(m, thresholds: Sequence[float] = REPLKNET_THRESHOLDS, log_scale=True):
    """{t: AreaRatio} for RepLKNet's thresholds (0.2, 0.3, 0.5, 0.99)."""
    return {float(t): replknet_area_ratio(m, t, log_scale) for t in thresholds}


def effective_area(m, mass: float = 0.95):
    """(pixels, fraction of H*W): the fewest pixels holding `mass` of S,
    i.e. the smallest n with sum of the n largest w >= mass * S.
    (nan, nan) when S = 0."""
    w = np.sort(_weights(m).ravel())[::-1]
    s = w.sum()
    if s <= 0:
        return (math.nan, math.nan)
    n = int(np.searchsorted(np.cumsum(w), mass * s * (1 - 1e-12)) + 1)
    n = min(n, w.size)
    return (n, n / w.size)


def rf_size(box) -> Optional[tuple]:
    """(height, width) of an inclusive box (y0, x0, y1, x1); None if missing."""
    if box is None or np.any(np.asarray(box) < 0):
        return None
    y0, x0, y1, x1 = (int(v) for v in box)
    return (y1 - y0 + 1, x1 - x0 + 1)


def std_to_rf_ratio(m, box):
    """(sigma_y / RF_h, sigma_x / RF_w): how much of the theoretical RF the ERF
    uses (Luo et al.: shrinks like 1/sqrt(n) for n conv layers)."""
    size = rf_size(box)
    if size is None:
        return (math.nan, math.nan)
    sy, sx = axis_std(m)
    return (sy / size[0], sx / size[1])


def radial_profile(m, centre=None, max_radius: Optional[float] = None):
    """Radial and cumulative mass profile around `centre` (default: the centroid).

    Pixel (y, x) falls in ring r = round(sqrt((y-cy)^2 + (x-cx)^2)).
    Returns dict(radius=r (0..R), ring_mass = sum of w in ring r,
    ring_mean = ring_mass / pixels in ring, cumulative = sum_{r' <= r} ring_mass / S)."""
    w = _weights(m)
    cy, cx = centroid(w) if centre is None else centre
    if not np.isfinite([cy, cx]).all():
        cy, cx = (w.shape[0] - 1) / 2, (w.shape[1] - 1) / 2
    ys, xs = np.indices(w.shape)
    r = np.rint(np.hypot(ys - cy, xs - cx)).astype(np.int64).ravel()
    n_r = int(r.max()) + 1 if max_radius is None else int(max_radius) + 1
    keep = r < n_r
    ring = np.bincount(r[keep], weights=w.ravel()[keep], minlength=n_r)[:n_r]
    count = np.bincount(r[keep], minlength=n_r)[:n_r]
    s = w.sum()
    cum = np.cumsum(ring) / s if s > 0 else np.full(n_r, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, ring / np.maximum(count, 1), 0.0)
    return {"radius": np.arange(n_r), "ring_mass": ring, "ring_mean": mean, "cumulative": cum}


def summary(m, rf_box=None, fit: bool = True) -> Dict:
    """All metrics of one map as a JSON-friendly dict."""
    out: Dict = {"total_mass": total_mass(m), "abs_mass": float(np.abs(m).sum())}
    out["centroid"] = list(centroid(m))
    out["std"] = list(axis_std(m))
    if fit:
        out["gaussian"] = asdict(gaussian_fit(m))
    for key, log in (("area_ratio_log", True), ("area_ratio_raw", False)):
        out[key] = {str(t): asdict(r) for t, r in area_ratios(m, log_scale=log).items()}
    pixels, frac = effective_area(m)
    out["effective_area_95"] = {"pixels": pixels, "fraction": frac}
    out["rf_size"] = list(rf_size(rf_box)) if rf_size(rf_box) else None
    out["std_to_rf"] = list(std_to_rf_ratio(m, rf_box))
    return out
