"""Global Deformable Kernel without data offsets: resample the kernel once per
image, then convolve each image with its own kernel.

The resampled kernels are built tap-major, kt[n, k, m] with m = (C_out,
C_in/groups) flattened: one matrix product (N*G*K, S) @ (S, M) in the
orientation BLAS runs fastest, with no transposing copy. The per-image
convolution then takes one of two forms, chosen by which tensor is larger:
  * a grouped convolution with the batch folded into the groups, when the
    image outweighs its kernel (the common case: large maps, few channels);
  * im2col + one batched matrix product per tap, straight from the tap-major
    kernels, when the kernels outweigh the image (many channels on a small
    map, where a convolution library spends its time re-laying out N
    different weight tensors).
Forward and backward are written out by hand (no autograd graph over large
tensors); only the tiny offset -> coefficient step goes through autograd.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args, reference


# ---------------------------------------------------------------- resampling

def _coefficients(offset: Tensor, weight: Tensor, geom: _args.Geometry) -> Tensor:
    """(N, G, K, S) bilinear weights with which each tap reads the scope."""
    n, taps = offset.shape[0], geom.taps
    return reference.scope_coefficients(
        offset.reshape(n, geom.offset_groups, taps, 2), geom.kernel_size, tuple(weight.shape[2:]))


def _row_groups(weight: Tensor, geom: _args.Geometry) -> Optional[Tensor]:
    """Offset group of every kernel row m = (o, c), or None with one group."""
    if geom.offset_groups == 1:
        return None
    o, cg = weight.shape[:2]
    device = weight.device
    in_channel = (torch.arange(o, device=device) // (o // geom.groups)).view(o, 1) * cg \
        + torch.arange(cg, device=device).view(1, cg)
    return (in_channel // (geom.groups * cg // geom.offset_groups)).reshape(-1)


def _resample(weight: Tensor, coef: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Tap-major per-image kernels kt (N, K, M)."""
    n, g, taps, s2 = coef.shape
    w = weight.reshape(-1, s2)
    every = coef.reshape(n * g * taps, s2).mm(w.t()).view(n, g, taps, -1)
    if rows is None:
        return every[:, 0]
    return every.gather(1, rows.view(1, 1, 1, -1).expand(n, 1, taps, -1))[:, 0]


def _resample_backward(grad_kt: Tensor, weight: Tensor, coef: Tensor, rows: Optional[Tensor],
                       need_weight: bool, need_coef: bool) -> Tuple[Optional[Tensor], ...]:
    n, g, taps, s2 = coef.shape
    if rows is None:
        grad_every = grad_kt.reshape(n * taps, -1)
    else:
        grad_every = grad_kt.new_zeros(n, g, taps, grad_kt.shape[-1]).scatter_(
            1, rows.view(1, 1, 1, -1).expand(n, 1, taps, -1), grad_kt.unsqueeze(1))
        grad_every = grad_every.view(n * g * taps, -1)
    grad_weight = grad_coef = None
    if need_weight:
        grad_weight = grad_every.t().mm(coef.reshape(n * g * taps, s2)).view_as(weight)
    if need_coef:
        grad_coef = grad_every.mm(weight.reshape(-1, s2)).view_as(coef)
    return grad_weight, grad_coef


# ---------------------------------------------------------------- per-image convolution

def _kernels_outweigh_image(channels_per_group: int, geom: _args.Geometry) -> bool:
    return channels_per_group * geom.taps > geom.out_size[0] * geom.out_size[1]


def _conv_kernels(kt: Tensor, o: int, geom: _args.Geometry) -> Tensor:
    """Tap-major kernels as grouped-convolution weights (N*C_out, C_in/groups, K_h, K_w)."""
    n = kt.shape[0]
    return kt.view(n, geom.taps, o, -1).permute(0, 2, 3, 1).reshape(
        n * o, -1, *geom.kernel_size)


