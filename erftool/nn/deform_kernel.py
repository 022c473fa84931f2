"""Deformable Kernel layers (Gao et al., ICLR 2020) with built-in offset generators.

Unlike the original code these work for any `groups` (not only depthwise),
initialise their own parameters, and the DK + DC layer learns *both* offset
fields (the original combined module passed no kernel offsets).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import ErftoolError
from ._base import (
    DeformableModule, LocalOffsets, as_pair, check_channels, conv_like_init, offset_generator,
)

__all__ = ["DeformKernel2d", "DeformKernelConv2d"]


class DeformKernel2d(DeformableModule):
    """K x K convolution whose kernel is resampled from a learned S x S scope.

    Args:
        scope: scope size S (int or pair); None means S = kernel_size, i.e. the
            layer equals a rigid conv at zero offsets.
        mode: "local" (offsets per output location from a rigid conv with the
            layer's kernel size, stride, padding and dilation) or "global"
            (offsets per image from global average pooling + a linear layer).
        offset_groups: G; input channels are split into G contiguous blocks,
            each with its own kernel offsets.

    Generators start at zero, so training starts from the centred resample
    (tap (a, b) reads scope cell (a + (S-K)/2, b + (S-K)/2)). The scope weight is
    drawn like nn.Conv2d's weight for a K x K kernel, scaled so that the
    *resampled* kernel has that variance (a half-cell resample averages cells).
    Parameters: `weight` (C_out, C_in/groups, S_h, S_w), `bias`, and
    `kernel_offset` (the generator).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, scope=None,
                 mode: str = "local", stride=1, padding=0, dilation=1, groups: int = 1,
                 offset_groups: int = 1, bias: bool = True):
        super().__init__()
        owner = type(self).__name__
        check_channels(owner, in_channels, out_channels, groups, offset_groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_pair(owner, "kernel_size", kernel_size, 1)
        self.scope = self.kernel_size if scope is None else as_pair(owner, "scope", scope, 1)
        if self.scope[0] < self.kernel_size[0] or self.scope[1] < self.kernel_size[1]:
            raise ErftoolError(f"{owner}: scope {self.scope} is smaller than kernel_size "
                               f"{self.kernel_size}")
        self.stride = as_pair(owner, "stride", stride, 1)
        self.padding = as_pair(owner, "padding", padding, 0)
        self.dilation = as_pair(owner, "dilation", dilation, 1)
        self.groups, self.offset_groups, self.mode = groups, offset_groups, mode
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.scope))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.kernel_offset = offset_generator(
            mode, in_channels, 2 * offset_groups * taps, self.kernel_size, self.stride,
            self.padding, self.dilation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        taps = self.kernel_size[0] * self.kernel_size[1]
        zero = torch.zeros(taps, 2, dtype=torch.float64)
        coef = ops.scope_coefficients(zero, self.kernel_size, self.scope)  # (taps, S2)
        shrink = float(coef.pow(2).sum(dim=1).mean())
        conv_like_init(self.weight, self.bias, (self.in_channels // self.groups) * taps,
                       gain=1 / math.sqrt(shrink))

    def _kernel_offsets(self, x: Tensor) -> Tensor:
        return self._policy(self.kernel_offset(x))

    def forward(self, x: Tensor, return_offsets: bool = False):
        offset = self._kernel_offsets(x)
        out = ops.deform_kernel2d(
            x, self.weight, offset, kernel_size=self.kernel_size, bias=self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, offset_groups=self.offset_groups)
        return self._finish(out, {"kernel": offset}, return_offsets)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"scope={self.scope}, mode={self.mode!r}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"offset_groups={self.offset_groups}, bias={self.bias is not None}")


class DeformKernelConv2d(DeformKernel2d):
    """DK + DC: the kernel is resampled from the scope (offsets from `kernel_offset`,
    local or global) *and* the data taps are read at shifted locations (offsets
    from `data_offset`, a zero-initialised local conv, torchvision layout with
    `data_offset_groups` groups). Both fields are learned.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, scope=None,
                 mode: str = "local", stride=1, padding=0, dilation=1, groups: int = 1,
                 offset_groups: int = 1, data_offset_groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, scope=scope, mode=mode,
                         stride=stride, padding=padding, dilation=dilation, groups=groups,
                         offset_groups=offset_groups, bias=bias)
        check_channels(type(self).__name__, in_channels, out_channels, groups,
                       data_offset_groups, "data_offset_groups")
        self.data_offset_groups = data_offset_groups
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.data_offset = LocalOffsets(in_channels, 2 * data_offset_groups * taps,
                                        self.kernel_size, self.stride, self.padding,
                                        self.dilation)

    def forward(self, x: Tensor, return_offsets: bool = False):
        offset = self._kernel_offsets(x)
        data_offset = self._policy(self.data_offset(x))
        out = ops.deform_kernel2d(
            x, self.weight, offset, kernel_size=self.kernel_size, bias=self.bias,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, offset_groups=self.offset_groups, data_offset=data_offset)
        return self._finish(out, {"kernel": offset, "data": data_offset}, return_offsets)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", data_offset_groups={self.data_offset_groups}"
