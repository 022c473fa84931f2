"""One forward + one backward that yields every (image, position) input gradient.

In eval mode the images of a batch do not interact, so seeding the probed
layer's gradient with a one-hot at each image's own position and running a
single backward gives, in the input gradient's slice b, image b's own
Jacobian row:  d(sum_b' O[b', ch, y_b', x_b'])/dI[b] = dO[b, ch, y_b, x_b]/dI[b].
Several positions are handled the same way by replicating the batch once per
position (position-major), so P positions still cost one backward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import run_to_layer


def input_gradients(model: nn.Module, module: Optional[nn.Module], x: torch.Tensor,
                    pos: torch.Tensor, channels: Optional[torch.Tensor] = None,
                    seed: str = "linear", channel_weights=None
                    ) -> torch.Tensor:
    """Input gradients (P, B, C, H, W) of the probed units.

    x: (B, C, H, W) images; pos: (P, B, 2) long (y, x) on the layer map;
    channels: indices of the layer channels summed (None = all);
    seed: "linear" (one-hot, Luo et al.) or "relu" (one-hot gated by O > 0,
    i.e. the gradient of relu(O).sum() as in RepLKNet's script);
    channel_weights: optional (n_channels,) seed values instead of ones, or a
    callable n -> such a tensor.
    """
    p, b = pos.shape[:2]
    xr = (x.repeat(p, 1, 1, 1) if p > 1 else x).detach().requires_grad_(True)
    with torch.enable_grad():
        feat = run_to_layer(model, module, xr)
    if feat.dim() != 4:
        raise ValueError(f"probed output has shape {tuple(feat.shape)}, not an (N, C, H, W) map")
    if not feat.requires_grad:  # the probed output does not depend on the input at all
        return torch.zeros((p, b) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    rows = torch.arange(p * b, device=feat.device)
    ys = pos[..., 0].reshape(-1).to(feat.device)
    xs = pos[..., 1].reshape(-1).to(feat.device)
    seed_map = torch.zeros_like(feat)
    chan = torch.arange(feat.shape[1], device=feat.device) if channels is None \
        else channels.to(feat.device)
    if channel_weights is None:
        value = torch.ones(len(chan), dtype=feat.dtype, device=feat.device)
    else:
        if callable(channel_weights):
            channel_weights = channel_weights(len(chan))
        value = channel_weights.to(feat.device, feat.dtype)
    seed_map[rows[:, None], chan[None, :], ys[:, None], xs[:, None]] = value
    if seed == "relu":
        seed_map = seed_map * (feat.detach() > 0).to(feat.dtype)
    (grad,) = torch.autograd.grad(feat, xr, seed_map, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(xr)
    return grad.view((p, b) + tuple(x.shape[1:]))
