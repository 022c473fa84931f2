"""Global Deformable Kernel as batched matrix products: each image's
resampled kernel times that image's input columns. This is the GPU form,
depthwise layers excepted (_global_kernel.form): on an H100, cuDNN's grouped
convolution with the batch folded into the groups, and per-tap products on
strided windows, ran 5-50x slower than conv2d, while cuBLAS runs a batch of
products near the speed of one large one (benchmarks/RESULTS.md).

The columns hold every tap's window of the padded input. Two layouts of the
same arithmetic:
  * "one_product": im2col's columns and one product per image and group,
    (C_out/g, C_in/g*K) @ (C_in/g*K, L), with channel-major kernels: when
    the channels per group are fewer than the output positions;
  * "tap_sums": the windows gathered tap-major in one strided copy, one
    product per image, group and tap, (C_out/g, C_in/g) @ (C_in/g, L), and
    the K partial outputs summed afterwards (in float32 for the half types),
    with tap-major kernels: otherwise (many channels on a small map).
On an H100 (fp32, N 32, ResNet-stage shapes) the rule picked the faster
layout at all four shapes in one call and at three in the next, where the
two differed by 5-15 % (host-bound timings). The one-product layout then
also paid a re-layout copy of the kernels, which global_kernels (below) no
longer needs, so the rule is due for a re-measurement (bench_gpu.py
--global-forms times both). A third layout, per-tap products reading the
padded input in place (no gathered copy), was slower than both at all four
shapes and was dropped.
Both passes are native (native/composite/global_gemm.cpp: ATen operations
issued from C++, for host time). Each chunk's kernels come from one native
kernel per device (erftool_native::global_kernels: a bilinear sample per
element, in either layout), and the weight and offset gradients from the
kernel gradient through its backward (erftool_native::global_kernels_backward:
the corners' weights and slopes, no dense coefficients). The backward uses
the one-product layout: two batched products per chunk, the input gradient
summed back from its columns by col2im. (After the H100 calls: im2col and
col2im replaced a strided gather and per-tap window additions, and the two
native ops about fifteen small operations each way (dense per-axis "tents"
of coefficients and slopes, their products, re-layouts); not yet timed on a
GPU.)
Images go in chunks that keep the columns and kernels under _native.chunk_bytes()
(ERFTOOL_CHUNK_MB, 256 by default), as the local DK's columns.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _args, _native


def layout(input: Tensor, weight: Tensor, geom: _args.Geometry) -> str:
    """Which layout the forward takes (see above)."""
    positions = geom.out_size[0] * geom.out_size[1]
    return "tap_sums" if weight.shape[1] >= positions else "one_product"


def _images_per_chunk(input: Tensor, weight: Tensor, geom: _args.Geometry) -> int:
    """Images whose columns, kernels and per-tap partial outputs fit
    chunk_bytes() (float32 or wider)."""
    o, cg = weight.shape[:2]
    positions = geom.out_size[0] * geom.out_size[1]
    per_image = geom.taps * (input.shape[1] * positions + o * cg + o * positions)
    return max(1, _native.chunk_bytes() // (per_image * max(4, input.element_size())))


def forward(input: Tensor, weight: Tensor, offset: Tensor, bias: Optional[Tensor],
            geom: _args.Geometry) -> Tensor:
    out = torch.ops.erftool_native.global_gemm_forward(
        input.contiguous(), weight.contiguous(), offset.contiguous(), list(geom.kernel_size),
        list(geom.stride), list(geom.padding), list(geom.dilation), geom.groups,
        geom.offset_groups, layout(input, weight, geom), _images_per_chunk(input, weight, geom))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def backward(grad_output: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
             geom: _args.Geometry, needs: List[bool]) -> List[Optional[Tensor]]:
    """Gradients (input, weight, offset), None where needs says so."""
    grads = torch.ops.erftool_native.global_gemm_backward(
        grad_output.contiguous(), input.contiguous(), weight.contiguous(), offset.contiguous(),
        list(geom.kernel_size), list(geom.stride), list(geom.padding), list(geom.dilation),
        geom.groups, geom.offset_groups, _images_per_chunk(input, weight, geom), list(needs))
    return list(grads)
