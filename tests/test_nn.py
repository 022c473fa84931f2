"""erftool.nn: deformable layers, their generators, conversion from nn.Conv2d,
the frozen-offset switch and offset recording."""
import math

import pytest
import torch
from torch import nn

import erftool.nn as enn
from erftool import ops
from erftool.erf.offsets import offset_policy, offsets_mode, zero_offsets
from erftool.errors import ErftoolError


def _conv(cin=4, cout=6, k=3, **kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, **kw).double()
    return conv


def _x(n=2, c=4, h=9, w=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind,scope", [
    ("dk-local", None), ("dk-local", 5), ("dk-local", 4), ("dk-global", 3),
    ("dk-global", 4), ("dc", None), ("dk+dc", 5), ("dk+dc", (4, 5)),
])
@pytest.mark.parametrize("geometry", [
    dict(padding=1), dict(stride=2, padding=2, dilation=2, groups=2),
])
def test_convert_conv_is_exact_at_init(kind, scope, geometry):
    conv = _conv(**geometry)
    layer = enn.convert_conv(conv, kind, scope=scope)
    x = _x()
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)


def test_convert_even_scope_places_kernel_in_the_centre():
    conv = _conv()
    layer = enn.convert_conv(conv, "dk-local", scope=7)
    w = layer.weight.detach()
    torch.testing.assert_close(w[:, :, 2:5, 2:5], conv.weight.detach())
    w[:, :, 2:5, 2:5] = 0
    assert w.abs().max() == 0
    assert layer.kernel_offset.bias.abs().max() == 0  # no shift needed


def test_convert_odd_scope_shifts_generator_bias():
    conv = _conv()
    layer = enn.convert_conv(conv, "dk-global", scope=(4, 5))
    bias = layer.kernel_offset.fc.bias.detach()
    assert torch.all(bias[0::2] == -0.5) and torch.all(bias[1::2] == 0)  # rows odd, cols even
    torch.testing.assert_close(layer.weight[:, :, 0:3, 1:4], conv.weight)


def test_convert_rejects_bad_kind_and_padding_mode():
    with pytest.raises(ErftoolError, match="kind"):
        enn.convert_conv(_conv(), "deformable")
    with pytest.raises(ErftoolError, match="padding_mode"):
        enn.convert_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "dc")
    assert enn.convert_conv(_conv(), "rigid") is not None


@pytest.mark.parametrize("cls,kw", [
    (enn.DeformKernel2d, dict(scope=4, mode="local")),
    (enn.DeformKernel2d, dict(scope=4, mode="global")),
    (enn.DeformConv2d, dict(modulated=True)),
    (enn.DeformKernelConv2d, dict(scope=4)),
])
def test_generators_start_at_zero(cls, kw):
    layer = cls(4, 6, 3, padding=1, **kw)
    for name, p in layer.named_parameters():
        if name not in ("weight", "bias"):
            assert p.abs().max() == 0, name


def test_dk_offset_layouts_and_recording():
    x = _x().float()
    local = enn.DeformKernel2d(4, 6, 3, scope=4, stride=2, padding=1, offset_groups=2)
    out, found = local(x, return_offsets=True)
    assert out.shape == (2, 6, 5, 4)
    assert found["kernel"].shape == (2, 2 * 2 * 9, 5, 4)
    glob = enn.DeformKernel2d(4, 6, 3, scope=4, mode="global", padding=1)
    assert enn.set_record_offsets(nn.Sequential(local, glob)) == 2
    glob(x)
    assert glob.last_offsets["kernel"].shape == (2, 18)
    assert not glob.last_offsets["kernel"].requires_grad
    seq = nn.Sequential(enn.DeformKernelConv2d(4, 4, 3, padding=1),
                        enn.DeformConv2d(4, 4, 3, padding=1, modulated=True))
    enn.set_record_offsets(seq)
    seq(x)
    rec = enn.collect_offsets(seq)
    assert set(rec["0"]) == {"kernel", "data"} and set(rec["1"]) == {"data", "mask"}
    assert torch.all(rec["1"]["mask"] == 1)  # 2 * sigmoid(0)


def test_dk_init_matches_conv_variance_after_resample():
    # The resampled K x K kernel should have nn.Conv2d's variance, 1 / (3 fan_in).
    torch.manual_seed(0)
    layer = enn.DeformKernel2d(64, 64, 3, scope=4, mode="global")
    kernels = ops.resample_kernel(layer.weight.detach(), torch.zeros(1, 18), 3)
    expected = 1 / (3 * 64 * 9)
    assert abs(kernels.var().item() / expected - 1) < 0.1


