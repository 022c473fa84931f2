"""Turn a trained nn.Conv2d into a deformable layer that computes the same
function until its (zero-initialised) offset generators learn something."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ErftoolError
from ._base import as_pair
from .deform_conv import DeformConv2d
from .deform_kernel import DeformKernel2d, DeformKernelConv2d

__all__ = ["convert_conv", "CONVERT_KINDS"]

CONVERT_KINDS = ("rigid", "dk-local", "dk-global", "dc", "dk+dc")


def _padding(conv: nn.Conv2d):
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        raise ErftoolError(f"convert_conv: padding={conv.padding!r} is not supported; "
                           f"give the conv explicit integer padding")
    if conv.padding_mode != "zeros":
        raise ErftoolError(f"convert_conv: padding_mode={conv.padding_mode!r} is not "
                           f"supported (the deformable ops zero-pad)")
    return tuple(conv.padding)


def _place_in_scope(layer: DeformKernel2d, weight: torch.Tensor) -> None:
    """Copy a K x K kernel into the S x S scope so the zero-offset resample reads it
    exactly: centred when S - K is even; when it is odd on an axis, one cell
    towards the top/left and the generator's bias for that axis set to -0.5, so
    tap a samples the integer cell a + (S-K-1)/2 instead of a half-cell average."""
    (kh, kw), (sh, sw) = layer.kernel_size, layer.scope
    r0, c0 = (sh - kh) // 2, (sw - kw) // 2
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :, r0:r0 + kh, c0:c0 + kw] = weight
        gen = layer.kernel_offset
        bias = gen.fc.bias if hasattr(gen, "fc") else gen.bias
        bias.zero_()
        if (sh - kh) % 2:
            bias[0::2] = -0.5
        if (sw - kw) % 2:
            bias[1::2] = -0.5


def convert_conv(conv: nn.Conv2d, kind: str = "dk-local", scope=None) -> nn.Module:
    """A deformable replacement for `conv` carrying its weights over.

    kind: "dk-local", "dk-global", "dc", "dk+dc" ("rigid" returns `conv` itself).
    scope: DK scope (None = the conv's kernel size). At zero generator weights the
    new layer's output equals conv's exactly; for DK with S - K odd this relies on
    the -0.5 generator bias described in `_place_in_scope` (so its recorded kernel
    offsets start at -0.5, not 0).
    """
    if not isinstance(conv, nn.Conv2d):
        raise ErftoolError(f"convert_conv: expected an nn.Conv2d, got {type(conv).__name__}")
    if kind not in CONVERT_KINDS:
        raise ErftoolError(f"convert_conv: kind must be one of {', '.join(CONVERT_KINDS)}; "
                           f"got {kind!r}")
    if kind == "rigid":
        return conv
    common = dict(stride=tuple(conv.stride), padding=_padding(conv),
                  dilation=tuple(conv.dilation), groups=conv.groups,
                  bias=conv.bias is not None)
    args = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size))
    if kind == "dc":
        if scope is not None and as_pair("convert_conv", "scope", scope, 1) != args[2]:
            raise ErftoolError(f"convert_conv: kind 'dc' has no scope; got scope={scope!r}")
        layer = DeformConv2d(*args, **common)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
    else:
        cls = DeformKernelConv2d if kind == "dk+dc" else DeformKernel2d
        mode = "global" if kind == "dk-global" else "local"
        layer = cls(*args, scope=scope, mode=mode, **common)
        _place_in_scope(layer, conv.weight)
    if conv.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(conv.bias)
    return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
