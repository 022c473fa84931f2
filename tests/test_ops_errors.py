"""Bad arguments raise one-line ValueErrors naming the argument and shape."""
import pytest
import torch

import erftool.ops as ops

X = torch.randn(2, 4, 6, 6)
W = torch.randn(4, 4, 4, 4)
OFF = torch.zeros(2, 18, 6, 6)


def dk(**overrides):
    args = dict(input=X, weight=W, offset=OFF, kernel_size=3, padding=1)
    args.update(overrides)
    return ops.deform_kernel2d(args.pop("input"), args.pop("weight"), args.pop("offset"), **args)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(offset=torch.zeros(2, 16, 6, 6)), r"offset \(local\) has shape \(2, 16, 6, 6\); expected \(2, 18, 6, 6\)"),
    (dict(offset=torch.zeros(2, 18)[:, :10]), r"offset \(global\) has shape \(2, 10\); expected \(2, 18\)"),
    (dict(offset=torch.zeros(2, 18, 6)), r"offset has shape \(2, 18, 6\)"),
    (dict(weight=torch.randn(4, 3, 4, 4)), r"weight has shape \(4, 3, 4, 4\); expected"),
    (dict(kernel_size=5), r"kernel_size \(5, 5\) exceeds the weight's scope \(4, 4\)"),
    (dict(groups=3), r"groups=3 must divide the 4 input channels"),
    (dict(offset_groups=3), r"offset_groups=3 must divide the 4 input channels"),
    (dict(stride=0), r"stride must be >= 1"),
    (dict(padding=(1, 2, 3)), r"padding must be an int or a pair"),
    (dict(input=X.double()), r"weight has dtype torch.float32 but input has torch.float64"),
    (dict(input=X.half()), r"input dtype torch.float16 is not supported on cpu"),
    (dict(input=X[0]), r"input must be 4-D"),
    (dict(input=X.numpy()), r"input must be a torch.Tensor, got ndarray"),
    (dict(offset=None), r"offset must be a torch.Tensor, got NoneType"),
    (dict(bias=torch.zeros(3)), r"bias has shape \(3\); expected \(4,\)"),
    (dict(data_offset=torch.zeros(2, 17, 6, 6)), r"data_offset has 17 channels"),
    (dict(data_offset=torch.zeros(2, 18, 5, 6)), r"data_offset has shape \(2, 18, 5, 6\); expected \(2, 18, 6, 6\)"),
    (dict(input=torch.randn(2, 4, 1, 1), padding=0), r"too small for kernel"),
])
def test_deform_kernel2d_errors(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        dk(**overrides)


def test_deform_conv2d_errors():
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"offset has shape \(2, 18, 5, 5\); expected \(2, 18, 6, 6\)"):
        ops.deform_conv2d(X, torch.zeros(2, 18, 5, 5), w, padding=1)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 8, 6, 6\); expected \(2, 9, 6, 6\)"):
        ops.deform_conv2d(X, torch.zeros(2, 18, 6, 6), w, padding=1, mask=torch.ones(2, 8, 6, 6))
    with pytest.raises(ValueError, match=r"dim 1 \(C_in/groups\) must divide"):
        ops.deform_conv2d(X, torch.zeros(2, 18, 6, 6), torch.randn(4, 3, 3, 3), padding=1)
    with pytest.raises(ValueError, match=r"input must be a torch.Tensor, got list"):
        ops.deform_conv2d([1.0], torch.zeros(2, 18, 6, 6), w, padding=1)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'gpu'"):
        dk(backend="gpu")


@pytest.mark.parametrize("args,pattern", [
    ((W, torch.zeros(2, 17), 3), r"offset has shape \(2, 17\); expected \(2, 18\)"),
    ((W, torch.zeros(2, 18, 1), 3), r"offset has shape \(2, 18, 1\); expected \(N, 18\)"),
    ((W, torch.zeros(2, 18).double(), 3), r"offset is torch.float64 on cpu but weight is"),
    ((W, torch.zeros(2, 50), 5), r"kernel_size \(5, 5\) exceeds the weight's scope \(4, 4\)"),
    ((W[0], torch.zeros(2, 18), 3), r"weight must be 4-D"),
    ((W, torch.zeros(2, 54), 3, 3), r"offset_groups=3 must divide the 4 input channels"),
    ((W, torch.zeros(2, 18), 3, 1, 3), r"groups=3 must divide the 4 output channels"),
])
def test_resample_kernel_errors(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        ops.resample_kernel(*args)