def _tap_views(kt: Tensor, cols: Tensor, o: int, geom: _args.Geometry):
    """kt (N, K, groups, O/groups, Cg) and cols (N, groups, Cg, K, L) views."""
    n, gr = kt.shape[0], geom.groups
    return (kt.view(n, geom.taps, gr, o // gr, -1),
            cols.view(n, gr, -1, geom.taps, cols.shape[-1]))


def _unfold(input: Tensor, geom: _args.Geometry) -> Tensor:
    return F.unfold(input, geom.kernel_size, geom.dilation, geom.padding, geom.stride)


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    n, c, h, w = input.shape
    o = weight.shape[0]
    kt = _resample(weight, _coefficients(offset, weight, geom), _row_groups(weight, geom))
    if _kernels_outweigh_image(weight.shape[1], geom):
        kv, cv = _tap_views(kt, _unfold(input, geom), o, geom)
        out = input.new_zeros(n, geom.groups, o // geom.groups, cv.shape[-1])
        for k in range(geom.taps):
            for gi in range(geom.groups):
                out[:, gi].baddbmm_(kv[:, k, gi], cv[:, gi, :, k])
    else:
        out = F.conv2d(input.reshape(1, n * c, h, w), _conv_kernels(kt, o, geom), None,
                       geom.stride, geom.padding, geom.dilation, n * geom.groups)
    out = out.reshape(n, o, *geom.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _per_image_backward(grad_output, input, kt, o, geom, need_input, need_kernels):
    """(grad_input, grad_kt) of the per-image convolution of forward()."""
    n, c, h, w = input.shape
    if _kernels_outweigh_image(kt.shape[-1] // o, geom):
        grads = grad_output.reshape(n, geom.groups, o // geom.groups, -1)
        cols = _unfold(input, geom)
        kv, cv = _tap_views(kt, cols, o, geom)
        grad_input = grad_kt = None
        if need_input:
            grad_cols = torch.empty_like(cols)
            _, gcv = _tap_views(kt, grad_cols, o, geom)
            for k in range(geom.taps):
                for gi in range(geom.groups):
                    gcv[:, gi, :, k].copy_(torch.bmm(kv[:, k, gi].transpose(1, 2), grads[:, gi]))
            grad_input = F.fold(grad_cols, (h, w), geom.kernel_size, geom.dilation,
                                geom.padding, geom.stride)
        if need_kernels:
            grad_kt = torch.empty_like(kt)
            gkv, _ = _tap_views(grad_kt, cols, o, geom)
            for k in range(geom.taps):
                for gi in range(geom.groups):
                    gkv[:, k, gi].copy_(torch.bmm(grads[:, gi], cv[:, gi, :, k].transpose(1, 2)))
        return grad_input, grad_kt
    kernels = _conv_kernels(kt, o, geom)
    grad_input, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, n * o, *grad_output.shape[2:]), input.reshape(1, n * c, h, w),
        kernels, None, list(geom.stride), list(geom.padding), list(geom.dilation), False,
        [0, 0], n * geom.groups, [need_input, need_kernels, False])
    grad_input = grad_input.view_as(input) if need_input else None
    if need_kernels:  # back to tap-major
        grad_kt = grad_kernels.view(n, o, -1, geom.taps).permute(0, 3, 1, 2).reshape(kt.shape)
    else:
        grad_kt = None
    return grad_input, grad_kt


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool], autograd_enabled) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset); autograd_enabled is a context manager
    that lets autograd record inside a custom-op kernel (for the offset ->
    coefficient step only)."""
    need_input, need_weight, need_offset = (bool(x) for x in needs[:3])
    o = weight.shape[0]
    with autograd_enabled():
        offset_leaf = offset.detach().requires_grad_(need_offset)
        coef = _coefficients(offset_leaf, weight, geom)
    rows = _row_groups(weight, geom)
    kt = _resample(weight, coef.detach(), rows)
    grad_input, grad_kt = _per_image_backward(
        grad_output, input, kt, o, geom, need_input, need_weight or need_offset)
    grad_weight = grad_offset = None
    if need_weight or need_offset:
        grad_weight, grad_coef = _resample_backward(
            grad_kt, weight, coef.detach(), rows, need_weight, need_offset)
        if need_offset:
            with autograd_enabled():
                (grad_offset,) = torch.autograd.grad(coef, offset_leaf, grad_coef)
    return [grad_input, grad_weight, grad_offset]
