"""erftool.erf.metrics on maps with known answers."""
import json
import math

import numpy as np
import pytest

from erftool.erf import metrics as M


def gaussian(h, w, cy, cx, sy, sx, theta=0.0):
    ys, xs = np.indices((h, w)).astype(float)
    dy, dx = ys - cy, xs - cx
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * dy + s * dx, -s * dy + c * dx
    return np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))


def replknet_get_rectangle(data, thresh):
    """RepLKNet's analyze_erf.py procedure, restated for the test."""
    h, w = data.shape
    total = data.sum()
    for i in range(1, h // 2):
        part = data[h // 2 - i:h // 2 + i + 1, w // 2 - i:w // 2 + i + 1].sum()
        if part / total > thresh:
            return i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w
    return None


def test_mass_centroid_std():
    m = gaussian(81, 81, 40, 37, 5, 3)
    assert M.total_mass(m) == pytest.approx(2 * math.pi * 15, rel=1e-6)
    assert M.centroid(m) == pytest.approx((40, 37), abs=1e-6)
    assert M.axis_std(m) == pytest.approx((5, 3), rel=1e-4)
    assert M.centroid(-m) == pytest.approx((40, 37), abs=1e-6)  # signed maps use |M|
    assert all(math.isnan(v) for v in M.centroid(np.zeros((5, 5))))


def test_gaussian_fit_recovers_rotated_gaussian():
    m = 3 * gaussian(64, 64, 30, 33, 6, 2.5, theta=0.4) + 0.1
    fit = M.gaussian_fit(m)
    assert fit.success
    assert (fit.sigma_y, fit.sigma_x) == pytest.approx((6, 2.5), rel=1e-4)
    assert fit.theta == pytest.approx(0.4, abs=1e-4)
    assert (fit.y0, fit.x0, fit.amplitude, fit.offset) == pytest.approx((30, 33, 3, 0.1), rel=1e-4)


def test_gaussian_fit_block_averages_large_maps():
    m = gaussian(600, 600, 300, 300, 40, 20)
    fit = M.gaussian_fit(m, max_side=200)
    assert (fit.sigma_y, fit.sigma_x) == pytest.approx((40, 20), rel=0.02)


@pytest.mark.parametrize("t", M.REPLKNET_THRESHOLDS)
def test_area_ratio_matches_replknet_procedure(t):
    rng = np.random.default_rng(0)
    m = 1e4 * gaussian(65, 65, 32, 32, 4, 6) + rng.uniform(0, 1, (65, 65))
    logged = np.log10(m + 1)
    logged = logged / logged.max()
    want = replknet_get_rectangle(logged, t)
    got = M.replknet_area_ratio(m, t)
    raw = M.replknet_area_ratio(m, t, log_scale=False)
    want_raw = replknet_get_rectangle(m, t)
    for mine, theirs in ((got, want), (raw, want_raw)):
        if theirs is None:  # RepLKNet would crash here (None unpacked)
            assert not mine.reached and math.isnan(mine.ratio)
        else:
            assert mine.reached and (mine.side, mine.ratio) == (theirs[0], pytest.approx(theirs[1]))
    if want is not None and want_raw is not None:
        assert raw.side <= got.side  # the log flattens the map -> larger squares


def test_area_ratio_unreached_threshold_is_flagged_not_crashing():
    m = np.ones((11, 11))  # largest square tried is 9x9 = 81/121 < 0.99
    r = M.replknet_area_ratio(m, 0.99, log_scale=False)
    assert not r.reached and r.side is None and math.isnan(r.ratio)
    assert M.replknet_area_ratio(np.zeros((9, 9)), 0.2).reached is False
    assert M.replknet_area_ratio(m, 0.5, log_scale=False).side == 9


def test_effective_area():
    m = np.zeros((10, 10))
    m[2, 3], m[5, 5], m[7, 1] = 90, 6, 4
    assert M.effective_area(m) == (2, 0.02)
    assert M.effective_area(m, mass=0.9) == (1, 0.01)
    assert M.effective_area(np.ones((4, 4))) == (16, 1.0)


def test_std_to_rf_and_radial_profile():
    m = gaussian(41, 41, 20, 20, 4, 4)
    ratio = M.std_to_rf_ratio(m, (0, 0, 40, 40))
    assert ratio == pytest.approx((4 / 41, 4 / 41), rel=1e-3)
    assert all(math.isnan(v) for v in M.std_to_rf_ratio(m, None))
    prof = M.radial_profile(m)
    assert prof["cumulative"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(prof["cumulative"]) >= 0)
    assert prof["ring_mean"][0] == pytest.approx(1.0)
    assert prof["ring_mass"].sum() == pytest.approx(m.sum())


def test_summary_is_json_friendly():
    s = M.summary(gaussian(21, 21, 10, 10, 2, 3), rf_box=(0, 0, 20, 20))
    text = json.dumps(s)
    assert "area_ratio_log" in s and s["rf_size"] == [21, 21] and "gaussian" in text
