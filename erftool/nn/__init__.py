"""Deformable layers with built-in offset generators.

- `DeformKernel2d`: Deformable Kernel (local or global offsets).
- `DeformConv2d`: deformable convolution (v1, or v2 with a mask).
- `DeformKernelConv2d`: DK + DC, both offset fields learned.
- `convert_conv`: an nn.Conv2d -> one of the above, same output at init.
- Every module honours erftool.erf's offset policy (`erftool.erf.frozen_offsets()`,
  `zero_offsets()`): detached or zeroed generated offsets for ERF analysis.
- `set_record_offsets` / `collect_offsets`: the offsets of the last forward.
"""
from ._base import DeformableModule, collect_offsets, set_record_offsets
from .convert import CONVERT_KINDS, convert_conv
from .deform_conv import DeformConv2d
from .deform_kernel import DeformKernel2d, DeformKernelConv2d

__all__ = [
    "DeformKernel2d", "DeformConv2d", "DeformKernelConv2d", "DeformableModule",
    "convert_conv", "CONVERT_KINDS",
    "set_record_offsets", "collect_offsets",
]
