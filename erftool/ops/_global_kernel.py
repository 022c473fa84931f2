"""Global Deformable Kernel without data offsets: resample the kernel once per
image, then convolve each image with its own kernel.

The per-image kernels come from one native op on every device,
erftool_native::global_kernels (each value the bilinear sample of its scope
plane at math::global_kernel_corners, native/include/erftool/deform_math.h),
channel-major (the weights of a grouped convolution) or tap-major (one
contiguous batch of matrices per tap); the scope-weight and offset gradients
from the kernels' gradient through erftool_native::global_kernels_backward.
The per-image convolution then takes one of two forms on CPU, chosen by
which tensor is larger:
  * a grouped convolution with the batch folded into the groups, when the
    image outweighs its kernel (the common case: large maps, few channels);
  * one batched matrix product per tap, of that tap's per-image kernels
    with a strided window of the padded input (no im2col buffer), by chunks
    of images, when the kernels outweigh the image (many channels on a small
    map, where a convolution library spends its time re-laying out N
    different weight tensors); its running sums are float32 for half types.
On GPUs a third form runs instead, depthwise layers excepted (form()):
batched matrix products of each image's kernel with its input windows
(erftool/ops/_global_gemm.py).
Forward and backward are written out by hand: no autograd graph.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _args, _backend, _global_gemm, reference


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

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The tap-by-tap form keeps its running sums in float32 for the half types:
    stored in half between taps they would be rounded to 8-11 bits nine times."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _kernels_outweigh_image(channels_per_group: int, geom: _args.Geometry) -> bool:
    return channels_per_group * geom.taps > geom.out_size[0] * geom.out_size[1]


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


def _tap_values(xp: Tensor, window, geom: _args.Geometry) -> Tensor:
    """Tap values of every output position as a batch of (N*groups) (C_in/groups, L)."""
    n, c = xp.shape[:2]
    return window(xp).reshape(n * geom.groups, c // geom.groups, -1)


# The tap-by-tap form holds every tap's kernels of a chunk of images at once
# (N*K*C_out*C_in/groups values: 19 MB for 8 images of 256 channels); chunks
# of images keep that buffer under this many bytes whatever the batch.
_KERNEL_CHUNK_BYTES = 64 << 20


def _image_chunks(n: int, weight: Tensor, geom: _args.Geometry):
    per_image = weight.numel() // (weight.shape[2] * weight.shape[3]) * geom.taps \
        * weight.element_size()
    step = max(1, _KERNEL_CHUNK_BYTES // per_image)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _tap_matrices(kernels: Tensor, geom: _args.Geometry) -> Tensor:
    """Tap-major kernels as (K, N*groups, C_out/groups, C_in/groups)."""
    return kernels.view(geom.taps, -1, kernels.shape[2] // geom.groups, kernels.shape[3])


def _tapwise_forward(input, weight, offset, geom):
    """sum over taps of (per-image tap kernel) @ (input window), by chunks of
    images: no im2col buffer."""
    n, o, gr = input.shape[0], weight.shape[0], geom.groups
    xp = _padded(input, geom)
    out = input.new_zeros(n, o, geom.out_size[0] * geom.out_size[1])
    for images in _image_chunks(n, weight, geom):
        kernels = _tap_matrices(_kernels(weight, offset[images], geom, True), geom)
        part, part_xp = out[images].view(-1, o // gr, out.shape[-1]), xp[images]
        for k, window in _tap_windows(geom):
            part.baddbmm_(kernels[k], _tap_values(part_xp, window, geom))
    return out


def form(input: Tensor, weight: Tensor, geom: _args.Geometry) -> str:
    """How the per-image convolution runs: "gemm" (batched matrix products,
    erftool/ops/_global_gemm.py) on GPUs; on CPU "tapwise" or "conv" (above)."""
    if input.is_cuda:
        # Depthwise layers keep the grouped convolution: with the batch folded
        # into the groups it is still a depthwise convolution, which cuDNN runs
        # near memory speed, where the batched products would be matrix-vector
        # products over a gathered copy K times the input. (Reasoned, not yet
        # measured: benchmarks/bench_gpu.py's depthwise shape compares them.)
        return "conv" if weight.shape[1] == 1 else "gemm"
    return "tapwise" if _kernels_outweigh_image(weight.shape[1], geom) else "conv"


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    chosen = form(input, weight, geom)
    if chosen == "gemm":
        return _global_gemm.forward(input, weight, offset, bias, geom)
    n, c, h, w = input.shape
    o = weight.shape[0]
    if chosen == "tapwise":
        acc = _accumulation_dtype(input.dtype)
        out = _tapwise_forward(input.to(acc), weight.to(acc), offset.to(acc), geom)
        out = out.to(input.dtype)
    else:  # channel-major kernels are the grouped convolution's weights
        kernels = _kernels(weight, offset, geom, False).view(n * o, -1, *geom.kernel_size)
        out = F.conv2d(input.reshape(1, n * c, h, w), kernels, None, geom.stride, geom.padding,
                       geom.dilation, n * geom.groups)
    out = out.reshape(n, o, *geom.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _tapwise_backward(grad_output, input, weight, offset, geom, needs):
    """(grad_input, grad_weight, grad_offset) of _tapwise_forward, by chunks of
    images: two batched products per tap. Each tap's kernel gradient
    overwrites that tap's kernels once they have served the input gradient
    (one buffer the size of the kernels: a second one made the allocator hand
    memory back to the system and page-fault it in again on every call); the
    scope-weight and offset gradients then take one pass over it."""
    need_input, need_weight, need_offset = needs
    n, c, h, w = input.shape
    o, gr = weight.shape[0], geom.groups
    xp = _padded(input, geom)
    grad_xp = torch.zeros_like(xp) if need_input else None
    grad_weight = weight.new_zeros(weight.shape) if need_weight else None
    grad_offset = torch.empty_like(offset) if need_offset else None
    for images in _image_chunks(n, weight, geom):
        kernels = _kernels(weight, offset[images], geom, True)
        matrices = _tap_matrices(kernels, geom)
        grads = grad_output[images].reshape(-1, o // gr, grad_output[0, 0].numel())
        part_xp = xp[images]
        for k, window in _tap_windows(geom):
            if need_input:
                window(grad_xp[images]).add_(torch.bmm(matrices[k].transpose(1, 2), grads).view(
                    -1, c, *geom.out_size))
            if need_weight or need_offset:  # tap k's kernels are not read again: overwrite them
                torch.bmm(grads, _tap_values(part_xp, window, geom).transpose(1, 2),
                          out=matrices[k])
        if need_weight or need_offset:  # `kernels` now holds the kernel gradients
            part_weight, part_offset = _kernel_grads(kernels, weight, offset[images], geom, True,
                                                     [need_weight, need_offset])
            if need_weight:
                grad_weight += part_weight
            if need_offset:
                grad_offset[images] = part_offset
    grad_input = None
    if need_input:
        ph, pw = geom.padding
        grad_input = grad_xp[:, :, ph:ph + h, pw:pw + w].contiguous()
    return grad_input, grad_weight, grad_offset


def _conv_backward(grad_output, input, weight, offset, geom, needs):
    """(grad_input, grad_weight, grad_offset) of the grouped-convolution form."""
    need_input, need_weight, need_offset = needs
    n, c, h, w = input.shape
    o = weight.shape[0]
    kernels = _kernels(weight, offset, geom, False)
    need_kernels = need_weight or need_offset
    grad_input, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, n * o, *grad_output.shape[2:]), input.reshape(1, n * c, h, w),
        kernels.view(n * o, -1, *geom.kernel_size), None, list(geom.stride),
        list(geom.padding), list(geom.dilation), False, [0, 0], n * geom.groups,
        [need_input, need_kernels, False])
    grad_input = grad_input.view_as(input) if need_input else None
    grad_weight = grad_offset = None
    if need_kernels:
        grad_weight, grad_offset = _kernel_grads(grad_kernels.view(kernels.shape), weight,
                                                 offset, geom, False, [need_weight, need_offset])
    return grad_input, grad_weight, grad_offset


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool]) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset), None where needs says so."""
    wanted = [bool(x) for x in needs[:3]]
    chosen = form(input, weight, geom)
    if chosen == "gemm":
        return _global_gemm.backward(grad_output, input, weight, offset, geom, wanted)
    if chosen == "conv":
        return list(_conv_backward(grad_output, input, weight, offset, geom, wanted))
    acc = _accumulation_dtype(input.dtype)
    grads = _tapwise_backward(grad_output.to(acc), input.to(acc), weight.to(acc),
                              offset.to(acc), geom, wanted)
    return [None if g is None else g.to(like.dtype)
            for g, like in zip(grads, (input, weight, offset))]
