"""The plotting modules on synthetic maps: structure, labels, formats, edge cases."""
import numpy as np
import pytest

from erftool import plotting as P
from erftool.plotting import growth, profiles, sampling


def gauss(h=32, w=32, cy=16, cx=16, sy=3.0, sx=None):
    yy, xx = np.indices((h, w))
    sx = sx or sy
    return np.exp(-((yy - cy) ** 2 / (2 * sy * sy) + (xx - cx) ** 2 / (2 * sx * sx)))


MAPS = {"rigid": gauss(), "dc": 0.5 * gauss(sy=6), "dk": 0.2 * gauss(sx=8)}


def _labels(fig):
    return [(a.get_xlabel(), a.get_ylabel(), a.get_title()) for a in fig.axes if a.get_visible()]


@pytest.mark.parametrize("mode", ["shared", "normalised"])
def test_comparison_grid_panels_and_colour_bar(mode):
    fig = P.comparison_grid(MAPS, mode=mode, title="layer x, rule abs, 4 images",
                            positions={k: (16, 16) for k in MAPS},
                            rf_boxes={k: (4, 4, 28, 28) for k in MAPS})
    images = [a for a in fig.axes if a.images]
    assert len(images) == 3 + 0  # three heatmaps; the colour bar axis has no AxesImage
    titles = [a.get_title() for a in images]
    assert all(any(name in t for t in titles) for name in MAPS)
    cbar = [a for a in fig.axes if "ERF" in a.get_ylabel() and not a.images]
    assert cbar, "one colour bar with a label"
    assert fig.get_suptitle() == "layer x, rule abs, 4 images"


def test_shared_scale_is_one_norm_and_normalised_divides_by_peak():
    shared = P.comparison_grid(MAPS, mode="shared")
    clims = {a.images[0].get_clim() for a in shared.axes if a.images}
    assert clims == {(0.0, 1.0)}  # the global max is rigid's 1.0
    norm = P.comparison_grid({"small": 0.01 * gauss()}, mode="normalised")
    data = [a.images[0].get_array() for a in norm.axes if a.images][0]
    assert np.isclose(np.max(data), 1.0)


def test_grid_marks_all_zero_maps_and_logs():
    fig = P.comparison_grid({"zero": np.zeros((8, 8)), "one": gauss(8, 8, 4, 4)}, log=True)
    texts = [t.get_text() for a in fig.axes for t in a.texts]
    assert "all-zero ERF" in texts


def test_grid_wraps_rows_and_hides_spare_axes():
    maps = {f"m{i}": gauss() for i in range(6)}
    fig = P.comparison_grid(maps)
    assert sum(1 for a in fig.axes if a.images) == 6
    assert any(not a.get_visible() for a in fig.axes)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        P.comparison_grid({})
    with pytest.raises(ValueError):
        P.comparison_grid({"a": np.zeros((2, 2, 2))})
    with pytest.raises(ValueError):
        P.comparison_grid(MAPS, mode="fancy")


def test_overlay_draws_rf_and_position():
    img = np.random.default_rng(0).random((32, 32, 3))
    fig = P.overlay(img, gauss(), positions=[(16, 16)], rf_boxes=[(2, 2, 30, 30)], title="t")
    ax = fig.axes[0]
    assert len(ax.patches) == 1 and ax.get_xlabel() == "x (px)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["theoretical RF", "probed unit"]
    with pytest.raises(ValueError, match="sizes differ"):
        P.overlay(np.zeros((10, 10)), gauss())


def test_overlay_accepts_chw_and_torch():
    torch = pytest.importorskip("torch")
    fig = P.overlay(torch.rand(3, 32, 32) * 4 - 2, torch.from_numpy(gauss()))
    assert fig.axes[0].images


def test_object_centre_comparison_layout():
    img = np.zeros((32, 32))
    rows = [{"label": "small object", "image": img, "maps": MAPS, "centre": (16, 16),
             "box": (12, 12, 20, 20)},
            {"label": "large object", "image": img, "maps": MAPS}]
    fig = P.object_centre_comparison(rows, list(MAPS), title="paper")
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 6
    assert [a.get_title() for a in panels[:3]] == list(MAPS)
    assert panels[0].get_ylabel() == "small object" and panels[3].get_ylabel() == "large object"


