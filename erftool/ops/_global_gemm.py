"""Global Deformable Kernel as batched matrix products: each image's
resampled kernel times that image's input (the form for GPUs, where cuBLAS
runs batched products near the speed of one large one, while cuDNN's grouped
convolution with the batch folded into the groups, and a product per tap on
gathered windows, ran 5-50x slower than conv2d on an H100).

Three layouts of the same arithmetic:
  * "windows" (stride 1, float32 / float64): per tap, one product per image
    and group, (C_out/g, C_in/g) @ (C_in/g, H_out * W_p), reading the padded
    input in place: with stride 1 a tap's window is a plain matrix if every
    output row is computed W_p (padded width) wide; the W_p - W_out extra
    columns are dropped. No gathered columns at all; the taps accumulate in
    the output (in float32, hence not for the half types).
  * "one_product": the windows of every tap gathered in one strided copy,
    then one product per image and group, (C_out/g, K*C_in/g) @ (K*C_in/g, L),
    with the kernels re-laid tap-minor first (a copy of the kernels): when
    the channels per group are fewer than the output positions;
  * "tap_sums": the same columns, one product per image, group and tap,
    and the K partial outputs summed afterwards (in float32 for the half
    types): no copy of the kernels, which then outweigh the image.
The forward draws its scope coefficients densely (_coefficients, a few
device operations and no host-device round trip); the backward uses the
gathered columns with the one-product layout (two batched products, the
input gradient added back window by window) and _global_kernel's corners,
whose autograd gives the offset gradient.
Images go in chunks that keep the columns and kernels under _CHUNK_BYTES.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args
from . import _global_kernel as gk

_CHUNK_BYTES = 256 << 20


def layout(input: Tensor, weight: Tensor, geom: _args.Geometry) -> str:
    """Which layout the forward takes (see above)."""
    if geom.stride == (1, 1) and input.dtype in (torch.float32, torch.float64):
        return "windows"
    positions = geom.out_size[0] * geom.out_size[1]
    return "tap_sums" if weight.shape[1] >= positions else "one_product"


def _coefficients(offset: Tensor, kernel_size, scope, offset_groups: int) -> Tensor:
    """(N, G, K, S_h*S_w) bilinear weight of every scope cell for every tap's
    sample (forward only: no autograd through it). On each axis the weight of
    cell i for a sample at p is the tent max(0, 1 - |p - i|): that is the
    bilinear weight, 0 for cells outside the scope and for every cell when
    p <= -1 or p >= S. Non-finite offsets are moved outside first."""
    (kh, kw), (sh, sw) = kernel_size, scope
    far = -2.0 * (max(sh, sw) + max(kh, kw))  # p + gap below stays < -1 for every cell
    pos = offset.reshape(offset.shape[0], offset_groups, kh, kw, 2).nan_to_num(
        nan=far, posinf=far, neginf=far)

    def gaps(taps, cells):  # (taps, cells): tap t's centred position t + (S - K)/2 minus cell i
        return torch.arange(taps, dtype=pos.dtype, device=pos.device).view(-1, 1) + (
            (cells - taps) / 2) - torch.arange(cells, dtype=pos.dtype, device=pos.device)

    def tent(p, gap):
        return (1 - (p.unsqueeze(-1) + gap).abs()).clamp_min(0)

    wy = tent(pos[..., 0], gaps(kh, sh).view(kh, 1, sh)).unsqueeze(-1)  # (N, G, kh, kw, sh, 1)
    wx = tent(pos[..., 1], gaps(kw, sw)).unsqueeze(-2)  # (N, G, kh, kw, 1, sw)
    return (wy * wx).reshape(offset.shape[0], offset_groups, kh * kw, sh * sw)


def _columns(input: Tensor, geom: _args.Geometry, tap_major: bool) -> Tensor:
    """The windows every tap reads, in one copy: (N, K, groups, C/groups, L) when
    tap_major, else (N, groups, K, C/groups, L); L = H_out * W_out."""
    xp = gk._padded(input, geom).contiguous()
    n, c = xp.shape[:2]
    gr = geom.groups
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    ho, wo = geom.out_size
    s_n, s_c, s_y, s_x = xp.stride()
    windows = xp.as_strided((n, gr, kh, kw, c // gr, ho, wo),
                            (s_n, c // gr * s_c, dh * s_y, dw * s_x, s_c, sh * s_y, sw * s_x))
    if tap_major:
        return windows.permute(0, 2, 3, 1, 4, 5, 6).reshape(n, kh * kw, gr, c // gr, ho * wo)
    return windows.reshape(n, gr, kh * kw, c // gr, ho * wo)


def _image_chunks(input: Tensor, weight: Tensor, geom: _args.Geometry):
    """Slices of images whose columns, kernels (every offset group's
    candidates, and a re-laid copy) and partial outputs fit _CHUNK_BYTES."""
    o, cg = weight.shape[:2]
    per_image = geom.taps * (input.shape[1] * geom.out_size[0] * geom.out_size[1]
                             + o * cg * (geom.offset_groups + 1)
                             + o * geom.out_size[0] * geom.out_size[1])
    step = max(1, _CHUNK_BYTES // (per_image * 4))  # float32 kernels for the half types
    n = input.shape[0]
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _kernels(weight: Tensor, coef: Tensor, rows: Optional[Tensor], dtype,
             tap_major: bool = False) -> Tensor:
    """Per-image kernels from dense coefficients coef (N, G, K, S): (N, K, M),
    or (K, N, M) when tap_major; M = C_out * C_in/groups. One product over
    every offset group's candidates, each row m then keeps its own group's;
    computed in float32 / float64 (bilinear weights rounded to 8 bits would
    shift every tap) and stored in the input's dtype."""
    acc = gk._accumulation_dtype(dtype)
    n, g, k, cells = coef.shape
    m = weight.shape[0] * weight.shape[1]
    order, lead = ((2, 0, 1, 3), (k, n)) if tap_major else ((0, 2, 1, 3), (n, k))
    every = coef.to(acc).permute(order).reshape(-1, cells).mm(
        weight.to(acc).reshape(m, cells).t()).view(-1, g, m)
    if rows is None:
        kt = every[:, 0]
    else:
        kt = every.gather(1, rows.view(1, 1, -1).expand(every.shape[0], 1, -1))
    return kt.reshape(*lead, m).to(dtype)


