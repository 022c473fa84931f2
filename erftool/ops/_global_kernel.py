"""Global Deformable Kernel without data offsets: resample the kernel once per
image, then convolve each image with its own kernel.

Each resampled kernel row (image, tap, offset group) is a bilinear sample of
the scope: a weighted sum of four scope cells, over m = (C_out, C_in/groups).
The native CPU kernel (native/cpu/scope_resample_cpu.cpp) computes exactly
that; elsewhere, and under autograd, a dense (rows, S) @ (S, M) product does.
The grouped-convolution form's forward takes its kernels, already laid out as
the convolution's weights, from erftool_native::global_kernels (one native op
on every device, instead of the corner and resampling steps).
The per-image convolution then takes one of two forms, chosen by which
tensor is larger:
  * a grouped convolution with the batch folded into the groups, when the
    image outweighs its kernel (the common case: large maps, few channels);
  * one batched matrix product per tap, of that tap's per-image kernels
    (tap-major, contiguous per tap, drawn for a chunk of images at a time)
    with a strided window of the padded input (no im2col buffer), when the
    kernels outweigh the image (many channels on a small map, where a
    convolution library spends its time re-laying out N different weight
    tensors); its running sums are float32 for half types.
On GPUs a third form runs instead, depthwise layers excepted (form()):
batched matrix products of each image's kernel with its input windows
(erftool/ops/_global_gemm.py).
Forward and backward are written out by hand (no autograd graph over large
tensors); only the tiny offset -> corner-weight step goes through autograd.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args, _global_gemm, _native, reference


# ---------------------------------------------------------------- resampling

class _Corners(NamedTuple):
    """The four scope cells each (image, offset group, tap) reads, as flat
    cell indices and bilinear weights, each (N, G, K, 4) or a permutation of
    the leading three dimensions."""

    index: Tensor
    weight: Tensor

    def permute(self, *dims: int) -> "_Corners":
        return _Corners(self.index.permute(*dims, -1), self.weight.permute(*dims, -1))

    def images(self, part: slice) -> "_Corners":
        return _Corners(self.index[part], self.weight[part])

    def detach_to(self, dtype: torch.dtype) -> "_Corners":
        return _Corners(self.index, self.weight.detach().to(dtype))

    def dense(self, cells: int) -> Tensor:
        """(..., cells) coefficients: reference.scope_coefficients' layout."""
        zeros = self.weight.new_zeros(*self.weight.shape[:-1], cells)
        return zeros.scatter_add(-1, self.index, self.weight)


def _centred_taps(kernel_size, scope, like: Tensor) -> Tensor:
    """(K, 2): the scope position (row, col) tap (a, b) samples at zero offset,
    (a + (S_h - K_h)/2, b + (S_w - K_w)/2), row-major taps. Built on the
    device: a small tensor copied from the host would make the host wait for
    the device's queue to drain first."""
    (kh, kw), (sh, sw) = kernel_size, scope
    rows = torch.arange(kh, dtype=like.dtype, device=like.device) + (sh - kh) / 2
    cols = torch.arange(kw, dtype=like.dtype, device=like.device) + (sw - kw) / 2
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def _corner_steps(like: Tensor):
    """(rows, cols), each (4,): corner j of a bilinear sample lies (j // 2, j % 2)
    cells below / right of its floor (built on the device, as above)."""
    j = torch.arange(4, dtype=like.dtype, device=like.device)
    return (j / 2).floor(), j.remainder(2)


def _corners(offset: Tensor, kernel_size, scope, offset_groups: int) -> _Corners:
    """Corners of the scope sample of every (image, offset group, tap), the four
    at once: these tensors are tiny and each op costs microseconds. (A global
    DK forward+backward of 1 x 4 x 6 x 6 took 2.4 / 4.1 ms with a loop over the
    corners, 1.7 / 3.1 ms with this, in two interleaved rounds.)
    Cells outside the scope weigh 0; so does every corner of a sample at <= -1
    or >= S on an axis, or a NaN / infinite one (its index is clamped valid)."""
    (sh, sw), taps = scope, kernel_size[0] * kernel_size[1]
    pos = offset.reshape(offset.shape[0], offset_groups, taps, 2) + _centred_taps(
        kernel_size, scope, offset)
    y, x = pos[..., :1], pos[..., 1:]  # (N, G, K, 1): broadcast against the 4 corners
    inside = (y > -1) & (x > -1) & (y < sh) & (x < sw)
    y, x = torch.where(inside, y, 0.0), torch.where(inside, x, 0.0)  # no NaN past here
    y0, x0 = y.detach().floor(), x.detach().floor()
    dy, dx = _corner_steps(y)
    cy, cx = y0 + dy, x0 + dx  # (N, G, K, 4) corner cells
    # Linear in the fraction (1 - f for the floor corner, f for the next one):
    # the slope stays exact at integer positions, where f = 0.
    wy = (1 - dy) + (y - y0) * (2 * dy - 1)
    wx = (1 - dx) + (x - x0) * (2 * dx - 1)
    valid = inside & (cy >= 0) & (cy < sh) & (cx >= 0) & (cx < sw)
    index = (cy.clamp(0, sh - 1) * sw + cx.clamp(0, sw - 1)).long()
    return _Corners(index, wy * wx * valid)


