"""Small residual networks for 64 x 64 inputs, one per operator.

All variants share one rigid skeleton; the chosen stages' 3x3 convs are then
converted (erftool.nn.convert_conv), so with the same seed every variant
starts from the same function and differs only in what the operator can
learn on top of it.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ErftoolError
from ._registry import convert_stages, normalise_op
from .resnet import BasicBlock, init_resnet


class ResNetTiny(nn.Module):
    """stem (3x3 conv, stride 2) -> layer1..3 of BasicBlocks (strides 1, 2, 2)
    -> global average pool -> fc. 64x64 in, 8x8 at layer3."""

    def __init__(self, num_classes: int, widths: Sequence[int], blocks: Sequence[int],
                 in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(count):
                layer.append(BasicBlock(cin, width, stride if j == 0 else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet_tiny(op: str = "rigid", stages: Sequence[int] = (2, 3), scope=None,
                num_classes: int = 8, widths: Sequence[int] = (16, 32, 64),
                blocks: Sequence[int] = (1, 1, 1), in_channels: int = 3) -> ResNetTiny:
    """op: the operator of the 3x3 convs in `stages` (1-based); scope: DK scope
    (None = 5 for DK ops, i.e. K + 2, so the rigid kernel sits centred)."""
    op = normalise_op(op)
    if len(widths) != len(blocks):
        raise ErftoolError(f"resnet-tiny: widths {tuple(widths)} and blocks {tuple(blocks)} "
                           f"must have the same length")
    model = ResNetTiny(num_classes, widths, blocks, in_channels)
    init_resnet(model)
    if scope is None and op.startswith("dk"):
        scope = 5
    convert_stages(model, op, stages, scope)
    model.erftool_deform = dict(op=op, stages=tuple(stages), scope=scope)
    return model
