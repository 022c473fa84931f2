"""Deformable Kernel and deformable convolution operators.

`deform_kernel2d` resamples the kernel from a larger scope (local or global
offsets) and optionally also deforms the data grid (DK + DC);
`deform_conv2d` is a drop-in for torchvision.ops.deform_conv2d. Both are
torch.library custom operators (torch.ops.erftool.*) with autograd and fake
kernels, backed by native CPU/CUDA kernels or the pure-PyTorch reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _args, _autocast, _global_kernel, reference
from . import _custom_ops  # noqa: F401  registers the erftool:: operators
from ._backend import BACKENDS, backend_info, requested as requested_backend, use_backend
from .reference import scope_coefficients

__all__ = [
    "deform_kernel2d", "deform_conv2d", "resample_kernel", "scope_coefficients",
    "use_backend", "backend_info", "requested_backend", "BACKENDS", "reference",
]


def _backend_arg(backend: Optional[str]) -> str:
    """The op's string argument: "" defers to use_backend()/ERFTOOL_BACKEND."""
    return "" if backend is None else requested_backend(backend)


def deform_kernel2d(
    input: Tensor, weight: Tensor, offset: Tensor, *, kernel_size, bias: Optional[Tensor] = None,
    stride=1, padding=0, dilation=1, groups: int = 1, offset_groups: int = 1,
    data_offset: Optional[Tensor] = None, backend: Optional[str] = None,
) -> Tensor:
    """Deformable Kernel convolution (Gao et al., ICLR 2020).

    out[n, o, y, x] = bias[o] + sum_{c, a, b} I[n, c, y*s - p + a*d, x*s - p + b*d]
                      * W~[o, c](a + (S_h-K_h)/2 + drow, b + (S_w-K_w)/2 + dcol)
    where W~ is the zero-padded bilinear interpolation of the scope weight.

    Args:
        input: (N, C_in, H, W).
        weight: the kernel scope, (C_out, C_in/groups, S_h, S_w), S >= K.
        offset: kernel offsets, local (N, 2*G*K_h*K_w, H_out, W_out) or global
            (N, 2*G*K_h*K_w); channel g*2*K_h*K_w + 2*t is drow of tap
            t = a*K_w + b of offset group g, the next one dcol. Group g holds
            the input channels [g*C_in/G, (g+1)*C_in/G).
        kernel_size: (K_h, K_w) or an int.
        data_offset: optional (N, 2*DG*K_h*K_w, H_out, W_out) data offsets in
            torchvision's layout: the taps are then read bilinearly at shifted
            locations (DK + DC).
        backend: None/"auto", "native" or "reference".

    Inside torch.autocast the floating-point arguments are cast to one dtype
    first (the autocast dtype on CUDA, float32 on CPU; see ops/_autocast.py).
    """
    input, weight, offset, bias, data_offset = _autocast.cast_for(
        input, (input, weight, offset, bias, data_offset))
    geom, _ = _args.check_deform_kernel2d(
        input, weight, offset, kernel_size, bias, stride, padding, dilation, groups,
        offset_groups, data_offset)
    return torch.ops.erftool.deform_kernel2d(
        input, weight, offset, data_offset, bias, list(geom.kernel_size), list(geom.stride),
        list(geom.padding), list(geom.dilation), groups, offset_groups, _backend_arg(backend))


def deform_conv2d(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
    padding=0, dilation=1, mask: Optional[Tensor] = None, *, backend: Optional[str] = None,
) -> Tensor:
    """Deformable convolution with torchvision.ops.deform_conv2d's signature,
    layout and results (DCN v1; DCN v2 when `mask` is given).

    input (N, C_in, H, W); offset (N, 2*DG*K_h*K_w, H_out, W_out);
    weight (C_out, C_in/groups, K_h, K_w); mask (N, DG*K_h*K_w, H_out, W_out).
    Inside torch.autocast the floating-point arguments are cast to one dtype
    first, as for deform_kernel2d.
    """
    input, offset, weight, bias, mask = _autocast.cast_for(
        input, (input, offset, weight, bias, mask))
    geom = _args.check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation,
                                     mask)
    return torch.ops.erftool.deform_conv2d(
        input, offset, weight, bias, mask, list(geom.stride), list(geom.padding),
        list(geom.dilation), _backend_arg(backend))


def resample_kernel(weight: Tensor, offset: Tensor, kernel_size, offset_groups: int = 1,
                    groups: int = 1) -> Tensor:
    """Per-image kernels (N, C_out, C_in/groups, K_h, K_w) that a global
    Deformable Kernel with offsets (N, 2*G*K_h*K_w) applies."""
    return _global_kernel.resample_kernel(weight, offset, kernel_size, offset_groups, groups)
