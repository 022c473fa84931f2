"""Pure-PyTorch reference implementation of erftool's operators.

Readable rather than fast: it is the oracle the native kernels are tested
against (differentiable by plain autograd) and the fallback where the native
module cannot be built. It writes the column form out explicitly,

    T[n, c, s, j] = sum_k A[n, g(c), j, k, s] * X[n, c, k, j]
    O[n, o, j]    = sum_{c, s} W[o, c, s] * T[n, c, s, j]

where X holds the data taps (rigid, or bilinearly sampled for deformable
convolution) and A the bilinear coefficients with which tap k reads the
kernel scope (one-hot for a rigid kernel).
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from . import _args


def _bilinear_corners(
    y: torch.Tensor, x: torch.Tensor, height: int, width: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(flat index, weight) of the four corners of each sample (y, x) on a
    zero-padded height x width grid; DCN's rule: a sample with y <= -1,
    x <= -1, y >= height or x >= width is zero, and so is a NaN one."""
    inside = (y > -1) & (x > -1) & (y < height) & (x < width)
    # Sanitise before floor so that NaN/inf never reach an index computation;
    # torch.where keeps the gradient of the kept entries intact.
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    for dy, dx, weight in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        valid = inside & (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
        index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).long()
        yield index, weight * valid.to(weight.dtype)


