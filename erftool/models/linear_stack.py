"""n convolution layers and nothing else: the linear networks whose ERF the
path-sum theory describes exactly."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ErftoolError
from ..nn import convert_conv
from ._registry import normalise_op


class LinearStack(nn.Sequential):
    """`depth` convs (no bias, no nonlinearity) with 'same' padding, so the
    output keeps the input's size and position (y, x) of every layer lines up."""


def linear_stack(depth: int = 4, channels: int = 1, in_channels: int = None, op: str = "rigid",
                 kernel_size: int = 3, scope=None, dilation: int = 1,
                 init: str = "uniform") -> LinearStack:
    """init: "uniform" (every rigid weight 1/(C K^2): the binomial / Gaussian ERF of
    Luo et al.) or "kaiming" (nn.Conv2d's random init). Deformable layers are
    converted from those rigid convs, so at init they compute the same function."""
    op = normalise_op(op)
    if not isinstance(depth, int) or depth < 1:
        raise ErftoolError(f"linear-stack: depth must be a positive int, got {depth!r}")
    if init not in ("uniform", "kaiming"):
        raise ErftoolError(f"linear-stack: init must be 'uniform' or 'kaiming', got {init!r}")
    if kernel_size % 2 == 0:
        raise ErftoolError(f"linear-stack: kernel_size must be odd for 'same' padding, "
                           f"got {kernel_size!r}")
    layers = []
    cin = channels if in_channels is None else in_channels
    for _ in range(depth):
        conv = nn.Conv2d(cin, channels, kernel_size, padding=dilation * (kernel_size // 2),
                         dilation=dilation, bias=False)
        if init == "uniform":
            with torch.no_grad():
                conv.weight.fill_(1.0 / (cin * kernel_size * kernel_size))
        layers.append(convert_conv(conv, op, scope=scope if op.startswith("dk") else None))
        cin = channels
    return LinearStack(*layers)
