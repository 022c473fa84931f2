"""A direct, loop-per-output transcription of the operator definitions.

Independent of erftool's column form: used to test the reference itself on
tiny shapes (float64 numpy, slow on purpose, easy to read against the docs).
"""
import math

import numpy as np


def bilinear(grid, y, x):
    """Zero-padded bilinear sample of a 2-D array (DCN's rule)."""
    h, w = grid.shape
    if not (y > -1 and x > -1 and y < h and x < w):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * grid[yy, xx]
    return total


def deform_kernel2d(inp, weight, offset, kernel, stride=(1, 1), padding=(0, 0),
                    dilation=(1, 1), groups=1, offset_groups=1, data_offset=None, mask=None,
                    bias=None):
    inp, weight = np.asarray(inp, float), np.asarray(weight, float)
    n_img, c_in, h, w = inp.shape
    c_out, cg, sh, sw = weight.shape
    kh, kw = kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    taps = kh * kw
    dg = 1 if data_offset is None else data_offset.shape[1] // (2 * taps)
    out = np.zeros((n_img, c_out, ho, wo))
    for n in range(n_img):
        for o in range(c_out):
            q = o // (c_out // groups)
            for y in range(ho):
                for x in range(wo):
                    acc = 0.0 if bias is None else float(bias[o])
                    for ci in range(cg):
                        c = q * cg + ci
                        g = c // (c_in // offset_groups)
                        d = c // (c_in // dg)
                        for a in range(kh):
                            for b in range(kw):
                                t = a * kw + b
                                if offset is None:
                                    dr = dc = 0.0
                                elif offset.ndim == 2:
                                    dr = offset[n, g * 2 * taps + 2 * t]
                                    dc = offset[n, g * 2 * taps + 2 * t + 1]
                                else:
                                    dr = offset[n, g * 2 * taps + 2 * t, y, x]
                                    dc = offset[n, g * 2 * taps + 2 * t + 1, y, x]
                                kval = bilinear(weight[o, ci], a + (sh - kh) / 2 + dr,
                                                b + (sw - kw) / 2 + dc)
                                py = y * stride[0] - padding[0] + a * dilation[0]
                                px = x * stride[1] - padding[1] + b * dilation[1]
                                if data_offset is None:
                                    val = inp[n, c, py, px] if 0 <= py < h and 0 <= px < w else 0.0
                                else:
                                    val = bilinear(
                                        inp[n, c],
                                        py + data_offset[n, d * 2 * taps + 2 * t, y, x],
                                        px + data_offset[n, d * 2 * taps + 2 * t + 1, y, x])
                                if mask is not None:
                                    val *= mask[n, d * taps + t, y, x]
                                acc += val * kval
                    out[n, o, y, x] = acc
    return out
