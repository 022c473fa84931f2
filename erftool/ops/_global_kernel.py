"""Global Deformable Kernel without data offsets: resample the kernel once per
image, then convolve each image with its own kernel.

The resampled kernels are built tap-major, kt[n, k, m] with m = (C_out,
C_in/groups) flattened: one matrix product (N*G*K, S) @ (S, M) in the
orientation BLAS runs fastest, with no transposing copy. The per-image
convolution then takes one of two forms, chosen by which tensor is larger:
  * a grouped convolution with the batch folded into the groups, when the
    image outweighs its kernel (the common case: large maps, few channels);
  * one batched matrix product per tap, of that tap's per-image kernels with
    a strided window of the padded input (no im2col buffer, no full kernel
    tensor), when the kernels outweigh the image (many channels on a small
    map, where a convolution library spends its time re-laying out N
    different weight tensors); its running sums are float32 for half types.
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

def _coefficients(offset: Tensor, kernel_size, scope, offset_groups: int) -> Tensor:
    """(N, G, K, S) bilinear weights with which each tap reads the scope."""
    taps = kernel_size[0] * kernel_size[1]
    return reference.scope_coefficients(
        offset.reshape(offset.shape[0], offset_groups, taps, 2), kernel_size, scope)


def _row_groups(weight: Tensor, groups: int, offset_groups: int) -> Optional[Tensor]:
    """Offset group of every kernel row m = (o, c), or None with one group."""
    if offset_groups == 1:
        return None
    o, cg = weight.shape[:2]
    return reference.kernel_row_groups(o, cg, groups, offset_groups, weight.device).reshape(-1)


def _resample(weight: Tensor, coef: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Tap-major per-image kernels kt (N, K, M)."""
    n, g, taps, s2 = coef.shape
    w = weight.reshape(-1, s2)
    every = coef.reshape(n * g * taps, s2).mm(w.t()).view(n, g, taps, -1)
    if rows is None:
        return every[:, 0]
    return every.gather(1, rows.view(1, 1, 1, -1).expand(n, 1, taps, -1))[:, 0]


def resample_kernel(weight: Tensor, offset: Tensor, kernel_size, offset_groups: int = 1,
                    groups: int = 1) -> Tensor:
    """Per-image kernels (N, C_out, C_in/groups, K_h, K_w), differentiable by
    autograd (reference.resample_kernel is the oracle it is tested against)."""
    kernel_size = _args.pair("resample_kernel", "kernel_size", kernel_size, 1)
    o, cg = weight.shape[:2]
    coef = _coefficients(offset, kernel_size, tuple(weight.shape[2:]), offset_groups)
    kt = _resample(weight, coef, _row_groups(weight, groups, offset_groups))
    return kt.view(offset.shape[0], *kernel_size, o, cg).permute(0, 3, 4, 1, 2).contiguous()


def _spread_to_groups(grad_kernels: Tensor, coef: Tensor, rows: Optional[Tensor]):
    """grad_kernels (B, M) of kernels drawn from coef (B, G, S) -> the
    gradient of every group's candidate kernels (B*G, M), zero where a row
    belongs to another group, beside coef as (B*G, S)."""
    b, g, s2 = coef.shape
    if rows is not None:
        grad_kernels = grad_kernels.new_zeros(b, g, grad_kernels.shape[-1]).scatter_(
            1, rows.view(1, 1, -1).expand(b, 1, -1), grad_kernels.unsqueeze(1))
    return grad_kernels.reshape(b * g, -1), coef.reshape(b * g, s2)


def _resample_backward(grad_kt: Tensor, weight: Tensor, coef: Tensor, rows: Optional[Tensor],
                       need_weight: bool, need_coef: bool) -> Tuple[Optional[Tensor], ...]:
    """Gradients (weight, coef) of _resample from that of its output (N, K, M)."""
    n, g, taps, s2 = coef.shape
    grad_every, flat_coef = _spread_to_groups(
        grad_kt.reshape(n * taps, -1), coef.transpose(1, 2).reshape(n * taps, g, s2), rows)
    grad_weight = grad_coef = None
    if need_weight:
        grad_weight = grad_every.t().mm(flat_coef).view_as(weight)
    if need_coef:
        grad_coef = grad_every.mm(weight.reshape(-1, s2)).view(n, taps, g, s2).transpose(1, 2)
    return grad_weight, grad_coef


