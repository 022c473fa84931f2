"""Explicit bilinear coefficients (numpy), written from the definition.

A sample at real position (y, x) of a zero-padded H x W grid reads cell (u, v)
with weight  hat(y - u) * hat(x - v),  hat(z) = max(0, 1 - |z|).
Cells outside the grid simply do not exist (weight 0), which is DCN's rule
(samples with y <= -1 or y >= H are zero) and the DK scope's rule.
"""
from __future__ import annotations

import numpy as np


def hat(z):
    """Triangle (linear B-spline) kernel max(0, 1 - |z|)."""
    return np.maximum(0.0, 1.0 - np.abs(z))


def grid_coefficients(y, x, height: int, width: int) -> np.ndarray:
    """Dense weights (..., height*width) with which samples (y, x) (any shape)
    read the cells of a zero-padded grid."""
    y = np.asarray(y, dtype=np.float64)[..., None, None]
    x = np.asarray(x, dtype=np.float64)[..., None, None]
    u = np.arange(height, dtype=np.float64)[:, None]
    v = np.arange(width, dtype=np.float64)[None, :]
    coef = hat(y - u) * hat(x - v)
    return coef.reshape(coef.shape[:-2] + (height * width,))


def corners(y, x, height: int, width: int):
    """The (<= 4) non-zero cells of each sample: list of (row, col, weight, valid)
    arrays shaped like y. Equivalent to grid_coefficients, but sparse."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y0, x0 = np.floor(y), np.floor(x)
    out = []
    for dy in (0, 1):
        for dx in (0, 1):
            r, c = y0 + dy, x0 + dx
            w = hat(y - r) * hat(x - c)
            valid = (r >= 0) & (r < height) & (c >= 0) & (c < width) & (w != 0)
            out.append((r.astype(np.int64), c.astype(np.int64), w, valid))
    return out


def scope_taps(kernel_size, scope, offsets) -> np.ndarray:
    """DK kernel-space coefficients: offsets (..., K_h*K_w, 2) (drow, dcol) ->
    (..., K_h*K_w, S_h*S_w). Tap (a, b) samples scope position
    (a + (S_h - K_h)/2 + drow, b + (S_w - K_w)/2 + dcol)."""
    kh, kw = kernel_size
    sh, sw = scope
    off = np.asarray(offsets, dtype=np.float64)
    a = np.repeat(np.arange(kh), kw).astype(np.float64)
    b = np.tile(np.arange(kw), kh).astype(np.float64)
    y = a + (sh - kh) / 2 + off[..., 0]
    x = b + (sw - kw) / 2 + off[..., 1]
    return grid_coefficients(y, x, sh, sw)


def resample_scope(weight, kernel_size, offsets) -> np.ndarray:
    """Global DK kernel: scope weight (O, I, S_h, S_w), offsets (K_h*K_w, 2) ->
    the rigid kernel (O, I, K_h, K_w) with W'[a, b] = sum_cells coef * W."""
    o, i, sh, sw = weight.shape
    coef = scope_taps(kernel_size, (sh, sw), offsets)  # (K, S2)
    k = np.einsum("ois,ts->oit", weight.reshape(o, i, sh * sw), coef)
    return k.reshape(o, i, kernel_size[0], kernel_size[1])