def _row_groups(weight: Tensor, groups: int, offset_groups: int) -> Optional[Tensor]:
    """Offset group of every kernel row m = (o, c), or None with one group."""
    if offset_groups == 1:
        return None
    o, cg = weight.shape[:2]
    return reference.kernel_row_groups(o, cg, groups, offset_groups, weight.device).reshape(-1)


def _native_resampling(weight: Tensor, corners: _Corners) -> bool:
    """Whether the native CPU kernel draws the kernels (four weighted scope
    rows per sample, no autograd); elsewhere a dense matrix product does."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and not (torch.is_grad_enabled()
                     and (weight.requires_grad or corners.weight.requires_grad))
            and _native.load_native() is not None)


# On CPU, MKL's sgemm slows down sharply with the number of rows of a product
# with a short inner dimension: (B, 16) @ (16, 65536) took 0.45 ms for B = 8,
# 7.8 ms for B = 72 and 31 ms for B = 256 whole, 3.9 and 12.6 ms in blocks of
# 16 rows (2-core EPYC, fp32, output preallocated).
_ROW_BLOCK = 16


def _times_weight(coef: Tensor, weight: Tensor) -> Tensor:
    """coef (B, S) @ weight (M, S)^T -> (B, M), by row blocks on CPU."""
    b = coef.shape[0]
    if not coef.is_cpu or b <= _ROW_BLOCK:
        return coef.mm(weight.t())
    starts = range(0, b, _ROW_BLOCK)
    if torch.is_grad_enabled() and (coef.requires_grad or weight.requires_grad):
        return torch.cat([coef[i:i + _ROW_BLOCK].mm(weight.t()) for i in starts], 0)
    out = coef.new_empty(b, weight.shape[0])
    for i in starts:
        torch.mm(coef[i:i + _ROW_BLOCK], weight.t(), out=out[i:i + _ROW_BLOCK])
    return out


def _resample(weight: Tensor, corners: _Corners, rows: Optional[Tensor]) -> Tensor:
    """Kernels (..., M) drawn at corners (..., G, 4): every sample of every
    offset group in one pass over the weight, then each row m keeps its own
    offset group's candidate."""
    *lead, g, _ = corners.index.shape
    cells, m = weight.shape[2] * weight.shape[3], weight.shape[0] * weight.shape[1]
    if _native_resampling(weight, corners):
        index = corners.index.reshape(-1, 4).contiguous()
        # Allocated here, not in the kernel: an output allocated inside it
        # page-faulted on every call (2,000-5,000 faults per forward+backward).
        every = weight.new_empty(index.shape[0], m)
        torch.ops.erftool_native.scope_resample(
            weight.reshape(m, cells), index, corners.weight.reshape(-1, 4).contiguous(), every)
    else:
        every = _times_weight(corners.dense(cells).reshape(-1, cells), weight.reshape(m, cells))
    every = every.view(-1, g, m)
    if rows is None:
        return every[:, 0].view(*lead, -1)
    return every.gather(1, rows.view(1, 1, -1).expand(every.shape[0], 1, -1)).view(*lead, -1)


def resample_kernel(weight: Tensor, offset: Tensor, kernel_size, offset_groups: int = 1,
                    groups: int = 1) -> Tensor:
    """Per-image kernels (N, C_out, C_in/groups, K_h, K_w), differentiable by
    autograd (reference.resample_kernel is the oracle it is tested against)."""
    kernel_size = _args.pair("resample_kernel", "kernel_size", kernel_size, 1)
    o, cg = weight.shape[:2]
    corners = _corners(offset, kernel_size, tuple(weight.shape[2:]), offset_groups)
    kt = _resample(weight, corners.permute(0, 2, 1), _row_groups(weight, groups, offset_groups))
    return kt.view(offset.shape[0], *kernel_size, o, cg).permute(0, 3, 4, 1, 2).contiguous()