def bilinear_weights(y: torch.Tensor, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Dense bilinear interpolation weights: (...,) samples -> (..., height*width)."""
    out = y.new_zeros(y.shape + (height * width,))
    for index, weight in _bilinear_corners(y, x, height, width):
        out = out.scatter_add(-1, index.unsqueeze(-1), weight.unsqueeze(-1))
    return out


def _scope_samples(offset_pairs: torch.Tensor, kernel_size, scope):
    """Scope position (y, x) each tap samples, and the scope's (S_h, S_w)."""
    kh, kw = _args.pair("scope_coefficients", "kernel_size", kernel_size, 1)
    sh, sw = _args.pair("scope_coefficients", "scope", scope, 1)
    dtype, device = offset_pairs.dtype, offset_pairs.device
    rows = torch.arange(kh, dtype=dtype, device=device).repeat_interleave(kw)
    cols = torch.arange(kw, dtype=dtype, device=device).repeat(kh)
    y = rows + (sh - kh) / 2 + offset_pairs[..., 0]
    x = cols + (sw - kw) / 2 + offset_pairs[..., 1]
    return y, x, sh, sw


def scope_coefficients(offset_pairs: torch.Tensor, kernel_size, scope) -> torch.Tensor:
    """Bilinear weights with which each kernel tap reads the scope.

    offset_pairs: (..., K_h*K_w, 2) with (drow, dcol) per tap (row-major taps).
    Returns (..., K_h*K_w, S_h*S_w): row t is how tap t mixes the scope cells.
    Tap (a, b) samples scope position (a + (S_h-K_h)/2 + drow, b + (S_w-K_w)/2 + dcol).
    """
    return bilinear_weights(*_scope_samples(offset_pairs, kernel_size, scope))


def _rigid_taps(input, geom: _args.Geometry) -> torch.Tensor:
    """(N, C, K, L) data taps on the rigid grid (zero outside the image)."""
    n, c = input.shape[:2]
    cols = F.unfold(input, geom.kernel_size, geom.dilation, geom.padding, geom.stride)
    return cols.view(n, c, geom.taps, -1)


def _sampled_taps(input, data_offset, mask, geom: _args.Geometry) -> torch.Tensor:
    """(N, C, K, L) data taps read bilinearly at the shifted locations
    (torchvision's deform_conv2d semantics), times the DCNv2 mask if any."""
    n, c, h, w = input.shape
    dg, taps = geom.data_offset_groups, geom.taps
    ho, wo = geom.out_size
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        geom.kernel_size, geom.stride, geom.padding, geom.dilation)
    dtype, device = input.dtype, input.device
    tap_row = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
    tap_col = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
    out_row = torch.arange(ho, device=device, dtype=dtype) * sh - ph
    out_col = torch.arange(wo, device=device, dtype=dtype) * sw - pw
    base_y = tap_row.view(taps, 1, 1) + out_row.view(1, ho, 1)
    base_x = tap_col.view(taps, 1, 1) + out_col.view(1, 1, wo)
    off = data_offset.view(n, dg, taps, 2, ho, wo)
    y = (base_y + off[:, :, :, 0]).reshape(n, dg, 1, -1)
    x = (base_x + off[:, :, :, 1]).reshape(n, dg, 1, -1)
    planes = input.reshape(n, dg, c // dg, h * w)
    values = input.new_zeros(n, dg, c // dg, taps * ho * wo)
    for index, weight in _bilinear_corners(y, x, h, w):
        gathered = planes.gather(-1, index.expand(-1, -1, c // dg, -1))
        values = values + gathered * weight
    values = values.view(n, dg, c // dg, taps, ho * wo)
    if mask is not None:
        values = values * mask.view(n, dg, 1, taps, ho * wo)
    return values.reshape(n, c, taps, ho * wo)


def _kernel_coefficients(kernel_offset, kind, geom, scope, batch, dtype, device):
    """Bilinear scope coefficients: local (N, G, L, K, S2), global (N, G, 1, K, S2)."""
    taps, g = geom.taps, geom.offset_groups
    if kernel_offset is None:
        pairs = torch.zeros(batch, g, 1, taps, 2, dtype=dtype, device=device)
    elif kind == "global":
        pairs = kernel_offset.view(batch, g, 1, taps, 2)
    else:
        pairs = kernel_offset.view(batch, g, taps, 2, -1).permute(0, 1, 4, 2, 3)
    return scope_coefficients(pairs, geom.kernel_size, scope)


def deform_column_conv(
    input, weight, kernel_offset, kind, data_offset, mask, bias, geom: _args.Geometry
) -> torch.Tensor:
    """The shared column-form computation behind every operator."""
    n, c = input.shape[:2]
    o, cg = weight.shape[:2]
    scope = tuple(weight.shape[2:])
    s2 = scope[0] * scope[1]
    if data_offset is None:
        taps = _rigid_taps(input, geom)
        if mask is not None:
            taps = taps * mask.view(n, 1, geom.taps, -1)
    else:
        taps = _sampled_taps(input, data_offset, mask, geom)
    length = taps.shape[-1]
    coef = _kernel_coefficients(
        kernel_offset, kind, geom, scope, n, input.dtype, input.device)
    g = geom.offset_groups
    taps = taps.view(n, g, c // g, geom.taps, length)
    columns = torch.einsum("ngljs,ngcjl->ngcsl", coef, taps)
    columns = columns.reshape(n, geom.groups, cg * s2, length)
    w = weight.reshape(geom.groups, o // geom.groups, cg * s2)
    out = torch.einsum("gok,ngkl->ngol", w, columns).reshape(n, o, *geom.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def kernel_row_groups(out_channels: int, in_per_group: int, groups: int, offset_groups: int,
                      device=None) -> torch.Tensor:
    """(C_out, C_in/groups) offset group of every weight entry: entry (o, c) reads
    input channel (o // (C_out/groups)) * C_in/groups + c, and input channel q
    belongs to offset group q // (C_in / G)."""
    o, cg = out_channels, in_per_group
    in_channel = (torch.arange(o, device=device) // (o // groups)).view(o, 1) * cg \
        + torch.arange(cg, device=device).view(1, cg)
    return in_channel // (groups * cg // offset_groups)


def resample_kernel(weight, offset, kernel_size, offset_groups: int = 1, groups: int = 1):
    """Per-image kernels of a global Deformable Kernel.

    weight (C_out, C_in/groups, S_h, S_w); offset (N, 2*G*K_h*K_w) ->
    (N, C_out, C_in/groups, K_h, K_w): kernel[n, o, c, t] = sum_s A[n, g(o, c), t, s]
    W[o, c, s], written out directly (the oracle; erftool.ops.resample_kernel is
    the fast version).
    """
    kh, kw = _args.pair("resample_kernel", "kernel_size", kernel_size, 1)
    o, cg, sh, sw = weight.shape
    n, g = offset.shape[0], offset_groups
    coef = scope_coefficients(offset.reshape(n, g, kh * kw, 2), (kh, kw), (sh, sw))
    group_of = kernel_row_groups(o, cg, groups, g, weight.device)
    kernels = torch.einsum("nocks,ocs->nock", coef[:, group_of], weight.reshape(o, cg, sh * sw))
    return kernels.reshape(n, o, cg, kh, kw)


def deform_kernel2d(
    input, weight, offset, *, kernel_size, bias=None, stride=1, padding=0, dilation=1,
    groups=1, offset_groups=1, data_offset=None, backend=None,
):
    """Reference Deformable Kernel convolution (see erftool.ops.deform_kernel2d)."""
    geom, kind = _args.check_deform_kernel2d(
        input, weight, offset, kernel_size, bias, stride, padding, dilation, groups,
        offset_groups, data_offset)
    return deform_column_conv(input, weight, offset, kind, data_offset, None, bias, geom)


def deform_conv2d(
    input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *,
    backend=None,
):
    """Reference deformable convolution with torchvision's semantics."""
    geom = _args.check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return deform_column_conv(input, weight, None, "local", offset, mask, bias, geom)
