"""Argument normalisation and validation shared by every operator entry point.

Errors are one-line ValueErrors that name the argument, the shape it has and
the shape it should have, so that a wrong call fails here and never deep
inside a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def pair(op: str, name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints as a validated (h, w) tuple."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        result = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        result = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(result) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum} on each axis, got {value!r}")
    return result


def fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


@dataclass(frozen=True)
class Geometry:
    """Everything a kernel needs besides the tensors."""

    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    offset_groups: int
    data_offset_groups: int
    out_size: Tuple[int, int]

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]


def output_size(op, size, kernel, stride, padding, dilation) -> Tuple[int, int]:
    out = []
    for axis in range(2):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        o = (size[axis] + 2 * padding[axis] - span) // stride[axis] + 1
        if o <= 0:
            raise ValueError(
                f"{op}: input of spatial size {fmt(size)} is too small for kernel "
                f"{fmt(kernel)} with padding {fmt(padding)} and dilation {fmt(dilation)}"
            )
        out.append(o)
    return out[0], out[1]


def _check_tensor(op: str, name: str, t, ndim: int, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {fmt(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {ref.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but input has {ref.dtype}")


def check_input(op: str, input) -> None:
    if not isinstance(input, torch.Tensor):
        raise ValueError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C_in, H, W), got shape {fmt(input.shape)}")
    allowed = CUDA_DTYPES if input.device.type == "cuda" else CPU_DTYPES
    if input.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(
            f"{op}: input dtype {input.dtype} is not supported on {input.device.type} "
            f"(supported: {names})"
        )


def _check_weight(op: str, input, weight, groups: int) -> None:
    _check_tensor(op, "weight", weight, 4, input)
    c_in = input.shape[1]
    if groups < 1 or c_in % groups:
        raise ValueError(f"{op}: groups={groups} must divide the {c_in} input channels")
    if weight.shape[0] % groups:
        raise ValueError(
            f"{op}: groups={groups} must divide the {weight.shape[0]} output channels of weight"
        )
    if weight.shape[1] != c_in // groups:
        raise ValueError(
            f"{op}: weight has shape {fmt(weight.shape)}; expected (C_out, C_in/groups="
            f"{c_in // groups}, S_h, S_w) for {c_in} input channels and groups={groups}"
        )


def _check_scope(op: str, kernel, weight) -> None:
    scope = tuple(weight.shape[2:])
    if scope[0] < kernel[0] or scope[1] < kernel[1]:
        raise ValueError(
            f"{op}: kernel_size {fmt(kernel)} exceeds the weight's scope {fmt(scope)}; "
            f"the scope must be at least the kernel size on each axis"
        )


def _check_bias(op: str, input, weight, bias) -> None:
    if bias is None:
        return
    _check_tensor(op, "bias", bias, 1, input)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{op}: bias has shape {fmt(bias.shape)}; expected ({weight.shape[0]},)"
        )


def _groups_from_channels(op, name, t, per_group, what, c_in) -> int:
    channels = t.shape[1]
    if channels == 0 or channels % per_group:
        raise ValueError(
            f"{op}: {name} has {channels} channels; expected a positive multiple of "
            f"{per_group} ({what})"
        )
    count = channels // per_group
    if c_in % count:
        raise ValueError(
            f"{op}: {name} implies {count} offset groups, which do not divide the "
            f"{c_in} input channels"
        )
    return count


def _check_field(op, name, t, expected) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {fmt(t.shape)}; expected {fmt(expected)}")


def check_deform_kernel2d(
    input, weight, offset, kernel_size, bias, stride, padding, dilation, groups,
    offset_groups, data_offset,
) -> Tuple[Geometry, str]:
    """Validate deform_kernel2d's arguments; returns the geometry and the
    offset kind ("local" or "global")."""
    op = "deform_kernel2d"
    check_input(op, input)
    kernel = pair(op, "kernel_size", kernel_size, 1)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if not isinstance(offset_groups, int) or offset_groups < 1:
        raise ValueError(f"{op}: offset_groups must be a positive int, got {offset_groups!r}")
    _check_weight(op, input, weight, groups)
    _check_scope(op, kernel, weight)
    c_in = input.shape[1]
    if c_in % offset_groups:
        raise ValueError(
            f"{op}: offset_groups={offset_groups} must divide the {c_in} input channels"
        )
    _check_bias(op, input, weight, bias)
    n = input.shape[0]
    out = output_size(op, input.shape[2:], kernel, stride, padding, dilation)
    taps = kernel[0] * kernel[1]
    channels = 2 * offset_groups * taps
    if not isinstance(offset, torch.Tensor):
        raise ValueError(f"{op}: offset must be a torch.Tensor, got {type(offset).__name__}")
    if offset.dim() == 2:
        kind = "global"
        _check_tensor(op, "offset", offset, 2, input)
        _check_field(op, "offset (global)", offset, (n, channels))
    elif offset.dim() == 4:
        kind = "local"
        _check_tensor(op, "offset", offset, 4, input)
        _check_field(op, "offset (local)", offset, (n, channels) + out)
    else:
        raise ValueError(
            f"{op}: offset has shape {fmt(offset.shape)}; expected local "
            f"{fmt((n, channels) + out)} or global {fmt((n, channels))}"
        )
    data_groups = 1
    if data_offset is not None:
        _check_tensor(op, "data_offset", data_offset, 4, input)
        data_groups = _groups_from_channels(
            op, "data_offset", data_offset, 2 * taps, "2*Kh*Kw per data-offset group", c_in
        )
        _check_field(op, "data_offset", data_offset, (n, 2 * data_groups * taps) + out)
    geom = Geometry(kernel, stride, padding, dilation, groups, offset_groups, data_groups, out)
    return geom, kind


def check_resample_kernel(weight, offset, kernel_size, offset_groups, groups) -> Tuple[int, int]:
    """Validate resample_kernel's arguments; returns the kernel size."""
    op = "resample_kernel"
    kernel = pair(op, "kernel_size", kernel_size, 1)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = fmt(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be 4-D (C_out, C_in/groups, S_h, S_w), got {shape}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{op}: groups={groups!r} must divide the {weight.shape[0]} output "
                         f"channels of weight")
    c_in = groups * weight.shape[1]
    if not isinstance(offset_groups, int) or offset_groups < 1 or c_in % offset_groups:
        raise ValueError(f"{op}: offset_groups={offset_groups!r} must divide the {c_in} input "
                         f"channels")
    _check_scope(op, kernel, weight)
    if not isinstance(offset, torch.Tensor):
        raise ValueError(f"{op}: offset must be a torch.Tensor, got {type(offset).__name__}")
    if offset.device != weight.device or offset.dtype != weight.dtype:
        raise ValueError(f"{op}: offset is {offset.dtype} on {offset.device} but weight is "
                         f"{weight.dtype} on {weight.device}")
    if offset.dim() != 2:
        raise ValueError(f"{op}: offset has shape {fmt(offset.shape)}; expected (N, "
                         f"{2 * offset_groups * kernel[0] * kernel[1]})")
    _check_field(op, "offset", offset,
                 (offset.shape[0], 2 * offset_groups * kernel[0] * kernel[1]))
    return kernel


