"""The ERF theory checks (what `erftool verify` runs) and property-based tests."""
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erftool.erf import compute_erf
from erftool.theory import format_table, run_checks, to_json
from erftool.theory.checks import CheckResult
from erftool.theory.linear import compose_kernels, multinomial, rf_size
from erftool.theory.nets import TheoryNet
from erftool.theory.pathsum import Layer, path_sum_erf, sizes

SLOW = settings(max_examples=6, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def quick_results():
    return run_checks(quick=True)


def test_all_quick_checks_pass(quick_results):
    assert quick_results and all(r.passed for r in quick_results), format_table(quick_results)
    names = {r.name for r in quick_results}
    for needed in ("rigid_composition", "ones_sigma_slope", "random_weight_variance",
                   "dc_path_sum", "dk_local_path_sum", "dk_global_path_sum", "dk_rf_untouched",
                   "dc_support_moves", "global_dk_equals_rigid", "relu_gated_dk"):
        assert needed in names


def test_formatters(quick_results):
    table = format_table(quick_results)
    assert "PASS" in table and f"{len(quick_results)}/{len(quick_results)} checks passed" in table
    rows = json.loads(to_json(quick_results))
    assert {"name", "formula", "max_error", "tolerance", "passed"} <= set(rows[0])
    bad = [CheckResult("x", "f", float("nan"), 0.0, False, "error: boom")]
    assert json.loads(to_json(bad))[0]["max_error"] is None and "FAIL" in format_table(bad)


def test_broken_check_is_reported_not_raised(monkeypatch):
    def boom(quick, rng, backend):
        raise RuntimeError("broken\nsecond line")
    monkeypatch.setattr("erftool.theory.checks.CHECKS", [boom])
    (r,) = run_checks(quick=True)
    assert not r.passed and r.detail == "error: RuntimeError: broken"


def test_closed_forms():
    assert list(multinomial(2, 4)) == [1, 4, 6, 4, 1]
    assert rf_size([3, 3, 3]) == 7 and rf_size([3, 3], [2, 1]) == 7 and rf_size([3], None, [4]) == 9
    a, b = np.random.default_rng(0).standard_normal((2, 1, 1, 3, 3))
    t = compose_kernels([a, b])
    assert t.shape == (1, 1, 5, 5)
    np.testing.assert_allclose(t.sum(), a.sum() * b.sum())


# property-based: random geometry and offsets ------------------------------------------
def _erf_vs_pathsum(layers, h, w, seed):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.standard_normal((1, layers[0].weight.shape[1], h, w)))
    ho, wo = sizes(layers, h, w)[-1]
    pos = (int(rng.integers(ho)), int(rng.integers(wo)))  # anywhere, borders included
    got = compute_erf(TheoryNet(layers).eval(), x, layer="", position=pos, metrics=False,
                      rf=False).map
    want = path_sum_erf(layers, (h, w), pos).sum(0)
    return np.abs(got - want).max()


@SLOW
@given(n=st.integers(1, 4), k=st.sampled_from([1, 2, 3, 5]), d=st.integers(1, 2),
       stride=st.integers(1, 2), c=st.integers(1, 2), seed=st.integers(0, 2 ** 16))
def test_rigid_any_geometry_matches_path_sum(n, k, d, stride, c, seed):
    rng = np.random.default_rng(seed)
    layers = [Layer("rigid", rng.standard_normal((c, c, k, k)), stride=stride if i == 0 else 1,
                    dilation=d, padding=int(rng.integers(0, 2))) for i in range(n)]
    h = w = 6 + stride * n * d * k  # the first layer's stride halves what the others get
    assert _erf_vs_pathsum(layers, h, w, seed) < 1e-10


@SLOW
@given(n=st.integers(1, 3), spread=st.floats(0.0, 4.0), d=st.integers(1, 2),
       mask=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_dc_random_offsets_match_path_sum(n, spread, d, mask, seed):
    rng = np.random.default_rng(seed)
    h = w = 9
    layers = []
    for _ in range(n):
        lay = Layer("dc", rng.standard_normal((2, 2, 3, 3)), padding=d, dilation=d)
        lay.offset = rng.uniform(-spread, spread, (18, h, w))
        lay.mask = rng.uniform(0, 1, (9, h, w)) if mask else None
        layers.append(lay)
    assert _erf_vs_pathsum(layers, h, w, seed) < 1e-10


@SLOW
@given(n=st.integers(1, 3), scope=st.integers(3, 5), spread=st.floats(0.0, 3.0),
       glob=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_dk_random_offsets_match_path_sum_and_keep_rf(n, scope, spread, glob, seed):
    rng = np.random.default_rng(seed)
    h = w = 9
    layers = [Layer("dk", rng.standard_normal((2, 2, scope, scope)), kernel_size=(3, 3),
                    padding=1, offset=rng.uniform(-spread, spread, (18,) if glob else (18, h, w)))
              for _ in range(n)]
    assert _erf_vs_pathsum(layers, h, w, seed) < 1e-10
    # DK never leaves the rigid RF: support within n pixels of the probe
    res = compute_erf(TheoryNet(layers).eval(), torch.randn(1, 2, h, w, dtype=torch.float64),
                      layer="", position=(4, 4), rule="abs", metrics=False, rf=False)
    ys, xs = np.nonzero(res.map)
    assert len(ys) == 0 or (np.abs(ys - 4).max() <= n and np.abs(xs - 4).max() <= n)