# ---------------------------------------------------------------- per-image convolution

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The tap-by-tap form keeps its running sums in float32 for the half types:
    stored in half between taps they would be rounded to 8-11 bits nine times."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _kernels_outweigh_image(channels_per_group: int, geom: _args.Geometry) -> bool:
    return channels_per_group * geom.taps > geom.out_size[0] * geom.out_size[1]


def _conv_kernels(kt: Tensor, o: int, geom: _args.Geometry) -> Tensor:
    """Tap-major kernels as grouped-convolution weights (N*C_out, C_in/groups, K_h, K_w)."""
    n = kt.shape[0]
    return kt.view(n, geom.taps, o, -1).permute(0, 2, 3, 1).reshape(
        n * o, -1, *geom.kernel_size)


def _tap_windows(geom: _args.Geometry):
    """(tap, slicer) pairs: slicer(t) is the window of the padded tensor t that
    tap k reads for every output position, (N, C, H_out, W_out), strided."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    ho, wo = geom.out_size
    for a in range(kh):
        for b in range(kw):
            rows = slice(a * dh, a * dh + sh * (ho - 1) + 1, sh)
            cols = slice(b * dw, b * dw + sw * (wo - 1) + 1, sw)
            yield a * kw + b, (lambda t, r=rows, c=cols: t[:, :, r, c])


def _padded(input: Tensor, geom: _args.Geometry) -> Tensor:
    ph, pw = geom.padding
    return F.pad(input, (pw, pw, ph, ph))


def _tap_kernels(weight: Tensor, coef: Tensor, rows: Optional[Tensor], k: int,
                 geom: _args.Geometry) -> Tensor:
    """Tap k's per-image kernels as a batch of (N*groups) (C_out/groups, C_in/groups)."""
    n, o, gr = coef.shape[0], weight.shape[0], geom.groups
    return _resample(weight, coef[:, :, k:k + 1], rows).view(n * gr, o // gr, -1)


def _tap_values(xp: Tensor, window, geom: _args.Geometry) -> Tensor:
    """Tap values of every output position as a batch of (N*groups) (C_in/groups, L)."""
    n, c = xp.shape[:2]
    return window(xp).reshape(n * geom.groups, c // geom.groups, -1)


def _tapwise_forward(input, weight, coef, rows, geom):
    """sum over taps of (per-image tap kernel) @ (input window): no im2col
    buffer and no full per-image kernel tensor."""
    n, o, gr = input.shape[0], weight.shape[0], geom.groups
    xp = _padded(input, geom)
    out = input.new_zeros(n * gr, o // gr, geom.out_size[0] * geom.out_size[1])
    for k, window in _tap_windows(geom):
        out.baddbmm_(_tap_kernels(weight, coef, rows, k, geom), _tap_values(xp, window, geom))
    return out


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    n, c, h, w = input.shape
    o = weight.shape[0]
    coef = _coefficients(offset, geom.kernel_size, tuple(weight.shape[2:]), geom.offset_groups)
    rows = _row_groups(weight, geom.groups, geom.offset_groups)
    if _kernels_outweigh_image(weight.shape[1], geom):
        acc = _accumulation_dtype(input.dtype)
        out = _tapwise_forward(input.to(acc), weight.to(acc), coef.to(acc), rows, geom)
        out = out.to(input.dtype)
    else:
        out = F.conv2d(input.reshape(1, n * c, h, w),
                       _conv_kernels(_resample(weight, coef, rows), o, geom), None,
                       geom.stride, geom.padding, geom.dilation, n * geom.groups)
    out = out.reshape(n, o, *geom.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _tapwise_backward(grad_output, input, weight, coef, rows, geom, needs):
    """(grad_input, grad_weight, grad_coef) of _tapwise_forward, tap by tap."""
    need_input, need_weight, need_coef = needs
    n, c, h, w = input.shape
    o, gr = weight.shape[0], geom.groups
    grads = grad_output.reshape(n * gr, o // gr, -1)
    xp = _padded(input, geom)
    grad_xp = torch.zeros_like(xp) if need_input else None
    s2 = coef.shape[-1]
    # grad of the scope weight, accumulated in place as (S, M) over the taps
    grad_weight_t = weight.new_zeros(s2, weight.numel() // s2) if need_weight else None
    grad_coef = torch.zeros_like(coef) if need_coef else None
    for k, window in _tap_windows(geom):
        kernels = _tap_kernels(weight, coef, rows, k, geom)
        if need_input:
            window(grad_xp).add_(torch.bmm(kernels.transpose(1, 2), grads).view(
                n, c, *geom.out_size))
        if need_weight or need_coef:
            grad_kernels = torch.bmm(grads, _tap_values(xp, window, geom).transpose(1, 2))
            grad_every, tap_coef = _spread_to_groups(grad_kernels.view(n, -1), coef[:, :, k], rows)
            if need_weight:
                grad_weight_t.addmm_(tap_coef.t(), grad_every)
            if need_coef:
                grad_coef[:, :, k] = grad_every.mm(weight.reshape(-1, s2)).view(n, -1, s2)
    grad_weight = grad_weight_t.t().reshape(weight.shape) if need_weight else None
    grad_input = None
    if need_input:
        ph, pw = geom.padding
        grad_input = grad_xp[:, :, ph:ph + h, pw:pw + w].contiguous()
    return grad_input, grad_weight, grad_coef


def _conv_backward(grad_output, input, weight, coef, rows, geom, needs):
    """(grad_input, grad_weight, grad_coef) of the grouped-convolution form."""
    need_input, need_weight, need_coef = needs
    n, c, h, w = input.shape
    o = weight.shape[0]
    kt = _resample(weight, coef, rows)
    need_kernels = need_weight or need_coef
    grad_input, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, n * o, *grad_output.shape[2:]), input.reshape(1, n * c, h, w),
        _conv_kernels(kt, o, geom), None, list(geom.stride), list(geom.padding),
        list(geom.dilation), False, [0, 0], n * geom.groups, [need_input, need_kernels, False])
    grad_input = grad_input.view_as(input) if need_input else None
    grad_weight = grad_coef = None
    if need_kernels:  # back to tap-major
        grad_kt = grad_kernels.view(n, o, -1, geom.taps).permute(0, 3, 1, 2).reshape(kt.shape)
        grad_weight, grad_coef = _resample_backward(grad_kt, weight, coef, rows, need_weight,
                                                    need_coef)
    return grad_input, grad_weight, grad_coef


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool], autograd_enabled) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset); autograd_enabled is a context manager
    that lets autograd record inside a custom-op kernel (for the offset ->
    coefficient step only)."""
    need_input, need_weight, need_offset = (bool(x) for x in needs[:3])
    with autograd_enabled():
        offset_leaf = offset.detach().requires_grad_(need_offset)
        coef = _coefficients(offset_leaf, geom.kernel_size, tuple(weight.shape[2:]),
                             geom.offset_groups)
    rows = _row_groups(weight, geom.groups, geom.offset_groups)
    wanted = (need_input, need_weight, need_offset)
    if _kernels_outweigh_image(weight.shape[1], geom):
        acc = _accumulation_dtype(input.dtype)
        grads = _tapwise_backward(grad_output.to(acc), input.to(acc), weight.to(acc),
                                  coef.detach().to(acc), rows, geom, wanted)
        grad_input, grad_weight, grad_coef = (
            None if g is None else g.to(like.dtype)
            for g, like in zip(grads, (input, weight, coef)))
    else:
        grad_input, grad_weight, grad_coef = _conv_backward(
            grad_output, input, weight, coef.detach(), rows, geom, wanted)
    grad_offset = None
    if need_offset:
        with autograd_enabled():
            (grad_offset,) = torch.autograd.grad(coef, offset_leaf, grad_coef)
    return [grad_input, grad_weight, grad_offset]
