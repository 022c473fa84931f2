"""ERFs of linear / gated networks as explicit path sums (numpy, no autograd).

For output unit j of layer n, R(i; j) = dO_j / dI_i is the sum over all paths
from j down to input cell i of the product of the weights met on the way. We
evaluate it by dynamic programming from the top: a "path weight" map G over
each layer's output (G = one-hot at j on the probed channels) is pushed down
through every tap of every layer:

* rigid:  tap k of output j sends W_k^T G_j to the integer cell j s - p + d k;
* DC:     the tap's location is shifted, j s - p + d k + dj_k, and the mass is
          split over the 4 neighbouring cells with the explicit bilinear
          coefficients hat(y - u) hat(x - v)  ->  R_DC(i; j) = sum_k R(i; j + k + dj_k, k);
* DK:     the location is rigid but the kernel value is resampled,
          W(k + dk) = sum_cells hat * W_scope  ->  R_DK(i; j) = sum_k R(i; j + k, k + dk);
* ReLU:   G is multiplied by the activation pattern 1[pre-activation > 0] of
          the given input (the gate of every path through that unit).

Single image, groups = 1, one offset group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .bilinear import corners, scope_taps


@dataclass
class Layer:
    """One layer of a theory network (numpy, float64).

    kind: "rigid" | "dc" | "dk".
    weight: rigid/dc (O, I, K_h, K_w); dk: the scope (O, I, S_h, S_w).
    kernel_size: (K_h, K_w) (defaults to the weight's for rigid/dc).
    offset: dc: data offsets (2 K_h K_w, H_o, W_o) torchvision layout;
        dk: kernel offsets, local (2 K_h K_w, H_o, W_o) or global (2 K_h K_w,).
    data_offset: dk only, optional data offsets (DK + DC).
    mask: dc only, optional DCNv2 modulation (K_h K_w, H_o, W_o).
    relu: a ReLU follows the layer.
    """

    kind: str
    weight: np.ndarray
    kernel_size: Optional[Tuple[int, int]] = None
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    offset: Optional[np.ndarray] = None
    data_offset: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    relu: bool = False

    def __post_init__(self):
        if self.kernel_size is None:
            self.kernel_size = tuple(self.weight.shape[2:])

    def out_size(self, h: int, w: int) -> Tuple[int, int]:
        kh, kw = self.kernel_size
        s, p, d = self.stride, self.padding, self.dilation
        return ((h + 2 * p - d * (kh - 1) - 1) // s + 1, (w + 2 * p - d * (kw - 1) - 1) // s + 1)


def sizes(layers: Sequence[Layer], h: int, w: int) -> List[Tuple[int, int]]:
    """Map sizes [input, after layer 1, ..., after layer n]."""
    out = [(h, w)]
    for layer in layers:
        out.append(layer.out_size(*out[-1]))
    return out


def _tap_kernels(layer: Layer, t: int, ho: int, wo: int) -> np.ndarray:
    """Kernel values used by tap t: (O, I) or, for local DK, (O, I, H_o, W_o)."""
    kh, kw = layer.kernel_size
    if layer.kind in ("rigid", "dc"):
        return layer.weight[:, :, t // kw, t % kw]
    o, i, sh, sw = layer.weight.shape
    scope = layer.weight.reshape(o, i, sh * sw)
    off = np.asarray(layer.offset, np.float64)
    if off.ndim == 1:  # global: one resampled kernel for every location
        coef = scope_taps((kh, kw), (sh, sw), off.reshape(kh * kw, 2))[t]  # (S2,)
        return scope @ coef
    pairs = off.reshape(kh * kw, 2, ho, wo).transpose(2, 3, 0, 1)  # (H_o, W_o, K, 2)
    coef = scope_taps((kh, kw), (sh, sw), pairs)[:, :, t]  # (H_o, W_o, S2)
    return np.einsum("ois,hws->oihw", scope, coef)


def backward_layer(layer: Layer, g_out: np.ndarray, in_size: Tuple[int, int]) -> np.ndarray:
    """Push path weights G (O, H_o, W_o) through one layer -> (I, H, W)."""
    o, ho, wo = g_out.shape
    h, w = in_size
    kh, kw = layer.kernel_size
    n_in = layer.weight.shape[1]
    g_in = np.zeros((n_in, h, w))
    base_y = (np.arange(ho) * layer.stride - layer.padding)[:, None] * np.ones((1, wo))
    base_x = (np.arange(wo) * layer.stride - layer.padding)[None, :] * np.ones((ho, 1))
    data_off = layer.offset if layer.kind == "dc" else layer.data_offset
    for t in range(kh * kw):
        a, b = divmod(t, kw)
        k = _tap_kernels(layer, t, ho, wo)
        contrib = np.einsum("oi,ohw->ihw", k, g_out) if k.ndim == 2 else \
            np.einsum("oihw,ohw->ihw", k, g_out)
        if layer.mask is not None:
            contrib = contrib * layer.mask[t]
        y = base_y + layer.dilation * a
        x = base_x + layer.dilation * b
        if data_off is not None:
            y = y + data_off[2 * t]
            x = x + data_off[2 * t + 1]
        for r, c, wt, valid in corners(y, x, h, w):
            np.add.at(g_in, (slice(None), r[valid], c[valid]), contrib[:, valid] * wt[valid])
    return g_in


def path_sum_erf(layers: Sequence[Layer], input_size: Tuple[int, int], position,
                 channels=None, gates: Optional[Sequence[Optional[np.ndarray]]] = None
                 ) -> np.ndarray:
    """R(i; j) summed over the probed channels: (I_1, H, W) per input channel.

    position: (y, x) on the last layer's map; channels: last-layer channels
    (default all); gates[l]: 0/1 activation pattern (O_l, H_l, W_l) applied to
    layer l's output (None = linear)."""
    dims = sizes(layers, *input_size)
    n_out = layers[-1].weight.shape[0]
    g = np.zeros((n_out,) + dims[-1])
    chans = range(n_out) if channels is None else channels
    for c in chans:
        g[c, position[0], position[1]] = 1.0
    for idx in range(len(layers) - 1, -1, -1):
        if gates is not None and gates[idx] is not None:
            g = g * gates[idx]
        g = backward_layer(layers[idx], g, dims[idx])
    return g
