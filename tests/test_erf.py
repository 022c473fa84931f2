"""compute_erf: correctness of the batched engine, inputs, positions, errors, I/O."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from erftool.erf import (ERFResult, PerImage, compute_erf, frozen_offsets, input_to_layer,
                         offsets_frozen, offsets_mode, prepare_offsets, zero_offsets)
from erftool.theory.linear import compose_kernels


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).double().eval()


def images(n=5, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def loop_erf(model, x, layer_module, pos, rule="abs"):
    """Per-image reference: one backward per image, like RepLKNet's script."""
    maps = []
    for img in x:
        img = img[None].clone().requires_grad_(True)
        feats = []
        h = layer_module.register_forward_hook(lambda m, i, o: feats.append(o))
        model(img)
        h.remove()
        g, = torch.autograd.grad(feats[0][0, :, pos[0], pos[1]].sum(), img)
        g = {"abs": g.abs(), "signed": g, "relu": g.clamp_min(0), "square": g * g}[rule]
        maps.append(g[0].sum(0).numpy())
    return np.mean(maps, axis=0)


def test_linear_stack_equals_kernel_composition():
    torch.manual_seed(0)
    convs = [nn.Conv2d(2, 2, 3, padding=1, bias=False) for _ in range(3)]
    net = nn.Sequential(*convs).double().eval()
    x = images(2, 13)[:, :2]
    res = compute_erf(net, x, rule="signed", rf=False, metrics=False)
    t = compose_kernels([c.weight.detach().numpy() for c in convs]).sum(axis=(0, 1))
    want = np.zeros((13, 13))
    want[3:10, 3:10] = t
    np.testing.assert_allclose(res.map, want, atol=1e-12)
    assert res.count == 2 and res.skipped == 0


@pytest.mark.parametrize("rule", ["signed", "abs", "relu", "square"])
def test_batched_matches_per_image_loop(rule):
    net = small_net()
    x = images(5)
    res = compute_erf(net, x, layer="5", position=(3, 4), rule=rule, batch_size=2, metrics=False)
    np.testing.assert_allclose(res.map, loop_erf(net, x, net[5], (3, 4), rule), atol=1e-12)
    assert res.protocol["layer"] == "5" and res.protocol["rule"] == rule


def test_several_positions_in_one_pass_match_single_calls():
    net, x = small_net(), images(3)
    pts = [(0, 0), (4, 4), (7, 2)]
    multi = compute_erf(net, x, layer="5", position=pts, rule="abs", batch_size=4, metrics=False)
    assert multi.maps.shape == (3, 16, 16)
    for i, p in enumerate(pts):
        single = compute_erf(net, x, layer="5", position=p, rule="abs", rf=False, metrics=False)
        np.testing.assert_allclose(multi.maps[i], single.map, atol=1e-12)
    assert multi.rf_boxes.shape == (3, 4)


def test_per_image_positions_layer_and_input_space():
    net, x = small_net(), images(3)
    pts = np.array([[1, 2], [5, 5], [7, 0]])
    res = compute_erf(net, x, layer="5", position=PerImage(pts), rule="abs", keep_per_image=True,
                      metrics=False)
    for i, p in enumerate(pts):
        np.testing.assert_allclose(res.per_image[i, 0], loop_erf(net, x[i:i + 1], net[5], p),
                                   atol=1e-12)
    # input pixels (2y, 2x) of a stride-2 map land on layer cell (y, x)
    res2 = compute_erf(net, x, layer="5", position=PerImage(pts * 2 + 1, space="input"),
                       rule="abs", metrics=False)
    np.testing.assert_allclose(res2.map, res.map, atol=1e-12)
    np.testing.assert_array_equal(res2.image_positions, pts)


def test_input_to_layer_mapping():
    np.testing.assert_array_equal(input_to_layer([[0, 0], [31, 63], [100, 5]], (64, 64), (2, 2)),
                                  [[0, 0], [0, 1], [1, 0]])


def test_iterables_tuples_dicts_and_max_images():
    net, x = small_net(), images(6)
    ref = compute_erf(net, x, rule="abs", rf=False, metrics=False)
    as_tuples = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))]
    as_dicts = ({"image": x[i:i + 2], "label": 0} for i in range(0, 6, 2))
    for inputs in (as_tuples, as_dicts, list(x)):
        np.testing.assert_allclose(compute_erf(net, inputs, rule="abs", rf=False,
                                               metrics=False).map, ref.map, atol=1e-12)
    part = compute_erf(net, as_tuples, rule="abs", max_images=3, rf=False, metrics=False)
    assert part.count == 3
    batch_pos = [{"x": x[:3], "position": [[1, 1], [2, 2], [3, 3]]}]
    res = compute_erf(net, batch_pos, layer="5", position="batch", rule="abs", metrics=False,
                      keep_per_image=True)
    np.testing.assert_allclose(res.per_image[2, 0], loop_erf(net, x[2:3], net[5], (3, 3)),
                               atol=1e-12)


def test_default_layer_is_last_spatial_module():
    res = compute_erf(small_net(), images(1), rf=False, metrics=False)
    assert res.protocol["layer"] == "5" and res.protocol["layer_size"] == [8, 8]
    conv = nn.Sequential(nn.Conv2d(3, 2, 3)).eval()
    assert compute_erf(conv, images(1).float(), rf=False, metrics=False).protocol["layer"] == ""


def test_probe_stops_the_forward_early():
    net, calls = small_net(), []
    net[8].register_forward_hook(lambda *a: calls.append(1))
    compute_erf(net, images(2), layer="3", rf=False, metrics=False)
    assert not calls


