"""Numerical verification of the ERF theory against compute_erf's backprop ERFs.

Every check builds a small network, computes its ERF twice -- once from a
closed form / explicit path sum (erftool.theory, numpy, no autograd) and once
with erftool.erf.compute_erf (autograd through torch conv2d and erftool.ops)
-- in float64, and reports the largest discrepancy against a tolerance.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import nn

from ..erf import compute_erf
from ..erf.metrics import axis_std
from ..erf.rf import support_box
from .bilinear import resample_scope
from .linear import compose_kernels, ones_erf, ones_variance, rf_size
from .nets import TheoryNet
from .pathsum import Layer, path_sum_erf, sizes

EXACT = 1e-10


@dataclass
class CheckResult:
    """One verification: `max_error` must not exceed `tolerance`."""

    name: str
    formula: str
    max_error: float
    tolerance: float
    passed: bool
    detail: str = ""
    seconds: float = 0.0


def _result(name, formula, err, tol, detail=""):
    err = float(err)
    return CheckResult(name, formula, err, float(tol), bool(np.isfinite(err) and err <= tol), detail)


def _erf(net, x, pos=None, **kw):
    kw.setdefault("rf", False)
    return compute_erf(net, x, layer="", position=pos, metrics=False, **kw)


def _image(rng, c, h, w):
    return torch.as_tensor(rng.standard_normal((1, c, h, w)))


def _centre(layers, h, w):
    ho, wo = sizes(layers, h, w)[-1]
    return ho // 2, wo // 2


def _rigid_stack(rng, n, k, d, c, ones=False):
    pad = d * (k - 1) // 2
    return [Layer("rigid", np.ones((1, 1, k, k)) if ones else rng.standard_normal((c, c, k, k)),
                  padding=pad, dilation=d) for _ in range(n)]


def _pathsum_compare(layers, rng, h, w, backend, relu=False):
    """max |ERF_backprop - ERF_pathsum| (summed over input channels) and scale."""
    net = TheoryNet(layers, backend=backend).eval()
    x = _image(rng, layers[0].weight.shape[1], h, w)
    pos = _centre(layers, h, w)
    got = _erf(net, x, pos).map
    gates = net.gates(x[0]) if relu else None
    want = path_sum_erf(layers, (h, w), pos, gates=gates).sum(0)
    return float(np.abs(got - want).max()), float(np.abs(want).max())


# 1 ------------------------------------------------------------------------
def check_rigid_composition(quick, rng, backend):
    configs = [(3, 3, 1, 2), (2, 5, 2, 2), (3, 2, 1, 1)] if not quick else [(3, 3, 1, 2)]
    err, scale = 0.0, 0.0
    for n, k, d, c in configs:
        layers = _rigid_stack(rng, n, k, d, c)
        if k % 2 == 0:  # even kernels: "valid" convolutions
            for l in layers:
                l.padding = 0
        tot = compose_kernels([l.weight for l in layers], [l.dilation for l in layers])
        span = tot.shape[-1]
        h = w = span + 4
        pos = _centre(layers, h, w)
        want = np.zeros((h, w))
        y0 = pos[0] - sum(l.padding for l in layers)
        x0 = pos[1] - sum(l.padding for l in layers)
        want[y0:y0 + span, x0:x0 + span] = tot.sum(axis=(0, 1))
        got = _erf(TheoryNet(layers, backend).eval(), _image(rng, c, h, w), pos).map
        err = max(err, np.abs(got - want).max())
        scale = max(scale, np.abs(want).max())
    return _result("rigid_composition", "ERF = W_1 (x) W_2 (x) ... (x) W_n placed at j - sum p",
                   err, EXACT, f"{len(configs)} stacks (n,K,d,C) in {configs}; max |ERF| {scale:.3g}")


def check_rf_box(quick, rng, backend):
    """Surrogate RF box of compute_erf == 1 + sum (k-1) d prod s, at the right place."""
    ks, ss, ds = [3, 3, 5, 3], [2, 1, 2, 1], [1, 2, 1, 1]
    layers = [Layer("rigid", rng.standard_normal((2, 2, k, k)), stride=s, dilation=d,
                    padding=d * (k - 1) // 2) for k, s, d in zip(ks, ss, ds)]
    h = w = 64
    pos = _centre(layers, h, w)
    res = compute_erf(TheoryNet(layers, backend).eval(), _image(rng, 2, h, w), layer="",
                      position=pos, metrics=False, rf=True)
    size = rf_size(ks, ss, ds)
    strides = np.cumprod([1] + ss[:-1])
    start = pos[0] * int(np.prod(ss)) - sum(l.padding * j for l, j in zip(layers, strides))
    want = np.array([start, start, start + size - 1, start + size - 1])
    err = np.abs(np.asarray(res.rf_box) - want).max()
    return _result("rf_box", "RF = 1 + sum_l (k_l - 1) d_l prod_{m<l} s_m (box of the positive surrogate)",
                   err, 0, f"k={ks} s={ss} d={ds}: RF {size}, box {res.rf_box}")


# 2 ------------------------------------------------------------------------
def _ones_map(n, k, d, backend):
    layers = _rigid_stack(None, n, k, d, 1, ones=True)
    span = n * d * (k - 1) + 1
    h = w = span + 2
    net = TheoryNet(layers, backend).eval()
    return _erf(net, torch.zeros(1, 1, h, w, dtype=torch.float64), _centre(layers, h, w)).map, span


def check_ones_multinomial(quick, rng, backend):
    configs = [(5, 2, 1), (4, 3, 1), (3, 3, 2)] if not quick else [(4, 3, 1)]
    err = 0.0
    for n, k, d in configs:
        got, span = _ones_map(n, k, d, backend)
        want = ones_erf(k, n, d)
        s = (got.shape[0] - span) // 2
        full = np.zeros_like(got)
        full[s:s + span, s:s + span] = want
        err = max(err, np.abs(got - full).max())
    return _result("ones_multinomial", "ERF_axis = coeffs of (1 + z^d + ... + z^{d(K-1)})^n", err,
                   EXACT, f"(n,K,d) in {configs}")


def check_ones_variance(quick, rng, backend):
    ns = [1, 2, 4, 8, 16, 32] if quick else list(range(1, 33))
    k = 3
    sig, rel = [], 0.0
    for n in ns:
        got, span = _ones_map(n, k, 1, backend)
        sy, sx = axis_std(got)
        want = ones_variance(k, n)
        rel = max(rel, abs(sy ** 2 / want - 1), abs(sx ** 2 / want - 1))
        sig.append(sy)
    slope = np.polyfit(np.log(ns), np.log(sig), 1)[0]
    rf = np.array([n * (k - 1) + 1 for n in ns], dtype=float)
    rf_slope = np.polyfit(np.log(ns), np.log(rf - 1), 1)[0]
    raw_slope = np.polyfit(np.log(ns), np.log(rf), 1)[0]
    out = [_result("ones_variance", "Var_axis = n (K^2 - 1) / 12", rel, EXACT,
                   f"K={k}, n in {ns[0]}..{ns[-1]} (relative error)"),
           _result("ones_sigma_slope", "d log sigma / d log n = 1/2", abs(slope - 0.5), 0.02,
                   f"slope {slope:.6f}; theoretical RF: slope of log(RF-1) {rf_slope:.6f}, "
                   f"of log RF {raw_slope:.3f} over n={ns[0]}..{ns[-1]}")]
    got1, _ = _ones_map(4, k, 1, backend)
    got2, _ = _ones_map(4, k, 2, backend)
    ratio = (axis_std(got2)[0] / axis_std(got1)[0]) ** 2
    out.append(_result("dilation_variance", "Var(d) / Var(1) = d^2 (d = 2)", abs(ratio - 4) / 4,
                       EXACT, f"ratio {ratio:.12f} (relative error)"))
    return out


# 3 ------------------------------------------------------------------------
def check_random_weights(quick, rng, backend):
    """Monte Carlo: E_W[g^2] = C^n * ones-map, one channel (M draws as the M
    channels of a depthwise net; rule="square" sums the draws' g^2)."""
    n, k, var = 3, 3, 0.5
    m = 4000 if quick else 16000
    tol = 0.35 if quick else 0.2
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    # float32: depthwise float64 convolutions are very slow on CPU and this is
    # a statistical check (tolerance >> float32 rounding).
    net = nn.Sequential(*[nn.Conv2d(m, m, k, groups=m, bias=False) for _ in range(n)]).eval()
    with torch.no_grad():
        for conv in net:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(var))
    span = n * (k - 1) + 1
    res = compute_erf(net, torch.zeros(1, m, span, span), layer="", rule="square",
                      metrics=False, rf=False)
    est = res.map / m
    want = var ** n * ones_erf(k, n)
    rel = np.abs(est / want - 1)
    mass = abs(est.sum() / want.sum() - 1)
    return _result("random_weight_variance", "E_W[(dO/dI)^2] = C^n * ones-map (Monte Carlo)",
                   rel.max(), tol, f"M={m} draws, n={n}, K={k}, C={var}; max relative error over "
                   f"the RF (tolerance ~ 4 standard errors), total-mass error {mass:.3g}")


