"""Operator configurations shared by the native, gradient and CUDA tests."""
from dataclasses import dataclass
from typing import Tuple

import torch

import erftool.ops as ops


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "dk" or "dc"
    kernel: Tuple[int, int] = (3, 3)
    scope: Tuple[int, int] = (4, 4)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    offset: str = "local"  # "local" | "global"
    data_groups: int = 0  # 0: no data offset
    mask: bool = False
    bias: bool = True
    c_in: int = 4
    c_out: int = 4
    size: Tuple[int, int] = (6, 7)
    batch: int = 2

    def out_size(self):
        return tuple(
            (self.size[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1)
            // self.stride[i] + 1 for i in range(2))

    def make(self, dtype=torch.float64, device="cpu", seed=0, offset_scale=0.7):
        """Random tensors for this case, as a dict of named arguments."""
        g = torch.Generator().manual_seed(seed)

        def r(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(
                dtype=dtype, device=device)

        taps = self.kernel[0] * self.kernel[1]
        ho, wo = self.out_size()
        t = {"input": r(self.batch, self.c_in, *self.size)}
        if self.op == "dk":
            t["weight"] = r(self.c_out, self.c_in // self.groups, *self.scope)
            shape = (self.batch, 2 * self.offset_groups * taps)
            if self.offset == "local":
                shape += (ho, wo)
            t["offset"] = r(*shape, scale=offset_scale)
        else:
            t["weight"] = r(self.c_out, self.c_in // self.groups, *self.kernel)
        if self.data_groups:
            t["data_offset"] = r(self.batch, 2 * self.data_groups * taps, ho, wo, scale=1.3)
        if self.mask:
            t["mask"] = torch.rand(self.batch, self.data_groups * taps, ho, wo, generator=g,
                                   dtype=torch.float64).to(dtype=dtype, device=device)
        if self.bias:
            t["bias"] = r(self.c_out)
        return t

    def call(self, tensors, backend=None):
        """Run the public operator on named tensors."""
        if self.op == "dk":
            return ops.deform_kernel2d(
                tensors["input"], tensors["weight"], tensors["offset"],
                kernel_size=self.kernel, bias=tensors.get("bias"), stride=self.stride,
                padding=self.padding, dilation=self.dilation, groups=self.groups,
                offset_groups=self.offset_groups, data_offset=tensors.get("data_offset"),
                backend=backend)
        return ops.deform_conv2d(
            tensors["input"], tensors["data_offset"], tensors["weight"], tensors.get("bias"),
            self.stride, self.padding, self.dilation, tensors.get("mask"), backend=backend)


CASES = [
    Case("dk-local-scope4", "dk"),
    Case("dk-local-scope3-stride2", "dk", scope=(3, 3), stride=(2, 2)),
    Case("dk-local-dilation2-groups2", "dk", dilation=(2, 2), padding=(2, 2), groups=2,
         offset_groups=2, size=(7, 7)),
    Case("dk-local-nonsquare", "dk", kernel=(2, 3), scope=(3, 5), padding=(0, 1),
         stride=(1, 2), bias=False, c_out=6),
    Case("dk-local-depthwise", "dk", groups=4, offset_groups=4, c_out=4),
    Case("dk-global", "dk", offset="global", groups=2, offset_groups=2, c_out=6),
    Case("dk-global-nonsquare-scope", "dk", offset="global", kernel=(3, 1), scope=(5, 2),
         padding=(1, 0)),
    Case("dk+dc-local", "dk", data_groups=2, offset_groups=2),
    Case("dk+dc-global", "dk", offset="global", data_groups=1, stride=(2, 1)),
    Case("dc", "dc", data_groups=1),
    Case("dc-groups-stride", "dc", data_groups=2, groups=2, stride=(2, 2), c_out=6),
    Case("dcv2-mask", "dc", data_groups=2, mask=True, dilation=(2, 1), padding=(2, 1)),
    # Many channels on a tiny map: global DK takes its im2col + matmul form.
    Case("dk-global-small-map", "dk", offset="global", groups=2, offset_groups=2, c_in=8,
         c_out=6, size=(5, 4), stride=(2, 2), dilation=(1, 2), padding=(1, 2)),
]

IDS = [c.name for c in CASES]

# Names of the differentiable inputs of each operator, in call order.
def differentiable(case: Case, tensors) -> list:
    return [k for k in ("input", "weight", "offset", "data_offset", "mask", "bias")
            if k in tensors]