def test_channels_and_relu_seed():
    net, x = small_net(), images(2)
    both = compute_erf(net, x, layer="5", channels=[0, 1], metrics=False, rf=False)
    one = compute_erf(net, x, layer="5", channels=0, metrics=False, rf=False)
    two = compute_erf(net, x, layer="5", channels=[1], metrics=False, rf=False)
    np.testing.assert_allclose(both.map, one.map + two.map, atol=1e-12)
    gated = compute_erf(net, x, layer="5", seed="relu", rule="relu", metrics=False, rf=False)
    assert gated.protocol["seed"] == "relu" and np.all(gated.map >= 0)


class NaNOnNegativeMean(nn.Module):
    def forward(self, x):
        bad = (x.detach().mean(dim=(1, 2, 3)) < -5).view(-1, 1, 1, 1)
        scale = torch.where(bad, torch.full_like(bad, float("nan"), dtype=x.dtype),
                            torch.ones_like(bad, dtype=x.dtype))
        return x * scale


def test_nan_images_are_skipped_and_counted():
    net = nn.Sequential(NaNOnNegativeMean(), nn.Conv2d(3, 2, 3, padding=1)).double().eval()
    x = images(6)
    x[1] -= 10
    x[4] -= 10
    res = compute_erf(net, x, rule="abs", rf=False, metrics=False)
    assert (res.count, res.skipped) == (4, 2) and np.isfinite(res.map).all()


def test_theoretical_rf_exact_for_conv_stack_with_pooling():
    net = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 2, 3, padding=2, dilation=2)).eval()
    res = compute_erf(net, torch.randn(1, 1, 40, 40), position=(10, 10), metrics=False)
    # conv3-d2 spans 8..12 on the pooled map -> pixels 16..25 -> conv5 adds 2 each side
    assert res.rf_box == (14, 14, 27, 27)


# errors ---------------------------------------------------------------------
def test_errors_are_one_line_value_errors():
    net, x = small_net(), images(2)
    cases = [
        (dict(model=net, inputs=x, layer="5x"), "close matches: 5"),
        (dict(model=net, inputs=x, layer="5", position=(8, 1)), "size 8x8"),
        (dict(model=net, inputs=torch.zeros(0, 3, 8, 8)), "no images"),
        (dict(model=net, inputs=[]), "no images"),
        (dict(model=net, inputs=images(2)[:, :2]), "channel"),
        (dict(model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2)).double().eval(),
              inputs=x), "no spatial output"),
        (dict(model=net, inputs=x, rule="sum"), "unknown rule"),
        (dict(model=net, inputs=x, layer="5", channels=[9]), "channels"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError) as info:
            compute_erf(kwargs.pop("model"), kwargs.pop("inputs"), metrics=False, **kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value)
    net.train()
    with pytest.raises(ValueError, match="training mode"):
        compute_erf(net, x)


# offsets policy ---------------------------------------------------------------
class GeneratedShift(nn.Module):
    """Toy deformable layer: a data-dependent shift generated from the input."""

    def forward(self, x):
        offset = prepare_offsets(x.mean(dim=1, keepdim=True))
        return x * 2 + offset * x.sum()


def test_offset_policy_flags_and_frozen_erf():
    assert offsets_mode() == "total" and not offsets_frozen()
    with frozen_offsets():
        assert offsets_frozen() and offsets_mode() == "frozen"
        with zero_offsets():
            assert offsets_mode() == "zero"
        assert offsets_mode() == "frozen"
    assert offsets_mode() == "total"
    net, x = nn.Sequential(GeneratedShift()).eval(), images(2)
    frozen = compute_erf(net, x, offsets="frozen", rule="signed", rf=False, metrics=False)
    total = compute_erf(net, x, offsets="total", rule="signed", rf=False, metrics=False)
    assert frozen.protocol["offsets"] == "frozen"
    assert not np.allclose(frozen.map, total.map)
    # frozen path: d(2 x_c + m x_sum)/dx with m fixed -> 2 at the probe + m everywhere
    assert offsets_mode() == "total"


# I/O --------------------------------------------------------------------------
def test_save_load_roundtrip_and_replknet_export(tmp_path):
    res = compute_erf(small_net(), images(2), layer="5", position=[(1, 1), (3, 3)],
                      rule="abs", keep_per_image=True)
    path = tmp_path / "erf.npz"
    res.save(path)
    back = ERFResult.load(path)
    np.testing.assert_array_equal(back.maps, res.maps)
    np.testing.assert_array_equal(back.per_image, res.per_image)
    np.testing.assert_array_equal(back.rf_boxes, res.rf_boxes)
    assert back.protocol == json.loads(json.dumps(res.protocol))
    assert back.metrics["std"] == pytest.approx(res.metrics["std"])
    assert [p.name for p in tmp_path.iterdir()] == ["erf.npz"]  # no temp files left
    res.export_replknet(tmp_path / "m.npy", index=1)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), res.maps[1])


def test_vmap_and_replicated_backward_agree_including_custom_ops():
    from erftool.erf.backprop import input_gradients
    from erftool.theory.checks import _dc_layers
    from erftool.theory.nets import TheoryNet

    net, x = small_net(), images(2)
    pos = torch.tensor([[[1, 1], [2, 3]], [[7, 7], [0, 5]]])
    a = input_gradients(net, net[5], x, pos, vmap=True)
    b = input_gradients(net, net[5], x, pos, vmap=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    dc = TheoryNet(_dc_layers(np.random.default_rng(0), 2, 2, 9, 9)).eval()
    xd = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    multi = compute_erf(dc, xd, layer="", position=[(1, 1), (4, 6)], metrics=False, rf=False)
    for i, p in enumerate([(1, 1), (4, 6)]):
        one = compute_erf(dc, xd, layer="", position=p, metrics=False, rf=False)
        np.testing.assert_allclose(multi.maps[i], one.map, atol=1e-12)
