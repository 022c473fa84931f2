"""One forward + one backward that yields every (image, position) input gradient.

In eval mode the images of a batch do not interact, so seeding the probed
layer's gradient with a one-hot at each image's own position and running a
single backward gives, in the input gradient's slice b, image b's own
Jacobian row:  d(sum_b' O[b', ch, y_b', x_b'])/dI[b] = dO[b, ch, y_b, x_b]/dI[b].
Several positions share the forward pass: the P seeds go through one vmapped
VJP (or, where an op has no batching rule, the batch is replicated once per
position, position-major), never a Python loop of backward passes.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .layers import run_to_layer


_NO_VMAP: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _seed(feat, pos, channels, seed, channel_weights):
    """One-hot seeds (R, C, H, W) for rows R = pos.shape[0] of `feat`."""
    rows = torch.arange(pos.shape[0], device=feat.device)
    ys, xs = pos[:, 0].to(feat.device), pos[:, 1].to(feat.device)
    shape = (pos.shape[0],) + tuple(feat.shape[1:])
    seed_map = torch.zeros(shape, dtype=feat.dtype, device=feat.device)
    chan = torch.arange(feat.shape[1], device=feat.device) if channels is None \
        else channels.to(feat.device)
    if channel_weights is None:
        value = torch.ones(len(chan), dtype=feat.dtype, device=feat.device)
    else:
        if callable(channel_weights):
            channel_weights = channel_weights(len(chan))
        value = channel_weights.to(feat.device, feat.dtype)
    seed_map[rows[:, None], chan[None, :], ys[:, None], xs[:, None]] = value
    return seed_map


def _probe(model, module, x):
    with torch.enable_grad():
        feat = run_to_layer(model, module, x)
    if feat.dim() != 4:
        raise ValueError(f"probed output has shape {tuple(feat.shape)}, not an (N, C, H, W) map")
    return feat


def input_gradients(model: nn.Module, module: Optional[nn.Module], x: torch.Tensor,
                    pos: torch.Tensor, channels: Optional[torch.Tensor] = None,
                    seed: str = "linear", channel_weights=None, vmap: bool = True
                    ) -> torch.Tensor:
    """Input gradients (P, B, C, H, W) of the probed units.

    x: (B, C, H, W) images; pos: (P, B, 2) long (y, x) on the layer map;
    channels: indices of the layer channels summed (None = all);
    seed: "linear" (one-hot, Luo et al.) or "relu" (one-hot gated by O > 0,
    i.e. the gradient of relu(O).sum() as in RepLKNet's script);
    channel_weights: optional (n_channels,) seed values instead of ones, or a
    callable n -> such a tensor.

    With P > 1 positions the forward pass is shared and the P backward passes
    run as one vmapped VJP (autograd.grad(is_grads_batched=True)); models whose
    ops do not support vmap fall back to replicating the batch P times.
    """
    p, b = pos.shape[:2]
    if p > 1 and vmap and model not in _NO_VMAP:
        xg = x.detach().requires_grad_(True)
        feat = _probe(model, module, xg)
        if not feat.requires_grad:
            return torch.zeros((p, b) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        seeds = _seed(feat, pos.reshape(p * b, 2), channels, seed, channel_weights)
        seeds = seeds.view((p, b) + tuple(feat.shape[1:]))
        if seed == "relu":
            seeds = seeds * (feat.detach() > 0).to(feat.dtype)
        try:
            (grad,) = torch.autograd.grad(feat, xg, seeds, allow_unused=True,
                                          is_grads_batched=True)
        except (RuntimeError, NotImplementedError):
            _NO_VMAP.add(model)  # some op lacks a batching rule: replicate instead
        else:
            if grad is None:
                grad = torch.zeros((p,) + tuple(xg.shape), dtype=x.dtype, device=x.device)
            return grad
    xr = (x.repeat(p, 1, 1, 1) if p > 1 else x).detach().requires_grad_(True)
    feat = _probe(model, module, xr)
    if not feat.requires_grad:  # the probed output does not depend on the input at all
        return torch.zeros((p, b) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    seed_map = _seed(feat, pos.reshape(p * b, 2), channels, seed, channel_weights)
    if seed == "relu":
        seed_map = seed_map * (feat.detach() > 0).to(feat.dtype)
    (grad,) = torch.autograd.grad(feat, xr, seed_map, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(xr)
    return grad.view((p, b) + tuple(x.shape[1:]))
