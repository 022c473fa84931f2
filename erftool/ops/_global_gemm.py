"""Global Deformable Kernel as batched matrix products: each image's
resampled kernel times that image's gathered input windows (the form for
GPUs, where cuBLAS runs batched products near the speed of one large one,
while cuDNN's grouped convolution with the batch folded into the groups, and
a product per tap on strided windows, ran 5-50x slower than conv2d on an
H100; see benchmarks/RESULTS.md).

The columns hold every tap's window of the padded input, gathered in one
strided copy. Two layouts of the same arithmetic, chosen by which extra
tensor is smaller:
  * "one_product": one product per image and group,
    (C_out/g, K*C_in/g) @ (K*C_in/g, L), with the kernels re-laid tap-minor
    first (a copy of the kernels): when the channels per group are fewer
    than the output positions;
  * "tap_sums": one product per image, group and tap,
    (C_out/g, C_in/g) @ (C_in/g, L), and the K partial outputs summed
    afterwards (in float32 for the half types): no copy of the kernels,
    which then outweigh the image.
On an H100 (fp32, N 32) this rule picked the faster layout at all four
ResNet-stage shapes. A third layout, per-tap products reading the padded
input in place (no gathered copy), was slower at all four and was dropped.
The forward is native (native/composite/global_gemm.cpp: the same ATen
operations issued from C++, for host time), and draws its scope coefficients
densely as tents, max(0, 1 - |p - i|) per axis. The backward, here, uses the
gathered columns with the one-product layout (two batched products, the
input gradient added back window by window) and _global_kernel's corners,
whose autograd gives the offset gradient.
Images go in chunks that keep the columns and kernels under _CHUNK_BYTES.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _args
from . import _global_kernel as gk

_CHUNK_BYTES = 256 << 20


def layout(input: Tensor, weight: Tensor, geom: _args.Geometry) -> str:
    """Which layout the forward takes (see above)."""
    positions = geom.out_size[0] * geom.out_size[1]
    return "tap_sums" if weight.shape[1] >= positions else "one_product"


def _columns(input: Tensor, geom: _args.Geometry) -> Tensor:
    """The windows every tap reads, in one copy: (N, groups, K, C/groups, L),
    L = H_out * W_out (the forward's gathered_columns, in Python)."""
    xp = gk._padded(input, geom).contiguous()
    n, c = xp.shape[:2]
    gr = geom.groups
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel_size, geom.stride, geom.dilation
    ho, wo = geom.out_size
    s_n, s_c, s_y, s_x = xp.stride()
    windows = xp.as_strided((n, gr, kh, kw, c // gr, ho, wo),
                            (s_n, c // gr * s_c, dh * s_y, dw * s_x, s_c, sh * s_y, sw * s_x))
    return windows.reshape(n, gr, kh * kw, c // gr, ho * wo)


def _images_per_chunk(input: Tensor, weight: Tensor, geom: _args.Geometry) -> int:
    """Images whose columns, kernels (every offset group's candidates, and a
    re-laid copy) and partial outputs fit _CHUNK_BYTES (float32 or wider)."""
    o, cg = weight.shape[:2]
    positions = geom.out_size[0] * geom.out_size[1]
    per_image = geom.taps * (input.shape[1] * positions + o * cg * (geom.offset_groups + 1)
                             + o * positions)
    return max(1, _CHUNK_BYTES // (per_image * max(4, input.element_size())))


def _image_chunks(input: Tensor, weight: Tensor, geom: _args.Geometry):
    step, n = _images_per_chunk(input, weight, geom), input.shape[0]
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _kernels(weight: Tensor, coef: Tensor, rows: Optional[Tensor], dtype) -> Tensor:
    """Per-image kernels (N, K, M) from dense coefficients coef (N, G, K, S),
    M = C_out * C_in/groups (the forward's per_image_kernels, in Python)."""
    acc = gk._accumulation_dtype(dtype)
    n, g, k, cells = coef.shape
    m = weight.shape[0] * weight.shape[1]
    every = coef.to(acc).transpose(1, 2).reshape(-1, cells).mm(
        weight.to(acc).reshape(m, cells).t()).view(-1, g, m)
    if rows is None:
        kt = every[:, 0]
    else:
        kt = every.gather(1, rows.view(1, 1, -1).expand(every.shape[0], 1, -1))
    return kt.reshape(n, k, m).to(dtype)


def _tap_minor(kt: Tensor, o: int, geom: _args.Geometry) -> Tensor:
    """(N, K, C_out*C_in/g) kernels as (N*g, C_out/g, K*C_in/g) matrices."""
    n, gr = kt.shape[0], geom.groups
    return kt.view(n, geom.taps, gr, o // gr, -1).permute(0, 2, 3, 1, 4).reshape(
        n * gr, o // gr, -1)


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    out = torch.ops.erftool_native.global_gemm_forward(
        input.contiguous(), weight.contiguous(), offset.contiguous(),
        gk._row_groups(weight, geom.groups, geom.offset_groups), list(geom.kernel_size),
        list(geom.stride), list(geom.padding), list(geom.dilation), geom.groups,
        geom.offset_groups, layout(input, weight, geom), _images_per_chunk(input, weight, geom))
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
        cols = _columns(input[images], geom)
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