@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=2, dilation=2, groups=2)])
def test_global_dk_module_matches_the_reference_op(geometry):
    torch.manual_seed(0)
    layer = enn.DeformKernel2d(4, 6, 3, scope=5, mode="global", **geometry).double()
    with torch.no_grad():
        layer.kernel_offset.fc.weight.normal_(0, 0.5)
        layer.kernel_offset.fc.bias.normal_(0, 0.7)
    x = _x().requires_grad_(True)
    out, found = layer(x, return_offsets=True)
    ref = ops.deform_kernel2d(x, layer.weight, found["kernel"], kernel_size=3, bias=layer.bias,
                              backend="reference", **{"padding": 0, **geometry})
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.pow(2).sum(), [x, layer.weight, found["kernel"]],
                             retain_graph=True)
    g2 = torch.autograd.grad(ref.pow(2).sum(), [x, layer.weight, found["kernel"]])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_dk_plus_dc_learns_both_offset_fields():
    torch.manual_seed(0)
    layer = enn.DeformKernelConv2d(4, 6, 3, scope=4, padding=1)
    layer(_x().float()).pow(2).sum().backward()
    assert layer.kernel_offset.weight.grad.abs().sum() > 0
    assert layer.data_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls,kw", [
    (enn.DeformKernel2d, dict(scope=4)),
    (enn.DeformKernel2d, dict(scope=4, mode="global")),
    (enn.DeformConv2d, dict(modulated=True)),
    (enn.DeformKernelConv2d, dict(scope=5)),
])
def test_offsets_frozen_cuts_only_the_generator_path(cls, kw):
    torch.manual_seed(0)
    layer = cls(4, 4, 3, padding=1, **kw).double()
    with torch.no_grad():  # make the generators input-dependent
        for name, p in layer.named_parameters():
            if name not in ("weight", "bias"):
                p.normal_(0, 0.3)

    def input_grad(frozen):
        x = _x().requires_grad_(True)
        with offset_policy("frozen" if frozen else "total"):
            out, found = layer(x, return_offsets=True)
        out[:, :, 4, 4].sum().backward()
        return x.grad, found

    g_frozen, found = input_grad(True)
    assert not any(t.requires_grad for t in found.values())
    g_total, _ = input_grad(False)
    assert offsets_mode() == "total"
    assert (g_frozen - g_total).abs().max() > 1e-6
    # Frozen = the op called with the same offsets given as constants.
    x = _x().requires_grad_(True)
    if isinstance(layer, enn.DeformConv2d):
        out = ops.deform_conv2d(x, found["data"], layer.weight, layer.bias, padding=1,
                                mask=found["mask"])
    else:
        out = ops.deform_kernel2d(x, layer.weight, found["kernel"], kernel_size=3,
                                  bias=layer.bias, padding=1, data_offset=found.get("data"))
    out[:, :, 4, 4].sum().backward()
    torch.testing.assert_close(g_frozen, x.grad)


def test_zero_offsets_policy_gives_the_rigid_skeleton():
    torch.manual_seed(0)
    conv = _conv(padding=1)
    x = _x()
    for kind in ("dk-local", "dk-global", "dc", "dk+dc"):
        layer = enn.convert_conv(conv, kind, scope=5 if kind != "dc" else None)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name not in ("weight", "bias"):
                    p.normal_(0, 0.3)
        with zero_offsets():
            torch.testing.assert_close(layer(x), conv(x))
        assert (layer(x) - conv(x)).abs().max() > 1e-3
    dcn = enn.DeformConv2d(4, 6, 3, padding=1, modulated=True).double()
    with torch.no_grad():
        dcn.mask.bias.fill_(1.0)
        dcn.weight.copy_(conv.weight)
        dcn.bias.copy_(conv.bias)
    with zero_offsets():
        torch.testing.assert_close(dcn(x), conv(x))  # mask 1, not 0


def test_bad_arguments_raise_erftool_errors():
    with pytest.raises(ErftoolError, match="mode"):
        enn.DeformKernel2d(4, 4, 3, mode="semi")
    with pytest.raises(ErftoolError, match="groups=3"):
        enn.DeformKernel2d(4, 4, 3, groups=3)
    with pytest.raises(ErftoolError, match="scope"):
        enn.DeformKernel2d(4, 4, 3, scope=2)
    with pytest.raises(ErftoolError, match="data_offset_groups"):
        enn.DeformKernelConv2d(4, 4, 3, data_offset_groups=3)
    assert issubclass(ErftoolError, ValueError)
    assert math.isfinite(enn.DeformConv2d(4, 4, 3).weight.sum().item())
