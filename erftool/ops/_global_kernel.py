"""Global Deformable Kernel without data offsets: resample the kernel once per
image, then convolve each image with its own kernel.

The per-image convolution takes one of two forms, chosen by which tensor is
larger:
  * a grouped convolution with the batch folded into the groups, when the
    image outweighs its kernel (the common case: large maps, few channels);
  * im2col + a batched matrix product, when the per-image kernel outweighs the
    image (many channels on a small map, where a convolution library spends
    its time re-laying out N different weight tensors).
The backward passes reuse the per-image kernels (no recomputed forward) and
take the small resampling step through autograd.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args, reference


def _kernels_outweigh_image(channels_per_group: int, geom: _args.Geometry) -> bool:
    return channels_per_group * geom.taps > geom.out_size[0] * geom.out_size[1]


def _unfold(input: Tensor, geom: _args.Geometry) -> Tensor:
    """(N, groups, C_in/groups * K, L) im2col columns."""
    cols = F.unfold(input, geom.kernel_size, geom.dilation, geom.padding, geom.stride)
    return cols.view(input.shape[0], geom.groups, -1, cols.shape[-1])


def _kernels_as_matrices(kernels: Tensor, geom: _args.Geometry) -> Tensor:
    """(N, C_out, C_in/groups, K_h, K_w) -> (N, groups, C_out/groups, C_in/groups * K)."""
    n, o = kernels.shape[:2]
    return kernels.reshape(n, geom.groups, o // geom.groups, -1)


def _resample(weight: Tensor, offset: Tensor, geom: _args.Geometry) -> Tensor:
    return reference.resample_kernel(
        weight, offset, geom.kernel_size, geom.offset_groups, geom.groups)


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    n, c, h, w = input.shape
    o = weight.shape[0]
    kernels = _resample(weight, offset, geom)
    if _kernels_outweigh_image(weight.shape[1], geom):
        out = torch.matmul(_kernels_as_matrices(kernels, geom), _unfold(input, geom))
    else:
        out = F.conv2d(input.reshape(1, n * c, h, w), kernels.reshape(n * o, *kernels.shape[2:]),
                       None, geom.stride, geom.padding, geom.dilation, n * geom.groups)
    out = out.reshape(n, o, *geom.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _conv_backward(grad_output, input, kernels, geom, needs) -> Tuple[Tensor, Tensor]:
    """(grad_input, grad_kernels) of the per-image convolution of forward()."""
    n, c, h, w = input.shape
    o = kernels.shape[1]
    if _kernels_outweigh_image(kernels.shape[2], geom):
        grads = grad_output.reshape(n, geom.groups, o // geom.groups, -1)
        matrices = _kernels_as_matrices(kernels, geom)
        grad_input = grad_kernels = None
        if needs[0]:
            grad_cols = torch.matmul(matrices.transpose(-1, -2), grads)
            grad_input = F.fold(grad_cols.reshape(n, -1, grad_cols.shape[-1]), (h, w),
                                geom.kernel_size, geom.dilation, geom.padding, geom.stride)
        if needs[1]:
            grad_kernels = torch.matmul(grads, _unfold(input, geom).transpose(-1, -2))
            grad_kernels = grad_kernels.reshape(kernels.shape)
        return grad_input, grad_kernels
    grad_input, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, n * o, *grad_output.shape[2:]), input.reshape(1, n * c, h, w),
        kernels.reshape(n * o, *kernels.shape[2:]), None, list(geom.stride),
        list(geom.padding), list(geom.dilation), False, [0, 0], n * geom.groups,
        [needs[0], needs[1], False])
    grad_input = grad_input.view_as(input) if needs[0] else None
    grad_kernels = grad_kernels.view_as(kernels) if needs[1] else None
    return grad_input, grad_kernels


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool], autograd_enabled) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset); autograd_enabled is a context manager
    that lets autograd record inside a custom-op kernel."""
    with autograd_enabled():
        weight_leaf = weight.detach().requires_grad_(bool(needs[1]))
        offset_leaf = offset.detach().requires_grad_(bool(needs[2]))
        kernels = _resample(weight_leaf, offset_leaf, geom)
    need_kernels = bool(needs[1] or needs[2])
    grad_input, grad_kernels = _conv_backward(
        grad_output, input, kernels.detach(), geom, [bool(needs[0]), need_kernels])
    grad_weight = grad_offset = None
    if need_kernels:
        wanted = [t for t in (weight_leaf, offset_leaf) if t.requires_grad]
        with autograd_enabled():
            grads = list(torch.autograd.grad(kernels, wanted, grad_kernels))
        grad_weight = grads.pop(0) if needs[1] else None
        grad_offset = grads.pop(0) if needs[2] else None
    return [grad_input, grad_weight, grad_offset]
