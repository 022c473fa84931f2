"""Global Deformable Kernel without data offsets: resample the kernel once per
image, then convolve each image with its own kernel.

The per-image kernels come from one native op on every device,
erftool_native::global_kernels (each value the bilinear sample of its scope
plane at math::global_kernel_corners, native/include/erftool/deform_math.h),
channel-major (the weights of a grouped convolution) or tap-major (one
contiguous batch of matrices per tap); the scope-weight and offset gradients
from the kernels' gradient through erftool_native::global_kernels_backward.
On CPU (and for depthwise layers on GPUs) each image is then convolved with
its kernels by a grouped convolution with the batch folded into the groups,
in chunks of images that bound the kernels' memory; when one chunk holds
the batch, a forward with gradients keeps its kernels for the backward
(keeps_kernels). A tap-by-tap form
(batched matrix products per tap, once chosen on small maps with many
channels) lost to it at every shape timed (benchmarks/RESULTS.md), and was
dropped. On GPUs the per-image convolution is batched matrix products of each
image's kernel with its input windows (erftool/ops/_global_gemm.py).
Forward and backward are written out by hand: no autograd graph.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _args, _backend, _global_gemm, _native, reference


# ---------------------------------------------------------------- per-image kernels

def _kernels(weight: Tensor, offset: Tensor, geom: _args.Geometry, tap_major: bool) -> Tensor:
    """(N, C_out, C_in/groups, K) or, tap-major, (K, N, C_out, C_in/groups)."""
    return torch.ops.erftool_native.global_kernels(
        weight.contiguous(), offset.contiguous(), list(geom.kernel_size), geom.groups,
        geom.offset_groups, tap_major)


def _kernel_grads(grad_kernels: Tensor, weight: Tensor, offset: Tensor, geom: _args.Geometry,
                  tap_major: bool, needs: List[bool]):
    """(grad_weight, grad_offset) of _kernels, each None unless needed."""
    return torch.ops.erftool_native.global_kernels_backward(
        grad_kernels.contiguous(), weight.contiguous(), offset.contiguous(),
        list(geom.kernel_size), geom.groups, geom.offset_groups, tap_major, needs)


class _ResampleKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, offset, geom):
        ctx.save_for_backward(weight, offset)
        ctx.geom = geom
        return _kernels(weight, offset, geom, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, offset = ctx.saved_tensors
        grad_weight, grad_offset = _kernel_grads(grad, weight, offset, ctx.geom, False,
                                                 list(ctx.needs_input_grad[:2]))
        return grad_weight, grad_offset, None


def resample_kernel(weight: Tensor, offset: Tensor, kernel_size, offset_groups: int = 1,
                    groups: int = 1) -> Tensor:
    """Per-image kernels (N, C_out, C_in/groups, K_h, K_w), differentiable:
    the native op, or the reference (the oracle it is tested against) where
    the backend in force (use_backend, ERFTOOL_BACKEND) resolves to it."""
    kernel_size = _args.check_resample_kernel(weight, offset, kernel_size, offset_groups, groups)
    if _backend.resolve(None, weight) == "reference":
        return reference.resample_kernel(weight, offset, kernel_size, offset_groups, groups)
    geom = _args.Geometry(kernel_size, (1, 1), (0, 0), (1, 1), groups, offset_groups, 1, (1, 1))
    kernels = _ResampleKernel.apply(weight, offset, geom)
    return kernels.view(*kernels.shape[:3], *kernel_size)


# ---------------------------------------------------------------- per-image convolution

def _images_per_chunk(weight: Tensor, taps: int) -> int:
    """Images whose kernels fit _native.chunk_bytes() (the backward holds
    their gradient too, as much again): they outweigh the images on small maps
    with many channels (19 MB for 8 images of 256 -> 256)."""
    per_image = weight.shape[0] * weight.shape[1] * taps * max(4, weight.element_size())
    return max(1, _native.chunk_bytes() // per_image)


def _image_chunks(input: Tensor, weight: Tensor, geom: _args.Geometry) -> List[slice]:
    """Slices of the batch of _images_per_chunk images each."""
    n, step = input.shape[0], _images_per_chunk(weight, geom.taps)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _batch_in_groups(t: Tensor) -> Tensor:
    """(N, C, H, W) as one image of N*C channels: the grouped convolution's view."""
    return t.reshape(1, -1, *t.shape[2:])


def _as_conv_weight(kernels: Tensor, weight: Tensor, geom: _args.Geometry) -> Tensor:
    """Channel-major kernels (n, C_out, C_in/groups, K) as the grouped
    convolution's weight (n*C_out, C_in/groups, K_h, K_w)."""
    return kernels.view(-1, weight.shape[1], *geom.kernel_size)


