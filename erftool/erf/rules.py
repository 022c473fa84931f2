"""How a raw input gradient g = dO_j/dI (per input channel) becomes an ERF map.

With g[c, y, x] the gradient of the probed unit(s) with respect to input
channel c at pixel (y, x), the per-image map is  M[y, x] = sum_c rule(g[c, y, x]):

* "signed": rule(g) = g        -- Luo et al.'s raw Jacobian row; exact (and
  linear, so averages commute with it) for linear networks. Default.
* "abs":    rule(g) = |g|      -- magnitude, no cancellation between images.
* "relu":   rule(g) = max(g, 0) -- RepLKNet's convention (negative gradients
  dropped); pair with seed="relu" for exact RepLKNet parity.
* "square": rule(g) = g**2     -- energy; its mean over random weights is the
  variance map of Luo et al.'s random-weight analysis.
"""
from __future__ import annotations

import torch

RULES = ("signed", "abs", "relu", "square")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (choose from {', '.join(RULES)})")
    return rule


def apply_rule(grad: torch.Tensor, rule: str) -> torch.Tensor:
    """Elementwise rule, before the sum over input channels."""
    if rule == "signed":
        return grad
    if rule == "abs":
        return grad.abs()
    if rule == "relu":
        return grad.clamp_min(0)
    return grad * grad
