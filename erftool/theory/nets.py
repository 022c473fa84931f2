"""Torch modules built from theory `Layer`s, so compute_erf can backprop them.

The forward uses torch.nn.functional.conv2d and erftool.ops' deformable
operators with the fixed offsets of the Layer (shared by every image of the
batch, as compute_erf replicates the same image per position).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pathsum import Layer


def _t(a, dtype):
    return None if a is None else torch.as_tensor(a, dtype=dtype)


class TheoryNet(nn.Module):
    """Sequential net of rigid / DC / DK layers with fixed offsets (+ ReLUs).

    `preacts` holds the last forward's pre-activations when record=True, from
    which the ReLU activation patterns (gates) are read."""

    def __init__(self, layers: Sequence[Layer], backend: Optional[str] = "reference",
                 dtype=torch.float64):
        super().__init__()
        self.specs = list(layers)
        self.backend = backend
        self.weights = nn.ParameterList(
            [nn.Parameter(_t(l.weight, dtype)) for l in self.specs])
        self.biases = [_t(l.bias, dtype) for l in self.specs]
        self.offsets = [_t(l.offset, dtype) for l in self.specs]
        self.data_offsets = [_t(l.data_offset, dtype) for l in self.specs]
        self.masks = [_t(l.mask, dtype) for l in self.specs]
        self.record = False
        self.preacts: List[torch.Tensor] = []

    def forward(self, x):
        from erftool import ops  # the deformable operators under test

        self.preacts = []
        n = x.shape[0]
        for i, spec in enumerate(self.specs):
            w, b = self.weights[i], self.biases[i]
            geo = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
            if spec.kind == "rigid":
                x = F.conv2d(x, w, b, **geo)
            elif spec.kind == "dc":
                off = self.offsets[i].unsqueeze(0).expand(n, -1, -1, -1)
                mask = None if self.masks[i] is None else \
                    self.masks[i].unsqueeze(0).expand(n, -1, -1, -1)
                x = ops.deform_conv2d(x, off, w, b, mask=mask, backend=self.backend, **geo)
            else:
                off = self.offsets[i]
                off = off.unsqueeze(0).expand((n,) + tuple(off.shape))
                doff = self.data_offsets[i]
                if doff is not None:
                    doff = doff.unsqueeze(0).expand((n,) + tuple(doff.shape))
                x = ops.deform_kernel2d(x, w, off, kernel_size=spec.kernel_size, bias=b,
                                        data_offset=doff, backend=self.backend, **geo)
            if self.record:
                self.preacts.append(x.detach())
            if spec.relu:
                x = F.relu(x)
        return x

    @torch.no_grad()
    def gates(self, image: torch.Tensor):
        """Activation patterns 1[pre-activation > 0] of one image (C, H, W)."""
        self.record = True
        try:
            self(image.unsqueeze(0))
        finally:
            self.record = False
        return [(p[0] > 0).double().numpy() if s.relu else None
                for p, s in zip(self.preacts, self.specs)]