def check_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask) -> Geometry:
    """Validate deform_conv2d's arguments (torchvision's conventions: groups
    from the weight, offset groups from the offset)."""
    op = "deform_conv2d"
    check_input(op, input)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = fmt(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be 4-D (C_out, C_in/groups, K_h, K_w), got {shape}")
    c_in = input.shape[1]
    if weight.shape[1] == 0 or c_in % weight.shape[1]:
        raise ValueError(
            f"{op}: weight has shape {fmt(weight.shape)}; its dim 1 (C_in/groups) must "
            f"divide the {c_in} input channels"
        )
    groups = c_in // weight.shape[1]
    _check_weight(op, input, weight, groups)
    _check_bias(op, input, weight, bias)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if min(kernel) < 1:
        raise ValueError(f"{op}: weight has an empty kernel {fmt(kernel)}")
    out = output_size(op, input.shape[2:], kernel, stride, padding, dilation)
    taps = kernel[0] * kernel[1]
    n = input.shape[0]
    _check_tensor(op, "offset", offset, 4, input)
    data_groups = _groups_from_channels(
        op, "offset", offset, 2 * taps, "2*Kh*Kw per offset group", c_in
    )
    _check_field(op, "offset", offset, (n, 2 * data_groups * taps) + out)
    if mask is not None:
        _check_tensor(op, "mask", mask, 4, input)
        _check_field(op, "mask", mask, (n, data_groups * taps) + out)
    return Geometry(kernel, stride, padding, dilation, groups, 1, data_groups, out)


def data_groups_of(data_offset: Optional[torch.Tensor], taps: int) -> int:
    return 1 if data_offset is None else data_offset.shape[1] // (2 * taps)
