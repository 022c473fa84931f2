"""The pure-PyTorch reference against an independent loop transcription of
the operator definitions, and the documented special cases."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erftool.ops import reference

from _bruteforce import deform_kernel2d as brute_dk

torch.manual_seed(0)
D = torch.float64


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=D) * scale


CASES = [
    # kernel, scope, stride, padding, dilation, groups, offset_groups, local
    ((3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 1, 1, True),
    ((3, 3), (3, 3), (2, 2), (1, 1), (1, 1), 2, 2, True),
    ((2, 3), (3, 5), (1, 2), (0, 1), (2, 1), 1, 2, True),
    ((3, 3), (5, 4), (1, 1), (2, 2), (2, 2), 2, 1, False),
]


@pytest.mark.parametrize("kernel,scope,stride,padding,dilation,groups,og,local", CASES)
def test_reference_matches_direct_loops(kernel, scope, stride, padding, dilation, groups, og,
                                        local):
    x = rand(2, 4, 6, 7)
    w = rand(4, 4 // groups, *scope)
    b = rand(4)
    ho = (6 + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (7 + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = kernel[0] * kernel[1]
    shape = (2, 2 * og * taps, ho, wo) if local else (2, 2 * og * taps)
    off = rand(*shape, scale=1.2)
    got = reference.deform_kernel2d(x, w, off, kernel_size=kernel, bias=b, stride=stride,
                                    padding=padding, dilation=dilation, groups=groups,
                                    offset_groups=og)
    want = brute_dk(x.numpy(), w.numpy(), off.numpy(), kernel, stride, padding, dilation,
                    groups, og, bias=b.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_reference_dk_plus_dc_and_dcn_v2_match_direct_loops():
    x = rand(1, 4, 5, 6)
    w = rand(3, 4, 4, 4)
    off = rand(1, 2 * 2 * 9, 5, 6, scale=0.8)
    data = rand(1, 2 * 2 * 9, 5, 6, scale=1.5)
    got = reference.deform_kernel2d(x, w, off, kernel_size=3, padding=1, offset_groups=2,
                                    data_offset=data)
    want = brute_dk(x.numpy(), w.numpy(), off.numpy(), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2,
                    data_offset=data.numpy())
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    w3 = rand(3, 4, 3, 3)
    mask = torch.rand(1, 2 * 9, 5, 6, dtype=D)
    got = reference.deform_conv2d(x, data, w3, padding=1, mask=mask)
    want = brute_dk(x.numpy(), w3.numpy(), None, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1,
                    data_offset=data.numpy(), mask=mask.numpy())
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_zero_offsets_with_scope_equal_kernel_is_conv2d():
    x, w = rand(2, 6, 9, 8), rand(4, 3, 3, 3)
    off = torch.zeros(2, 18, 5, 4, dtype=D)
    got = reference.deform_kernel2d(x, w, off, kernel_size=3, stride=2, padding=1, groups=2)
    # Equal up to summation order (float64 rounding).
    torch.testing.assert_close(got, F.conv2d(x, w, stride=2, padding=1, groups=2), rtol=0,
                               atol=1e-12)


def test_scope_four_kernel_three_averages_four_cells():
    x, w = rand(1, 2, 7, 7), rand(3, 2, 4, 4)
    off = torch.zeros(1, 18, dtype=D)
    got = reference.deform_kernel2d(x, w, off, kernel_size=3, padding=1)
    averaged = F.avg_pool2d(w, 2, stride=1)  # half-pixel centring
    torch.testing.assert_close(got, F.conv2d(x, averaged, padding=1), rtol=0, atol=1e-12)


# Taps sit at 0.5..2.5 in a 4-cell scope: -3.5 puts the last at -1, +3.5 the first at 4.
@pytest.mark.parametrize("value", [-3.5, 3.5, -4.25, 1e9, -1e9])
def test_offsets_far_outside_the_scope_give_exact_zeros(value):
    x, w = rand(1, 2, 5, 5), rand(2, 2, 4, 4)
    off = torch.full((1, 18, 5, 5), value, dtype=D)
    out = reference.deform_kernel2d(x, w, off, kernel_size=3, padding=1)
    assert torch.equal(out, torch.zeros_like(out))


def test_scope_boundary_is_exactly_zero_at_minus_one_and_S():
    coef = reference.scope_coefficients(
        torch.tensor([[[-2.0, 0.0]], [[2.0, 0.0]], [[-1.7, 0.0]]], dtype=D), (1, 1), (4, 4))
    # Tap 0 of a 1x1 kernel in a 4x4 scope sits at 1.5: -2 -> -0.5, +2 -> 3.5 (half
    # inside), -1.7 -> -0.2 (80% of row 0).
    assert coef[0].sum().item() == pytest.approx(0.5)
    assert coef[1].sum().item() == pytest.approx(0.5)
    assert coef[2].sum().item() == pytest.approx(0.8)
    edge = reference.scope_coefficients(torch.tensor([[-2.5, 0.0]], dtype=D), (1, 1), (4, 4))
    assert torch.equal(edge, torch.zeros_like(edge))


def test_nan_and_inf_offsets_contribute_nothing():
    x, w = rand(1, 2, 5, 5), rand(2, 2, 3, 3)
    off = torch.zeros(1, 18, 5, 5, dtype=D)
    off[0, 0, 2, 2] = float("nan")
    off[0, 3, 1, 1] = float("inf")
    out = reference.deform_kernel2d(x, w, off, kernel_size=3, padding=1)
    assert torch.isfinite(out).all()
    data = torch.full((1, 18, 5, 5), float("nan"), dtype=D)
    out = reference.deform_conv2d(x, data, w, padding=1)
    assert torch.equal(out, torch.zeros_like(out))


def test_resample_kernel_matches_global_operator():
    x, w = rand(3, 4, 6, 6), rand(6, 2, 4, 5)
    off = rand(3, 2 * 2 * 9, scale=0.9)
    kernels = reference.resample_kernel(w, off, 3, offset_groups=2, groups=2)
    want = torch.cat([F.conv2d(x[i:i + 1], kernels[i], padding=1, groups=2) for i in range(3)])
    got = reference.deform_kernel2d(x, w, off, kernel_size=3, padding=1, groups=2,
                                    offset_groups=2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