# 4, 5 ---------------------------------------------------------------------
def _dc_layers(rng, n, c, h, w, k=3, d=1, stride=1, mask=False, spread=2.0):
    layers, size = [], (h, w)
    for i in range(n):
        s = stride if i == 0 else 1
        lay = Layer("dc", rng.standard_normal((c, c, k, k)), stride=s, dilation=d,
                    padding=d * (k - 1) // 2)
        ho, wo = lay.out_size(*size)
        lay.offset = rng.uniform(-spread, spread, (2 * k * k, ho, wo))
        if mask and i == 1:
            lay.mask = rng.uniform(0, 1, (k * k, ho, wo))
        layers.append(lay)
        size = (ho, wo)
    return layers


def _dk_layers(rng, n, c, h, w, k=3, scope=4, kind="local", d=1, data=False, spread=1.5):
    layers, size = [], (h, w)
    for _ in range(n):
        lay = Layer("dk", rng.standard_normal((c, c, scope, scope)), kernel_size=(k, k),
                    dilation=d, padding=d * (k - 1) // 2)
        ho, wo = lay.out_size(*size)
        shape = (2 * k * k, ho, wo) if kind == "local" else (2 * k * k,)
        lay.offset = rng.uniform(-spread, spread, shape)
        if data:
            lay.data_offset = rng.uniform(-2, 2, (2 * k * k, ho, wo))
        layers.append(lay)
        size = (ho, wo)
    return layers


def check_dc(quick, rng, backend):
    h = w = 11
    cases = [dict(), dict(mask=True), dict(d=2, stride=2)] if not quick else [dict(mask=True)]
    err = scale = 0.0
    for kw in cases:
        e, s = _pathsum_compare(_dc_layers(rng, 3, 2, h, w, **kw), rng, h, w, backend)
        err, scale = max(err, e), max(scale, s)
    return _result("dc_path_sum", "R_DC(i; j) = sum_k bilinear(i; j + k + dj_k) R(., k)", err, EXACT,
                   f"{len(cases)} nets of 3 DC layers (v1, v2 mask, dilation 2 + stride 2); "
                   f"max |ERF| {scale:.3g}")


def check_dk(quick, rng, backend):
    h = w = 11
    out = []
    for kind, data, name, formula in (
            ("local", False, "dk_local_path_sum", "R_DK(i; j) = sum_k R(i; j + k, k + dk_j)"),
            ("global", False, "dk_global_path_sum", "R_DK(i; j) = sum_k R(i; j + k, k + dk)"),
            ("local", True, "dk_dc_path_sum", "R(i; j) = sum_k bilinear(i; j + k + dj) R(., k + dk)")):
        if quick and data:
            continue
        cases = [dict(), dict(d=2)] if not quick else [dict()]
        err = scale = 0.0
        for kw in cases:
            layers = _dk_layers(rng, 3, 2, h, w, kind=kind, data=data, **kw)
            e, s = _pathsum_compare(layers, rng, h, w, backend)
            err, scale = max(err, e), max(scale, s)
        out.append(_result(name, formula, err, EXACT,
                           f"3 DK layers, K=3 from a 4x4 scope, {kind} kernel offsets"
                           f"{' + data offsets' if data else ''}, dilation 1 and 2; "
                           f"max |ERF| {scale:.3g}"))
    return out


# 6 ------------------------------------------------------------------------
def check_rf_untouched(quick, rng, backend):
    n, k, h = 3, 3, 17
    rigid_rf = rf_size([k] * n)
    out = []
    # DK: large random kernel offsets, support must stay inside the rigid RF.
    layers = _dk_layers(rng, n, 2, h, h, spread=3.0)
    pos = _centre(layers, h, h)
    res = compute_erf(TheoryNet(layers, backend).eval(), _image(rng, 2, h, h), layer="",
                      position=pos, rule="abs", metrics=False, rf=True)
    support = res.map > 0
    y0 = pos[0] - n * (k - 1) // 2
    inside = np.zeros_like(support)
    inside[y0:y0 + rigid_rf, y0:y0 + rigid_rf] = True
    outside = int((support & ~inside).sum())
    out.append(_result("dk_rf_untouched", "supp ERF_DK subset of the rigid RF (pixels outside)",
                       outside, 0, f"offsets in [-3, 3], rigid RF {rigid_rf}x{rigid_rf}, support box "
                       f"{support_box(support)}, compute_erf rf_box {res.rf_box}"))
    # DC: an integer offset delta per layer moves the whole ERF by n * delta.
    delta = 2
    layers = _dc_layers(rng, n, 2, h, h, spread=0.0)
    for lay in layers:
        lay.offset[0::2] = delta  # every tap's drow
    res = compute_erf(TheoryNet(layers, backend).eval(), _image(rng, 2, h, h), layer="",
                      position=pos, rule="abs", metrics=False)
    box = support_box(res.map > 0)
    shift = box[0] - y0
    out.append(_result("dc_support_moves", "supp ERF_DC = rigid RF shifted by n * delta",
                       abs(shift - n * delta) + abs(box[1] - y0), 0,
                       f"delta={delta} per layer, n={n}: support box {box}, rigid box starts at {y0}"))
    # Global DK == rigid net of the resampled kernels.
    layers = _dk_layers(rng, n, 2, h, h, kind="global")
    rigid = [Layer("rigid", resample_scope(l.weight, (k, k), l.offset.reshape(k * k, 2)),
                   padding=l.padding) for l in layers]
    x = _image(rng, 2, h, h)
    a = _erf(TheoryNet(layers, backend).eval(), x, pos).map
    b = _erf(TheoryNet(rigid, backend).eval(), x, pos).map
    detail = ""
    try:
        from erftool import ops
        w = torch.as_tensor(layers[0].weight)
        mine = torch.as_tensor(rigid[0].weight).unsqueeze(0)
        theirs = ops.resample_kernel(w, torch.as_tensor(layers[0].offset).unsqueeze(0), (k, k))
        detail = f"; ops.resample_kernel vs explicit: {float((theirs - mine).abs().max()):.2e}"
    except Exception as err:  # report, the check itself does not need it
        detail = f"; ops.resample_kernel unavailable ({type(err).__name__})"
    out.append(_result("global_dk_equals_rigid", "ERF(global DK) = ERF(rigid with W(k + dk))",
                       np.abs(a - b).max(), EXACT, f"n={n}, 4x4 scope{detail}"))
    return out


# 7 ------------------------------------------------------------------------
def check_relu(quick, rng, backend):
    h = w = 11
    out = []
    builders = (("rigid", lambda: _rigid_stack(rng, 3, 3, 1, 3)),
                ("dc", lambda: _dc_layers(rng, 3, 3, h, w)),
                ("dk", lambda: _dk_layers(rng, 3, 3, h, w)))
    for kind, build in builders:
        layers = build()
        for lay in layers[:-1]:
            lay.relu = True
            lay.bias = rng.standard_normal(lay.weight.shape[0]) * 0.5
        err, scale = _pathsum_compare(layers, rng, h, w, backend, relu=True)
        out.append(_result(f"relu_gated_{kind}", "ERF = path sum gated by 1[pre-activation > 0]",
                           err, EXACT, f"3 {kind} layers with ReLU + bias; max |ERF| {scale:.3g}"))
    return out


CHECKS: List[Callable] = [check_rigid_composition, check_rf_box, check_ones_multinomial,
                          check_ones_variance, check_random_weights, check_dc, check_dk,
                          check_rf_untouched, check_relu]


def run_checks(quick: bool = False, backend: Optional[str] = "reference", seed: int = 0,
               names: Optional[List[str]] = None) -> List[CheckResult]:
    """Run every verification; returns one CheckResult per formula.

    quick: fewer configurations (for tests); backend: erftool.ops backend for
    the deformable layers ("reference", "native", "auto"/None); names: only the
    check functions whose name contains one of these strings. A check that
    raises is reported as failed with the error in `detail`."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    results: List[CheckResult] = []
    for fn in CHECKS:
        if names and not any(n in fn.__name__ for n in names):
            continue
        start = time.perf_counter()
        try:
            got = fn(quick, rng, backend)
        except Exception as err:  # a broken check must show up, not abort the run
            got = CheckResult(fn.__name__.replace("check_", ""), "-", math.nan, 0.0, False,
                              f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        got = got if isinstance(got, list) else [got]
        spent = (time.perf_counter() - start) / len(got)
        for r in got:
            r.seconds = spent
        results.extend(got)
    return results


def format_table(results: List[CheckResult]) -> str:
    """Plain-text table: status, name, max error, tolerance, formula."""
    rows = [("", "check", "max error", "tolerance", "formula")]
    for r in results:
        rows.append(("PASS" if r.passed else "FAIL", r.name, f"{r.max_error:.3g}",
                     f"{r.tolerance:.3g}", r.formula))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(widths[i]) if i < 4 else v for i, v in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed}/{len(results)} checks passed")
    return "\n".join(lines)


def to_json(results: List[CheckResult]) -> str:
    """JSON list of the results (NaN errors as null)."""
    def clean(d):
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}
    return json.dumps([clean(asdict(r)) for r in results], indent=2)


def all_passed(results: List[CheckResult]) -> bool:
    return all(r.passed for r in results)