def _joined(parts: List[Tensor]) -> Tensor:
    """The chunks' results along the batch (no copy for a single chunk)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def form(input: Tensor, weight: Tensor) -> str:
    """How the per-image convolution runs: "gemm" (batched matrix products,
    erftool/ops/_global_gemm.py) on GPUs, "conv" (a grouped convolution with
    the batch folded into the groups) on CPU."""
    if input.is_cuda:
        # Depthwise layers keep the grouped convolution: with the batch folded
        # into the groups it is still a depthwise convolution, which cuDNN runs
        # near memory speed, where the batched products would be matrix-vector
        # products over a gathered copy K times the input. (Reasoned, not yet
        # measured: benchmarks/bench_gpu.py's depthwise shape compares them.)
        return "conv" if weight.shape[1] == 1 else "gemm"
    return "conv"


def _convolve(input: Tensor, kernels: Tensor, weight: Tensor, geom: _args.Geometry) -> Tensor:
    """Each image of `input` convolved with its channel-major kernels, the
    weights of a grouped convolution with the batch folded into the groups."""
    count = kernels.shape[0]
    out = F.conv2d(_batch_in_groups(input), _as_conv_weight(kernels, weight, geom), None,
                   geom.stride, geom.padding, geom.dilation, count * geom.groups)
    return out.view(count, weight.shape[0], *geom.out_size)


def _with_bias(out: Tensor, bias: Optional[Tensor]) -> Tensor:
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    if form(input, weight) == "gemm":
        return _global_gemm.forward(input, weight, offset, bias, geom)
    outs = [_convolve(input[images], _kernels(weight, offset[images], geom, False), weight, geom)
            for images in _image_chunks(input, weight, geom)]
    return _with_bias(_joined(outs), bias)


def keeps_kernels(input: Tensor, weight: Tensor, kernel_size) -> bool:
    """Whether a forward with gradients hands its kernels to the backward
    instead of the backward resampling them: in the grouped-convolution form,
    when every image's kernels fit one chunk, so that at most
    _native.chunk_bytes() are held between the passes. (Resampling them costs
    1.2-1.9 ms at 8 x 256 -> 256 channels on 14 x 14, 3-4 % of the op's
    forward+backward on the 2-core EPYC.)"""
    taps = kernel_size[0] * kernel_size[1]
    return 0 < input.shape[0] <= _images_per_chunk(weight, taps) \
        and form(input, weight) == "conv"


def forward_keeping_kernels(input: Tensor, weight: Tensor, offset: Tensor,
                            bias: Optional[Tensor], geom: _args.Geometry) -> Tuple[Tensor, Tensor]:
    """forward() and the channel-major kernels (N, C_out, C_in/groups, K) it
    convolved with, for backward(kernels=...); see keeps_kernels."""
    kernels = _kernels(weight, offset, geom, False)
    return _with_bias(_convolve(input, kernels, weight, geom), bias), kernels


def _conv_backward(grad_output, input, weight, offset, geom, needs, kept):
    """(grad_input, grad_weight, grad_offset) of the grouped-convolution form,
    chunk by chunk: the kernels (kept by the forward, or resampled), the
    grouped convolution's input and kernel gradients, and from the latter the
    scope-weight and offset gradients."""
    need_input, need_weight, need_offset = needs
    need_kernels = need_weight or need_offset
    grad_inputs = []
    grad_weight = None  # the first chunk's, then the others added in
    grad_offset = torch.empty_like(offset) if need_offset else None
    for images in _image_chunks(input, weight, geom):
        kernels = kept[images] if kept is not None else \
            _kernels(weight, offset[images], geom, False)
        count = kernels.shape[0]
        grad_input, grad_kernels, _ = torch.ops.aten.convolution_backward(
            _batch_in_groups(grad_output[images]), _batch_in_groups(input[images]),
            _as_conv_weight(kernels, weight, geom), None, list(geom.stride),
            list(geom.padding), list(geom.dilation), False, [0, 0], count * geom.groups,
            [need_input, need_kernels, False])
        if need_input:
            grad_inputs.append(grad_input.view_as(input[images]))
        if need_kernels:
            part_weight, part_offset = _kernel_grads(grad_kernels.view(kernels.shape), weight,
                                                     offset[images], geom, False,
                                                     [need_weight, need_offset])
            if need_weight:
                grad_weight = part_weight if grad_weight is None else \
                    grad_weight.add_(part_weight)
            if need_offset:
                grad_offset[images] = part_offset
    return _joined(grad_inputs) if need_input else None, grad_weight, grad_offset


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool],
             kernels: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset), None where needs says so; `kernels`
    those of forward_keeping_kernels, if it ran."""
    wanted = [bool(x) for x in needs[:3]]
    if form(input, weight) == "gemm":
        return _global_gemm.backward(grad_output, input, weight, offset, geom, wanted)
    return list(_conv_backward(grad_output, input, weight, offset, geom, wanted, kernels))
