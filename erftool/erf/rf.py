"""Theoretical receptive field: the bounding box of the structurally reachable
input region of a probed unit.

Method: back-propagate through a *positive linear surrogate* of the model --
every weight tensor set to the constant 1/fan_in, every 1-D scale (BN/LN
gamma) to 1, biases and BN running means to 0, running variances to 1,
activation modules replaced by the identity, max-pooling by average pooling
over the same window, deformable offsets zeroed (offset policy "zero": the
rigid skeleton; DK keeps the rigid RF by construction, DC moves it with the
data) -- on a strictly positive random input. In that surrogate every path
from the input to the probed unit carries a strictly positive product, so no
two paths can cancel and the gradient support is exactly the union of the
paths' end points. For stacks of convolutions (any kernel, stride, dilation,
padding) this is the exact theoretical RF, clipped to the image.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backprop import input_gradients
from .layers import resolve_layer
from .offsets import zero_offsets

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
                nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold)


def _identity_hook(_mod, inputs, _out):
    return inputs[0]


def _maxpool_hook(mod, inputs, _out):
    # Same window, averaged: every input of the window stays reachable.
    return F.avg_pool2d(inputs[0], mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)


def _adaptive_maxpool_hook(mod, inputs, _out):
    return F.adaptive_avg_pool2d(inputs[0], mod.output_size)


@torch.no_grad()
def positive_surrogate(model: nn.Module, dtype=torch.float64) -> nn.Module:
    """A deep copy of `model` made positive and linear (see module docstring)."""
    sur = copy.deepcopy(model)
    try:
        sur = sur.to(dtype)
    except (RuntimeError, TypeError):
        pass
    for name, param in sur.named_parameters():
        if param.dim() >= 2:
            param.fill_(1.0 / max(1, param[0].numel()))
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
    for mod in sur.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            if mod.running_mean is not None:
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
        if isinstance(mod, _ACTIVATIONS):
            mod.register_forward_hook(_identity_hook)
        elif isinstance(mod, nn.MaxPool2d) and mod.dilation in (1, (1, 1)):
            mod.register_forward_hook(_maxpool_hook)
        elif isinstance(mod, nn.AdaptiveMaxPool2d):
            mod.register_forward_hook(_adaptive_maxpool_hook)
    return sur.eval()


def support_box(support: np.ndarray):
    """(y0, x0, y1, x1), inclusive, of the True cells; None when empty."""
    ys, xs = np.nonzero(support)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def theoretical_rf(model: nn.Module, input_shape, positions, layer=None,
                   channels: Optional[torch.Tensor] = None, device=None) -> np.ndarray:
    """RF boxes (P, 4) int64 (y0, x0, y1, x1 inclusive; -1 rows when unreachable)
    of the units at `positions` (P, 2) on `layer` (name as in compute_erf, ""
    for the model output) for inputs of shape (C, H, W)."""
    pts = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    sur = positive_surrogate(model)
    if device is not None:
        sur = sur.to(device)
    ref = next((p for p in sur.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float64
    dev = ref.device if ref is not None else torch.device("cpu")
    _, module = resolve_layer(sur, "" if layer is None else layer)
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + torch.rand((1,) + tuple(input_shape), generator=gen, dtype=torch.float64))
    x = x.to(dev, dtype)
    pos = torch.as_tensor(pts, dtype=torch.long).view(-1, 1, 2)
    # Random positive channel seeds: equal seeds could cancel exactly through
    # a normalisation layer (the sum of normalised values is constant).
    def weights(n):
        return 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)

    with zero_offsets():
        grads = input_gradients(sur, module, x, pos, channels, channel_weights=weights)
    support = (grads.abs().sum(dim=(1, 2)) > 0).cpu().numpy()  # (P, H, W)
    boxes = np.full((len(pts), 4), -1, dtype=np.int64)
    for i, sup in enumerate(support):
        box = support_box(sup)
        if box is not None:
            boxes[i] = box
    return boxes