def _tap_minor(kt: Tensor, o: int, geom: _args.Geometry) -> Tensor:
    """(N, K, C_out*C_in/g) kernels as (N*g, C_out/g, K*C_in/g) matrices."""
    n, gr = kt.shape[0], geom.groups
    return kt.view(n, geom.taps, gr, o // gr, -1).permute(0, 2, 3, 1, 4).reshape(
        n * gr, o // gr, -1)


def _window_forward(input: Tensor, kt: Tensor, geom: _args.Geometry, out: Tensor) -> None:
    """Layout "windows" (stride 1): out (N, C_out, H_out, W_out) from tap-major
    kernels kt (K, N, M), reading each tap's window of the padded input in place."""
    n, c = input.shape[:2]
    o, gr = out.shape[1], geom.groups
    (kh, kw), (dh, dw), (ph, pw) = geom.kernel_size, geom.dilation, geom.padding
    ho, wo = geom.out_size
    # One spare zero row below: the last tap's window (H_out rows of W_p) runs
    # (K_w - 1) * d_w elements past the padded image, less than a row.
    xp = F.pad(input, (pw, pw, ph, ph + 1))
    wp = xp.shape[3]
    plane = xp.shape[2] * wp
    span = ho * wp
    sums = input.new_empty(n * gr, o // gr, span)
    for a in range(kh):
        for b in range(kw):
            k = a * kw + b
            window = xp.as_strided((n * gr, c // gr, span), (c // gr * plane, plane, 1),
                                   xp.storage_offset() + a * dh * wp + b * dw)
            kernels = kt[k].view(n * gr, o // gr, c // gr)
            if k == 0:
                torch.bmm(kernels, window, out=sums)
            else:
                sums.baddbmm_(kernels, window)
    out.copy_(sums.view(n, o, ho, wp)[..., :wo])


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    n, o, gr = input.shape[0], weight.shape[0], geom.groups
    positions = geom.out_size[0] * geom.out_size[1]
    coef = _coefficients(offset, geom.kernel_size, tuple(weight.shape[2:]), geom.offset_groups)
    rows = gk._row_groups(weight, gr, geom.offset_groups)
    chosen = layout(input, weight, geom)
    out = input.new_empty(n, o, *geom.out_size)
    for images in _image_chunks(input, weight, geom):
        part = out[images]
        m = part.shape[0]
        if chosen == "windows":
            kt = _kernels(weight, coef[images], rows, input.dtype, tap_major=True)
            _window_forward(input[images], kt, geom, part)
            continue
        kt = _kernels(weight, coef[images], rows, input.dtype)
        cols = _columns(input[images], geom, tap_major=chosen == "tap_sums")
        if chosen == "tap_sums":
            parts = torch.bmm(kt.view(m * geom.taps * gr, o // gr, -1),
                              cols.view(m * geom.taps * gr, -1, positions))
            part.copy_(parts.view(m, geom.taps, *part.shape[1:]).sum(
                1, dtype=gk._accumulation_dtype(input.dtype)))
        else:
            torch.bmm(_tap_minor(kt, o, geom), cols.view(m * gr, -1, positions),
                      out=part.view(m * gr, o // gr, positions))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, corners: gk._Corners,
             rows: Optional[Tensor], geom: _args.Geometry, needs: List[bool]):
    """(grad_input, grad_weight, grad_corner_weights); corners carry no autograd history."""
    need_input, need_weight, need_corners = needs
    n, c, h, w = input.shape
    o, gr = weight.shape[0], geom.groups
    positions = geom.out_size[0] * geom.out_size[1]
    acc = gk._accumulation_dtype(input.dtype)
    ph, pw = geom.padding
    grad_xp = input.new_zeros(n, c, h + 2 * ph, w + 2 * pw) if need_input else None
    grad_weight = weight.new_zeros(weight.shape, dtype=acc) if need_weight else None
    grad_corners = torch.empty_like(corners.weight) if need_corners else None
    coef = corners.detach_to(acc).dense(weight.shape[2] * weight.shape[3])
    for images in _image_chunks(input, weight, geom):
        kt = _kernels(weight, coef[images], rows, input.dtype)
        cols = _columns(input[images], geom, tap_major=False)
        m = cols.shape[0]
        cols = cols.view(m * gr, -1, positions)
        grads = grad_output[images].reshape(m * gr, o // gr, positions)
        if need_input:
            grad_cols = torch.bmm(_tap_minor(kt, o, geom).transpose(1, 2), grads).view(
                m, gr, geom.taps, c // gr, *geom.out_size)
            part = grad_xp[images]
            for k, window in gk._tap_windows(geom):
                window(part).unflatten(1, (gr, c // gr)).add_(grad_cols[:, :, k])
        if need_weight or need_corners:
            grad_kt = torch.bmm(grads, cols.transpose(1, 2)).view(
                m, gr, o // gr, geom.taps, c // gr).permute(0, 3, 1, 2, 4).reshape(
                m, geom.taps, -1).to(acc)
            part = gk._resample_backward(
                grad_kt, weight.to(acc), corners.images(images).detach_to(acc).permute(0, 2, 1),
                rows, grad_weight, need_corners)
            if need_corners:
                grad_corners[images] = part.transpose(1, 2)
    grad_input = None
    if need_input:
        grad_input = grad_xp[:, :, ph:ph + h, pw:pw + w].contiguous()
    return (grad_input,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            grad_corners)
