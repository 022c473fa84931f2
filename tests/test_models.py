"""erftool.models: the registry, the resnet-tiny family, torchvision-compatible
ResNets and linear stacks."""
import pytest
import torch
from torch import nn

import erftool.nn as enn
from erftool.errors import ErftoolError
from erftool.models import convert_stages, create_model, list_models

OPS = ("rigid", "dc", "dk-local", "dk-global", "dk+dc")

# The key layout of torchvision.models.resnet50().state_dict() (first block of
# each kind), written out so the test needs no torchvision.
TORCHVISION_RESNET50_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
    "layer1.0.conv2.weight", "layer1.0.conv3.weight", "layer1.0.bn3.running_var",
    "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
    "layer1.0.downsample.1.num_batches_tracked", "layer2.3.conv3.weight",
    "layer3.5.bn2.bias", "layer4.2.conv3.weight", "fc.weight", "fc.bias",
]


def test_listing_has_descriptions_for_every_model():
    listing = list_models()
    for name in ["linear-stack", "resnet18", "resnet34", "resnet50", "resnet-tiny"] + [
            f"resnet-tiny-{op}" for op in OPS]:
        assert name in listing and listing[name] and "\n" not in listing[name]


def test_unknown_names_and_options_are_clear_errors():
    with pytest.raises(ErftoolError, match="unknown model 'resnet-huge'"):
        create_model("resnet-huge")
    with pytest.raises(ErftoolError, match="no option 'depthh'"):
        create_model("linear-stack", depthh=3)
    with pytest.raises(ErftoolError, match="fixes op"):
        create_model("resnet-tiny-dc", op="dk-local")
    with pytest.raises(ErftoolError, match="unknown op"):
        create_model("resnet-tiny", op="deformable")


def test_aliases():
    assert create_model("dk_local", widths=(4, 8, 8)).erftool_arch == "resnet-tiny-dk-local"
    assert create_model("resnet_tiny_dk_dc", widths=(4, 8, 8)).erftool_arch == "resnet-tiny-dk+dc"


def test_resnet_tiny_variants_differ_only_in_the_chosen_stages():
    shapes = {}
    for op in OPS:
        torch.manual_seed(0)
        model = create_model(f"resnet-tiny-{op}", widths=(4, 8, 8))
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)
        shapes[op] = {k: v.shape for k, v in model.state_dict().items()
                      if not k.startswith(("layer2", "layer3"))}
        def rigid3x3(stage):
            return any(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in stage.modules())
        assert rigid3x3(model.layer1)
        assert rigid3x3(model.layer3) == (op == "rigid")
    assert all(s == shapes["rigid"] for s in shapes.values())


def test_resnet_tiny_variants_start_from_the_same_function():
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for op in OPS:
        torch.manual_seed(0)
        outs.append(create_model(f"resnet-tiny-{op}", widths=(4, 8, 8)).eval()(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)


def test_resnet50_has_torchvision_keys_and_parameter_count():
    model = create_model("resnet50")
    keys = model.state_dict().keys()
    for key in TORCHVISION_RESNET50_KEYS:
        assert key in keys, key
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's count
    assert sum(p.numel() for p in create_model("resnet18").parameters()) == 11_689_512


def test_resnet_deformable_stages_keep_keys_and_outputs():
    torch.manual_seed(0)
    rigid = create_model("resnet18", num_classes=10).eval()
    torch.manual_seed(0)
    dk = create_model("resnet18", num_classes=10, op="dk-local", stages=(4,), scope=5).eval()
    assert isinstance(dk.layer4[0].conv1, enn.DeformKernel2d)
    assert isinstance(dk.layer3[0].conv1, nn.Conv2d)
    assert dk.state_dict()["layer4.0.conv1.weight"].shape[-2:] == (5, 5)
    assert "layer4.0.conv1.kernel_offset.weight" in dk.state_dict()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dk(x), rigid(x), rtol=1e-4, atol=1e-5)


def test_convert_stages_rejects_missing_stage():
    with pytest.raises(ErftoolError, match="layer7"):
        convert_stages(create_model("resnet-tiny", widths=(4, 8, 8)), "dc", (7,))


@pytest.mark.parametrize("op", OPS)
def test_linear_stack_is_linear_and_keeps_size(op):
    model = create_model("linear-stack", depth=3, channels=2, op=op, scope=5, dilation=2)
    x, y = torch.randn(1, 2, 17, 17), torch.randn(1, 2, 17, 17)
    assert model(x).shape == x.shape
    torch.testing.assert_close(model(x + 2 * y), model(x) + 2 * model(y), rtol=1e-4, atol=1e-5)


def test_linear_stack_uniform_init_gives_the_binomial_erf():
    # 1-D slice of the ERF of two uniform 3-tap layers: (1, 2, 3, 2, 1) / 9 per axis.
    model = create_model("linear-stack", depth=2, op="dk-local", scope=4)
    x = torch.zeros(1, 1, 9, 9, requires_grad=True)
    model(x)[0, 0, 4, 4].backward()
    row = torch.tensor([1.0, 2, 3, 2, 1]) / 9
    torch.testing.assert_close(x.grad[0, 0, 2:7, 2:7], torch.outer(row, row))
