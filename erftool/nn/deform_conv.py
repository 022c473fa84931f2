"""Deformable convolution (DCN v1, or v2 with `modulated=True`) with its
offset generator built in."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ._base import DeformableModule, LocalOffsets, as_pair, check_channels, conv_like_init

__all__ = ["DeformConv2d"]


class DeformConv2d(DeformableModule):
    """K x K convolution whose taps are read bilinearly at learned offsets.

    Offsets (and the v2 mask) come from zero-initialised rigid convs with the
    layer's geometry, so training starts from the rigid convolution.

    Mask convention (modulated=True): mask = 2 * sigmoid(z). With the generator
    at zero the mask is exactly 1 — a converted nn.Conv2d keeps its output —
    and it ranges over (0, 2). mmcv/DCNv2 use sigmoid(z) (0.5 at init); the
    factor 2 is a constant the weights absorb.

    Parameters: `weight` (C_out, C_in/groups, K_h, K_w), `bias`, `data_offset`
    (offset generator), `mask` (mask generator, when modulated).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1,
                 padding=0, dilation=1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, modulated: bool = False):
        super().__init__()
        owner = type(self).__name__
        check_channels(owner, in_channels, out_channels, groups, offset_groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_pair(owner, "kernel_size", kernel_size, 1)
        self.stride = as_pair(owner, "stride", stride, 1)
        self.padding = as_pair(owner, "padding", padding, 0)
        self.dilation = as_pair(owner, "dilation", dilation, 1)
        self.groups, self.offset_groups, self.modulated = groups, offset_groups, modulated
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        self.data_offset = LocalOffsets(in_channels, 2 * offset_groups * taps, *geometry)
        self.mask = LocalOffsets(in_channels, offset_groups * taps, *geometry) \
            if modulated else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        taps = self.kernel_size[0] * self.kernel_size[1]
        conv_like_init(self.weight, self.bias, (self.in_channels // self.groups) * taps)

    def forward(self, x: Tensor, return_offsets: bool = False):
        offset = self._policy(self.data_offset(x))
        found = {"data": offset}
        mask = None
        if self.mask is not None:
            mask = self._policy_mask(2 * torch.sigmoid(self.mask(x)))
            found["mask"] = mask
        out = ops.deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, mask=mask)
        return self._finish(out, found, return_offsets)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, offset_groups={self.offset_groups}, "
                f"bias={self.bias is not None}, modulated={self.modulated}")