def test_radial_profile_and_mass_radius():
    r, mean, cum = P.radial_profile(gauss(64, 64, 32, 32, 4))
    assert mean[0] == pytest.approx(1.0) and cum[-1] == pytest.approx(1.0)
    assert np.all(np.diff(cum) >= -1e-12)
    r50 = P.mass_radius(cum, 0.5)
    # 2-D Gaussian: half the mass within sigma*sqrt(2 ln 2) ~ 4.7 px
    assert 4 <= r50 <= 6
    assert np.isnan(P.mass_radius(np.zeros(5), 0.5))
    _, _, cum0 = profiles.radial_profile(np.zeros((5, 5)))
    assert np.all(cum0 == 0)


def test_profiles_figure_two_labelled_panels():
    fig = P.profiles_figure(MAPS, rf_radius={"rigid": 10}, title="profiles")
    (a, b) = fig.axes
    assert "radius" in b.get_xlabel() and "mass" in b.get_ylabel()
    assert len(b.get_legend().get_texts()) == 3


def test_scaling_figure_reports_correlation():
    x = np.arange(10.0)
    r, slope, icpt = P.correlation(x, 2 * x + 1)
    assert r == pytest.approx(1.0) and slope == pytest.approx(2.0) and icpt == pytest.approx(1)
    assert np.isnan(P.correlation([1, 1], [2, 3])[0])
    fig = P.scaling_figure({"dk": (x, 2 * x + 1), "rigid": (x, np.full(10, 3.0))})
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("dk: r=+1.00") and labels[1] == "rigid"


def test_growth_theory_curves():
    n = np.array([1, 4, 16])
    assert np.allclose(growth.uniform_sigma(n, 3), np.sqrt(n * 8 / 12))
    assert np.allclose(growth.rf_size(n, 3), 2 * n + 1)
    fig = P.growth_figure(n, {"uniform": growth.uniform_sigma(n)})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any("slope 0.50" in t.get_text() for t in ax.get_legend().get_texts())


def test_sampling_figure_columns():
    rig = sampling.rigid_scope_positions(3, 5)
    assert rig.shape == (9, 2) and rig.min() == 1 and rig.max() == 3
    rows = [{"label": "small", "image": np.zeros((16, 16)), "centre": (8, 8),
             "dc_points": np.full((9, 2), 8.0), "scope": gauss(5, 5, 2, 2, 1),
             "dk_points": rig, "kernel_size": 3}]
    fig = P.sampling_figure(rows)
    assert len([a for a in fig.axes if a.get_title()]) == 2
    dk_only = P.sampling_figure([{"label": "x", "dk_points": rig, "kernel_size": 3}])
    assert len(dk_only.axes) == 1
    with pytest.raises(ValueError):
        P.sampling_figure([{"label": "x"}])


def test_speed_figure_ratio_labels():
    fig = P.speed_figure({"forward": {"56x56": {"deform_kernel2d": 4.0, "conv2d": 1.0}},
                          "forward + backward": {"56x56": {"deform_kernel2d": 9.0,
                                                           "conv2d": 3.0}}})
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0  # bars start at zero: lengths compare
    assert [t.get_text().strip() for t in ax.texts] == ["1.0x (1 ms)", "4.0x (4 ms)"]
    assert [t.get_text().strip() for t in fig.axes[1].texts] == ["1.0x (3 ms)", "3.0x (9 ms)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "conv2d"
    with pytest.raises(ValueError):
        P.speed_figure({})


def test_speed_figure_prefers_paired_ratios():
    times = {"forward": {"56x56": {"deform_kernel2d": 4.0, "conv2d": 1.0}}}
    fig = P.speed_figure(times, ratios={"forward": {"56x56": {"deform_kernel2d": 2.5}}})
    ax = fig.axes[0]
    assert [t.get_text().strip() for t in ax.texts] == ["1.0x (1 ms)", "2.5x paired (4 ms)"]
    assert sorted(p.get_width() for p in ax.patches) == [1.0, 2.5]


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_save_formats(tmp_path, fmt):
    out = P.save(P.comparison_grid({"a": gauss()}), tmp_path / "grid", fmt)
    assert out.suffix == "." + fmt and out.stat().st_size > 1000
    magic = out.read_bytes()[:5]
    assert magic.startswith({"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[fmt])


def test_save_is_deterministic_and_checks_format(tmp_path):
    a = P.save(P.profiles_figure(MAPS), tmp_path / "a", "svg").read_bytes()
    b = P.save(P.profiles_figure(MAPS), tmp_path / "b", "svg").read_bytes()
    assert a == b
    with pytest.raises(ValueError, match="format"):
        P.save(P.profiles_figure(MAPS), tmp_path / "c", "gif")