def _resample_backward(grad_kernels: Tensor, weight: Tensor, corners: _Corners,
                       rows: Optional[Tensor], grad_weight: Optional[Tensor],
                       need_corners: bool) -> Optional[Tensor]:
    """Backward of _resample from the gradient of its output (..., M): adds the
    scope-weight gradient into grad_weight (when given) and returns that of
    the corner weights (when needed)."""
    *lead, g, _ = corners.index.shape
    cells, m = weight.shape[2] * weight.shape[3], weight.shape[0] * weight.shape[1]
    grad = grad_kernels.reshape(-1, m)
    if rows is not None:  # every group's candidates, zero where a row is another group's
        grad = grad.new_zeros(grad.shape[0], g, m).scatter_(
            1, rows.view(1, 1, -1).expand(grad.shape[0], 1, -1), grad.unsqueeze(1))
    grad = grad.reshape(-1, m)
    if _native_resampling(weight, corners):
        grad_corners = torch.ops.erftool_native.scope_resample_backward(
            grad.contiguous(), weight.reshape(m, cells),
            corners.index.reshape(-1, 4).contiguous(), corners.weight.reshape(-1, 4).contiguous(),
            grad.new_empty(0) if grad_weight is None else grad_weight.view(m, cells),
            need_corners)
        return grad_corners.view(corners.weight.shape) if need_corners else None
    coef = corners.dense(cells).reshape(-1, cells)
    if grad_weight is not None:  # by row blocks, as in _times_weight
        step = _ROW_BLOCK if grad.is_cpu else grad.shape[0]
        for i in range(0, grad.shape[0], step):
            grad_weight.view(m, cells).addmm_(grad[i:i + step].t(), coef[i:i + step])
    if need_corners:
        return grad.mm(weight.reshape(m, cells)).view(*lead, g, cells).gather(-1, corners.index)
    return None


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


