"""Closed forms for linear (rigid) convolution stacks, independent of autograd.

Cross-correlation layers O_j = sum_k W_k I_{j - p + d k} compose as
(I * a) * b = I * (a (x) b) with the full convolution
(a (x) b)_m = sum_{k + l = m} a_k b_l (channels: matrix products per tap),
so an n-layer stride-1 stack has the single kernel T = W_1 (x) ... (x) W_n
(dilated kernels zero-stuffed) and its ERF at output j is T placed at j - sum p.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.polynomial import polynomial as P


def dilate(weight: np.ndarray, d: int) -> np.ndarray:
    """Zero-stuffed kernel (O, I, d(K_h-1)+1, d(K_w-1)+1)."""
    o, i, kh, kw = weight.shape
    out = np.zeros((o, i, d * (kh - 1) + 1, d * (kw - 1) + 1))
    out[:, :, ::d, ::d] = weight
    return out


def compose_kernels(weights: Sequence[np.ndarray], dilations: Sequence[int] = None) -> np.ndarray:
    """T (O_n, I_1, ., .) of a stride-1 stack: layer 1 first. Explicit tap loops."""
    dilations = dilations or [1] * len(weights)
    total = dilate(np.asarray(weights[0], np.float64), dilations[0])
    for w, d in zip(weights[1:], dilations[1:]):
        wd = dilate(np.asarray(w, np.float64), d)
        o, _, kh, kw = wd.shape
        th, tw = total.shape[2:]
        new = np.zeros((o, total.shape[1], th + kh - 1, tw + kw - 1))
        for a in range(kh):
            for b in range(kw):
                # path: first the earlier layers (offset m), then this tap (a, b)
                new[:, :, a:a + th, b:b + tw] += np.einsum("om,mihw->oihw", wd[:, :, a, b], total)
        total = new
    return total


def multinomial(k: int, n: int) -> np.ndarray:
    """Coefficients of (1 + z + ... + z^{k-1})^n: the 1-D all-ones ERF."""
    return P.polypow(np.ones(k), n)


def ones_erf(k: int, n: int, d: int = 1) -> np.ndarray:
    """2-D ERF of n all-ones k x k single-channel layers with dilation d:
    the outer product of the 1-D multinomial coefficients (zero-stuffed by d)."""
    c = multinomial(k, n)
    line = np.zeros(d * (len(c) - 1) + 1)
    line[::d] = c
    return np.outer(line, line)


def ones_variance(k: int, n: int, d: int = 1) -> float:
    """Per-axis variance of the all-ones ERF: d^2 n (k^2 - 1) / 12
    (sum of n i.i.d. discrete uniforms on {0, d, ..., d(k-1)})."""
    return d * d * n * (k * k - 1) / 12.0


def rf_size(kernels: Sequence[int], strides: Sequence[int] = None,
            dilations: Sequence[int] = None) -> int:
    """Theoretical RF r = 1 + sum_l (k_l - 1) d_l prod_{m<l} s_m (Araujo et al. 2019)."""
    n = len(kernels)
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    r, jump = 1, 1
    for k, s, d in zip(kernels, strides, dilations):
        r += (k - 1) * d * jump
        jump *= s
    return r
