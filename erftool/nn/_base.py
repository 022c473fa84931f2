"""What every erftool deformable module shares: argument checks, zero-initialised
offset generators, the ERF engine's offset policy and the record of the last offsets."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import _args
from ..errors import ErftoolError
from ..erf.offsets import offsets_mode, prepare_offsets

Pair = Tuple[int, int]


def as_pair(owner: str, name: str, value, minimum: int) -> Pair:
    """An int or a pair of ints as an (h, w) tuple, or an ErftoolError naming `name`
    (the ops' validation, re-raised as the project's error type)."""
    try:
        return _args.pair(owner, name, value, minimum)
    except ValueError as exc:
        raise ErftoolError(str(exc)) from None


def check_channels(owner: str, in_channels: int, out_channels: int, groups: int,
                   offset_groups: int, name: str = "offset_groups") -> None:
    for label, v in (("in_channels", in_channels), ("out_channels", out_channels),
                     ("groups", groups), (name, offset_groups)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ErftoolError(f"{owner}: {label} must be a positive int, got {v!r}")
    if in_channels % groups or out_channels % groups:
        raise ErftoolError(f"{owner}: groups={groups} must divide in_channels={in_channels} "
                           f"and out_channels={out_channels}")
    if in_channels % offset_groups:
        raise ErftoolError(f"{owner}: {name}={offset_groups} must divide "
                           f"in_channels={in_channels}")


class LocalOffsets(nn.Conv2d):
    """Rigid conv with the op's geometry, so its output is one offset vector per
    output location; zero-initialised so training starts from the undeformed op."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class GlobalOffsets(nn.Module):
    """Global average pooling + a zero-initialised linear layer: one offset
    vector per image (the paper's G_global)."""

    def __init__(self, in_channels: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, out_features)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def offset_generator(mode: str, in_channels: int, channels: int, kernel_size: Pair,
                     stride: Pair, padding: Pair, dilation: Pair) -> nn.Module:
    if mode == "local":
        return LocalOffsets(in_channels, channels, kernel_size, stride, padding, dilation)
    if mode == "global":
        return GlobalOffsets(in_channels, channels)
    raise ErftoolError(f"mode must be 'local' or 'global', got {mode!r}")


def conv_like_init(weight: Tensor, bias: Optional[Tensor], fan_in: int, gain: float = 1.0):
    """nn.Conv2d's default initialisation (uniform, bound 1/sqrt(fan_in)), with
    `gain` to compensate a resample that shrinks the weights' variance."""
    bound = gain / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            b = 1 / math.sqrt(fan_in)
            bias.uniform_(-b, b)


class DeformableModule(nn.Module):
    """Base of the deformable layers.

    After each forward, if `record_offsets` is True, `last_offsets` holds a
    dict of detached tensors: "kernel" (kernel offsets, local (N, 2GK^2, Ho, Wo)
    or global (N, 2GK^2)), "data" (data offsets, torchvision layout) and "mask"
    (DCNv2 modulation), whichever the module has. `forward(x, return_offsets=True)`
    returns (output, that dict) without detaching.
    """

    record_offsets: bool = False
    last_offsets: Optional[Dict[str, Tensor]] = None

    @staticmethod
    def _policy(offset: Tensor) -> Tensor:
        # erftool.erf's offset policy: "frozen" detaches (path-sum ERF, no path
        # through the generators), "zero" gives the rigid skeleton.
        return prepare_offsets(offset)

    @staticmethod
    def _policy_mask(mask: Tensor) -> Tensor:
        # A DCNv2 mask has no "zero offset"; its rigid value is 1 (see DeformConv2d).
        mode = offsets_mode()
        if mode == "zero":
            return torch.ones_like(mask).detach()
        return mask.detach() if mode == "frozen" else mask

    def _finish(self, out: Tensor, offsets: Dict[str, Tensor], return_offsets: bool):
        if self.record_offsets:
            self.last_offsets = {k: v.detach() for k, v in offsets.items()}
        return (out, offsets) if return_offsets else out


def set_record_offsets(model: nn.Module, enabled: bool = True) -> int:
    """Turn offset recording on or off in every deformable submodule; returns
    how many modules were switched. Clears stale records."""
    count = 0
    for m in model.modules():
        if isinstance(m, DeformableModule):
            m.record_offsets = enabled
            m.last_offsets = None
            count += 1
    return count


def collect_offsets(model: nn.Module) -> Dict[str, Dict[str, Tensor]]:
    """{qualified module name: last_offsets} of the modules that recorded some."""
    return {name: m.last_offsets for name, m in model.named_modules()
            if isinstance(m, DeformableModule) and m.last_offsets is not None}