def _tap_major_kernels(weight: Tensor, corners: _Corners, rows: Optional[Tensor],
                       geom: _args.Geometry) -> Tensor:
    """Every tap's per-image kernels in one product, (K, N*groups, C_out/groups,
    C_in/groups): tap k's slice is one contiguous batch of matrices."""
    n, o, gr = corners.index.shape[0], weight.shape[0], geom.groups
    return _resample(weight, corners.permute(2, 0, 1), rows).view(
        geom.taps, n * gr, o // gr, -1)


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
        * weight.element_size() * geom.offset_groups  # _resample's every-group candidates
    step = max(1, _KERNEL_CHUNK_BYTES // per_image)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _tapwise_forward(input, weight, corners, rows, geom):
    """sum over taps of (per-image tap kernel) @ (input window), by chunks of
    images: no im2col buffer."""
    n, o, gr = input.shape[0], weight.shape[0], geom.groups
    xp = _padded(input, geom)
    out = input.new_zeros(n, o, geom.out_size[0] * geom.out_size[1])
    for images in _image_chunks(n, weight, geom):
        kernels = _tap_major_kernels(weight, corners.images(images), rows, geom)
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
        corners = _corners(offset, geom.kernel_size, tuple(weight.shape[2:]), geom.offset_groups)
        rows = _row_groups(weight, geom.groups, geom.offset_groups)
        acc = _accumulation_dtype(input.dtype)
        out = _tapwise_forward(input.to(acc), weight.to(acc), corners.detach_to(acc), rows, geom)
        out = out.to(input.dtype)
    else:  # channel-major kernels are the grouped convolution's weights: one native op
        kernels = torch.ops.erftool_native.global_kernels(
            weight.contiguous(), offset.contiguous(), list(geom.kernel_size), geom.groups,
            geom.offset_groups, False).view(n * o, -1, *geom.kernel_size)
        out = F.conv2d(input.reshape(1, n * c, h, w), kernels, None, geom.stride, geom.padding,
                       geom.dilation, n * geom.groups)
    out = out.reshape(n, o, *geom.out_size)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _tapwise_backward(grad_output, input, weight, corners, rows, geom, needs):
    """(grad_input, grad_weight, grad_corner_weights) of _tapwise_forward, by chunks of
    images: two batched products per tap. Each tap's kernel gradient
    overwrites that tap's kernels once they have served the input gradient
    (one buffer the size of the kernels: a second one made the allocator hand
    memory back to the system and page-fault it in again on every call); the
    scope-weight and corner-weight gradients then take one pass over it."""
    need_input, need_weight, need_corners = needs
    n, c, h, w = input.shape
    o, gr = weight.shape[0], geom.groups
    xp = _padded(input, geom)
    grad_xp = torch.zeros_like(xp) if need_input else None
    grad_weight = weight.new_zeros(weight.shape) if need_weight else None
    grad_corners = torch.empty_like(corners.weight) if need_corners else None
    for images in _image_chunks(n, weight, geom):
        kernels = _tap_major_kernels(weight, corners.images(images), rows, geom)
        grads = grad_output[images].reshape(-1, o // gr, grad_output[0, 0].numel())
        part_xp = xp[images]
        for k, window in _tap_windows(geom):
            if need_input:
                window(grad_xp[images]).add_(torch.bmm(kernels[k].transpose(1, 2), grads).view(
                    -1, c, *geom.out_size))
            if need_weight or need_corners:  # tap k's kernels are not read again: overwrite them
                torch.bmm(grads, _tap_values(part_xp, window, geom).transpose(1, 2),
                          out=kernels[k])
        if need_weight or need_corners:  # `kernels` now holds the kernel gradients
            part = _resample_backward(
                kernels.view(geom.taps, grads.shape[0] // gr, -1), weight,
                corners.images(images).permute(2, 0, 1), rows, grad_weight, need_corners)
            if need_corners:
                grad_corners[images] = part.permute(1, 2, 0, 3)
    grad_input = None
    if need_input:
        ph, pw = geom.padding
        grad_input = grad_xp[:, :, ph:ph + h, pw:pw + w].contiguous()
    return grad_input, grad_weight, grad_corners


def _conv_backward(grad_output, input, weight, corners, rows, geom, needs):
    """(grad_input, grad_weight, grad_corner_weights) of the grouped-convolution form."""
    need_input, need_weight, need_corners = needs
    n, c, h, w = input.shape
    o = weight.shape[0]
    kt = _resample(weight, corners.permute(0, 2, 1), rows)
    need_kernels = need_weight or need_corners
    grad_input, grad_kernels, _ = torch.ops.aten.convolution_backward(
        grad_output.reshape(1, n * o, *grad_output.shape[2:]), input.reshape(1, n * c, h, w),
        _conv_kernels(kt, o, geom), None, list(geom.stride), list(geom.padding),
        list(geom.dilation), False, [0, 0], n * geom.groups, [need_input, need_kernels, False])
    grad_input = grad_input.view_as(input) if need_input else None
    grad_weight = grad_corners = None
    if need_kernels:  # back to tap-major
        grad_kt = grad_kernels.view(n, o, -1, geom.taps).permute(0, 3, 1, 2).reshape(kt.shape)
        grad_weight = weight.new_zeros(weight.shape) if need_weight else None
        grad_corners = _resample_backward(grad_kt, weight, corners.permute(0, 2, 1), rows,
                                          grad_weight, need_corners)
        if need_corners:
            grad_corners = grad_corners.transpose(1, 2)
    return grad_input, grad_weight, grad_corners


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool], autograd_enabled) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset); autograd_enabled is a context manager
    that lets autograd record inside a custom-op kernel (for the offset ->
    corner-weight step only)."""
    need_input, need_weight, need_offset = (bool(x) for x in needs[:3])
    wanted = [need_input, need_weight, need_offset]
    chosen = form(input, weight, geom)
    if chosen == "gemm":
        return _global_gemm.backward(grad_output, input, weight, offset, geom, wanted)
    with autograd_enabled():
        offset_leaf = offset.detach().requires_grad_(need_offset)
        corners = _corners(offset_leaf, geom.kernel_size, tuple(weight.shape[2:]),
                           geom.offset_groups)
    rows = _row_groups(weight, geom.groups, geom.offset_groups)
    if chosen == "tapwise":
        acc = _accumulation_dtype(input.dtype)
        grads = _tapwise_backward(grad_output.to(acc), input.to(acc), weight.to(acc),
                                  corners.detach_to(acc), rows, geom, wanted)
        grad_input, grad_weight, grad_corners = (
            None if g is None else g.to(like.dtype)
            for g, like in zip(grads, (input, weight, corners.weight)))
    else:
        grad_input, grad_weight, grad_corners = _conv_backward(
            grad_output, input, weight, corners.detach_to(weight.dtype), rows, geom, wanted)
    grad_offset = None
    if need_offset:
        with autograd_enabled():
            (grad_offset,) = torch.autograd.grad(corners.weight, offset_leaf, grad_corners)
    return [grad_input, grad_weight, grad_offset]
