"""Native CPU kernels, cases specific to the implementation: chunking of the
column buffer (whole images and output rows), empty problems, NaN/Inf
offsets, the depthwise and grouped layouts, mask without data offsets, the
fp32 oneDNN GEMM path, determinism, the depthwise pass and the band pipeline
of the backward.
The oracle is the pure-PyTorch column form of erftool.ops.reference,
differentiated by autograd, in float64."""
import math

import pytest
import torch

from erftool.ops import _args, _native, reference

pytestmark = pytest.mark.skipif(
    _native.load_native() is None, reason=f"native module unavailable: {_native.native_error()}")

DEFAULT_CHUNK = 256 << 20


def native_forward(t, cfg, chunk=DEFAULT_CHUNK):
    return torch.ops.erftool_native.deform_forward(
        t["input"], t["weight"], t.get("koff"), t.get("doff"), t.get("mask"), *_args_of(cfg),
        chunk)


def native_backward(grad, t, cfg, chunk=DEFAULT_CHUNK, mask5=(True,) * 5):
    return torch.ops.erftool_native.deform_backward(
        grad, t["input"], t["weight"], t.get("koff"), t.get("doff"), t.get("mask"),
        *_args_of(cfg), chunk, list(mask5))


def _args_of(cfg):
    return (list(cfg["k"]), list(cfg["s"]), list(cfg["p"]), list(cfg["d"]), cfg["groups"],
            cfg["G"], cfg["DG"])


def config(**kw):
    cfg = dict(N=2, C=4, O=4, H=6, W=7, k=(3, 3), S=(4, 4), s=(1, 1), p=(1, 1), d=(1, 1),
               groups=1, G=1, DG=1, koff=True, doff=False, mask=False)
    cfg.update(kw)
    return cfg


def out_size(cfg):
    return tuple((cfg["H" if i == 0 else "W"] + 2 * cfg["p"][i] - cfg["d"][i] * (cfg["k"][i] - 1)
                  - 1) // cfg["s"][i] + 1 for i in range(2))


def make(cfg, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = out_size(cfg)
    taps = cfg["k"][0] * cfg["k"][1]

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    t = {"input": r(cfg["N"], cfg["C"], cfg["H"], cfg["W"]),
         "weight": r(cfg["O"], cfg["C"] // cfg["groups"], *cfg["S"])}
    if cfg["koff"]:
        t["koff"] = r(cfg["N"], 2 * cfg["G"] * taps, ho, wo, scale=0.8)
    if cfg["doff"]:
        t["doff"] = r(cfg["N"], 2 * cfg["DG"] * taps, ho, wo, scale=1.5)
        if cfg.get("integer_doff"):  # whole pixels: every tap reads one pixel, unscaled
            t["doff"] = t["doff"].round()
    if cfg["mask"]:
        t["mask"] = torch.rand(cfg["N"], cfg["DG"] * taps, ho, wo, generator=g,
                               dtype=torch.float64).to(dtype)
    return t


def reference_forward(t, cfg):
    geom = _args.Geometry(tuple(cfg["k"]), tuple(cfg["s"]), tuple(cfg["p"]), tuple(cfg["d"]),
                          cfg["groups"], cfg["G"], cfg["DG"], out_size(cfg))
    return reference.deform_column_conv(
        t["input"], t["weight"], t.get("koff"), "local", t.get("doff"), t.get("mask"), None, geom)


NAMES = ["input", "weight", "koff", "doff", "mask"]


def reference_grads(t, cfg, grad):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    out = reference_forward(leaves, cfg)
    names = [n for n in NAMES if n in leaves]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad)
    return out.detach(), dict(zip(names, grads))


def check_against_reference(cfg, chunk=DEFAULT_CHUNK):
    t = make(cfg)
    ho, wo = out_size(cfg)
    grad = torch.randn(cfg["N"], cfg["O"], ho, wo, dtype=torch.float64)
    out_r, grads_r = reference_grads(t, cfg, grad)
    torch.testing.assert_close(native_forward(t, cfg, chunk), out_r, rtol=1e-10, atol=1e-10)
    grads_n = dict(zip(NAMES, native_backward(grad, t, cfg, chunk)))
    for name, expected in grads_r.items():
        torch.testing.assert_close(grads_n[name], expected, rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"grad of {name}: {m}")
    for name in NAMES:
        if name not in t:
            assert grads_n[name] is None


CASES = {
    "dk_scope4": config(),
    "dk_scope3": config(S=(3, 3)),
    "rigid_centred_scope": config(koff=False),
    "dc_v1": config(koff=False, S=(3, 3), doff=True),
    "dc_v2_scope4": config(koff=False, doff=True, mask=True),
    "dk_dc_mask": config(doff=True, mask=True),
    "mask_rigid_grid": config(mask=True),
    "groups_offset_groups": config(C=8, O=6, groups=2, G=4, DG=2, doff=True, mask=True),
    "offset_groups_across_weight_groups": config(C=6, O=4, groups=2, G=3, DG=3, doff=True),
    "depthwise_dk": config(C=8, O=8, groups=8, G=2),
    "depthwise_dk_dc": config(C=8, O=8, groups=8, G=2, DG=4, doff=True, mask=True),
    "depthwise_dc": config(C=8, O=8, groups=8, koff=False, S=(3, 3), doff=True),
    "channel_multiplier": config(C=4, O=8, groups=4, doff=True),
    "stride_dilation_nonsquare": config(k=(2, 3), S=(3, 5), s=(2, 1), p=(0, 2), d=(2, 1),
                                        H=9, W=8, doff=True, mask=True),
    "odd_scope_margin": config(k=(1, 3), S=(2, 4), s=(1, 2), p=(1, 0), d=(1, 2), G=2, H=6, W=9),
    "large_offsets": config(doff=True, G=2, DG=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(name):
    check_against_reference(CASES[name])


@pytest.mark.parametrize("name", ["dk_dc_mask", "depthwise_dk_dc", "groups_offset_groups"])
def test_chunk_of_one_position_matches_reference(name):
    # chunk_bytes = 1: every chunk is one output row of one image.
    check_against_reference(CASES[name], chunk=1)


def test_chunk_sizes_agree():
    cfg = config(N=5, C=6, O=5, H=9, W=8, groups=1, G=3, DG=2, doff=True, mask=True)
    t = make(cfg)
    ho, wo = out_size(cfg)
    grad = torch.randn(cfg["N"], cfg["O"], ho, wo, dtype=torch.float64)
    row_bytes = (16 * 6 + 5) * 8 * wo
    results = []
    for chunk in [DEFAULT_CHUNK, 2 * ho * row_bytes, 3 * row_bytes, 1]:  # 2 images, 3 rows, 1 row
        results.append((native_forward(t, cfg, chunk), native_backward(grad, t, cfg, chunk)))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [config(N=0), config(O=0), config(N=0, doff=True, mask=True)],
                         ids=["batch0", "cout0", "batch0_dc"])
def test_empty_problems(cfg):
    t = make(cfg)
    ho, wo = out_size(cfg)
    out = native_forward(t, cfg)
    assert out.shape == (cfg["N"], cfg["O"], ho, wo)
    grads = native_backward(torch.zeros_like(out), t, cfg)
    for name, g in zip(NAMES, grads):
        if name in t:
            assert g.shape == t[name].shape and not g.any()


@pytest.mark.parametrize("cfg", [config(doff=True, mask=True),
                                 config(N=5, C=6, O=6, groups=6, doff=True, mask=True)],
                         ids=["dense", "depthwise"])
def test_output_mask_leaves_unwanted_gradients_undefined(cfg):
    t = make(cfg)
    grad = torch.ones(cfg["N"], cfg["O"], *out_size(cfg), dtype=torch.float64)
    for i in range(5):
        wanted = [j == i for j in range(5)]
        grads = native_backward(grad, t, cfg, mask5=wanted)
        assert [g is not None for g in grads] == wanted
        full = native_backward(grad, t, cfg)[i]
        torch.testing.assert_close(grads[i], full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 4], ids=["dense", "depthwise"])
def test_nan_and_inf_offsets_read_nothing(groups):
    cfg = config(C=4, O=4, groups=groups, doff=True, mask=True)
    t = make(cfg)
    bad = {}
    for name in ["koff", "doff"]:
        v = t[name].clone()
        v.view(-1)[::7] = math.nan
        v.view(-1)[3::11] = math.inf
        v.view(-1)[5::13] = -math.inf
        bad[name] = v
    t_bad = dict(t, **bad)
    # Non-finite offsets behave like offsets far outside the grid: zero taps.
    t_far = dict(t, **{k: torch.where(torch.isfinite(v), v, torch.full_like(v, 1e6))
                       for k, v in bad.items()})
    out = native_forward(t_bad, cfg)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, native_forward(t_far, cfg), rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(native_backward(grad, t_bad, cfg), native_backward(grad, t_far, cfg)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_gemm_path_matches_float64():
    cfg = config(N=2, C=16, O=12, H=10, W=9, groups=2, G=2, doff=True, mask=True)
    t64 = make(cfg)
    t32 = {k: v.float() for k, v in t64.items()}
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg), dtype=torch.float64)
    torch.testing.assert_close(native_forward(t32, cfg).double(), native_forward(t64, cfg),
                               rtol=1e-4, atol=1e-4)
    for a, b in zip(native_backward(grad.float(), t32, cfg), native_backward(grad, t64, cfg)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("chunk", [DEFAULT_CHUNK, 1], ids=["whole", "row_bands"])
@pytest.mark.parametrize("cfg", [config(C=20, O=12, H=11, W=13, doff=True, mask=True),
                                 config(C=20, O=20, groups=20, H=11, W=13, G=2),
                                 config(N=4, C=20, O=20, groups=20, H=11, W=13, G=2, doff=True,
                                        mask=True)],
                         ids=["general", "depthwise", "depthwise_image_tasks"])
def test_float32_channels_last_copies_match_float64(cfg, chunk):
    # float32 moves between NCHW and channels-last rows by 8 x 8 register
    # transposes (ragged edges element-wise): 20 channels and 11 x 13 maps
    # give both, whole images and single-row bands.
    t64 = make(cfg, seed=3)
    t32 = {k: v.float() for k, v in t64.items()}
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg), dtype=torch.float64)
    torch.testing.assert_close(native_forward(t32, cfg, chunk).double(),
                               native_forward(t64, cfg, chunk), rtol=1e-4, atol=1e-4)
    for a, b in zip(native_backward(grad.float(), t32, cfg, chunk),
                    native_backward(grad, t64, cfg, chunk)):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [3, 5], ids=["separate_input_pass", "whole_image_tasks"])
def test_depthwise_results_do_not_depend_on_thread_count(n):
    # The depthwise path has no GEMM: every reduction order is fixed by the
    # kernels, so the results are bitwise identical whatever the threads.
    cfg = config(N=n, C=16, O=16, H=11, W=10, groups=16, G=2, DG=2, doff=True, mask=True)
    t = {k: v.float() for k, v in make(cfg).items()}
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in [1, 2, 3]:
            torch.set_num_threads(n)
            runs.append((native_forward(t, cfg), native_backward(grad, t, cfg)))
    finally:
        torch.set_num_threads(threads)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert torch.equal(a, b)


# The depthwise pass: one channel loop per tap for every gradient, with 1 or 4
# scope corners (S = K unshifted, or not) and 1 or 4 data corners (rigid grid
# or data offsets). From kMinImageTasks (4) images the depthwise ops run one
# image per task (channels-last copies in per-thread buffers, the input
# gradient scattered by the pass); 5 images leave threads uneven work. One
# row per chunk takes the chunk path instead.
DEPTHWISE_CASES = {
    "dk": config(N=5, C=8, O=8, groups=8, G=2),
    "dk_dc_mask": config(N=5, C=8, O=8, groups=8, G=2, DG=4, doff=True, mask=True),
    "dc_v1": config(N=5, C=8, O=8, groups=8, koff=False, S=(3, 3), doff=True),
    "dc_v2_scope4": config(N=5, C=8, O=8, groups=8, koff=False, doff=True, mask=True),
    "mask_rigid_grid": config(N=5, C=8, O=8, groups=8, koff=False, S=(3, 3), mask=True),
    "stride_dilation_nonsquare": config(N=5, C=6, O=6, groups=6, k=(2, 3), S=(3, 5),
                                        s=(2, 1), p=(0, 2), d=(2, 1), H=9, W=8, G=3, DG=2,
                                        doff=True, mask=True),
}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", list(DEPTHWISE_CASES))
def test_depthwise_pass_matches_reference(name, threads):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_reference(DEPTHWISE_CASES[name])
        check_against_reference(DEPTHWISE_CASES[name], chunk=1)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", [dict(C=6, O=5), dict(C=6, O=6, groups=6)],
                         ids=["general", "depthwise"])
@pytest.mark.parametrize("geometry", [
    dict(k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1)),
    dict(k=(3, 2), S=(4, 3), s=(2, 1), p=(2, 0), d=(2, 1)),
    dict(k=(1, 3), S=(2, 4), s=(1, 1), p=(0, 1), d=(1, 1)),
    dict(k=(5, 3), S=(6, 4), s=(1, 2), p=(2, 1), d=(1, 1)),
])
def test_scattered_input_gradient_on_tall_maps_any_thread_count(threads, layout, geometry):
    # On a rigid data grid the input gradient is scattered per tap in
    # row-block phases; many blocks and several threads must not lose updates.
    cfg = config(N=2, H=45, W=7, G=2, mask=True, **layout, **geometry)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_reference(cfg)
        check_against_reference(cfg, chunk=cfg["W"] * 6 * 8 * 40)  # row chunks
    finally:
        torch.set_num_threads(saved)


# The band pipeline of the backward (not depthwise): each thread runs whole
# bands of output rows through both GEMMs and the fused pass, in two phases on
# a rigid data grid, by whole images with data offsets. ERFTOOL_CPU_BANDS=1
# forces it with the thinnest bands (the most bands, phases and weight-gradient
# slots, and ragged last bands); the default takes it only on maps of hundreds
# of positions per band.
BAND_CASES = {
    "dk_scope4": config(),
    "dk_scope3": config(S=(3, 3)),
    "mask_rigid_grid": config(mask=True),
    "groups_offset_groups": config(C=8, O=6, groups=2, G=4, mask=True),
    "stride_dilation_nonsquare": config(k=(2, 3), S=(3, 5), s=(2, 1), p=(0, 2), d=(2, 1),
                                        H=13, W=8, G=2),
    "odd_scope_margin": config(k=(1, 3), S=(2, 4), s=(1, 2), p=(1, 0), d=(1, 2), G=2, H=6, W=9),
    "tall_map": config(N=3, C=6, O=5, H=45, W=7, G=2, mask=True),
    "dk_dc_mask": config(N=3, doff=True, mask=True),
    "dc_v2": config(koff=False, doff=True, mask=True, H=11),
    "groups_data_offset_groups": config(C=8, O=6, groups=2, G=4, DG=2, doff=True, mask=True),
}


@pytest.fixture
def forced_bands(monkeypatch):
    monkeypatch.setenv("ERFTOOL_CPU_BANDS", "1")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", list(BAND_CASES))
def test_band_pipeline_matches_reference(forced_bands, name, threads):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_against_reference(BAND_CASES[name])
    finally:
        torch.set_num_threads(saved)


def test_band_pipeline_float32_matches_float64(forced_bands):
    # float32 moves grad_out into channels-last rows by 8 x 8 register
    # transposes: 20 outputs and 11-wide bands leave ragged edges on both axes.
    cfg = config(N=3, C=12, O=20, H=16, W=11, groups=2, G=2, mask=True)
    t64 = make(cfg, seed=4)
    t32 = {k: v.float() for k, v in t64.items()}
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg), dtype=torch.float64)
    for a, b in zip(native_backward(grad.float(), t32, cfg), native_backward(grad, t64, cfg)):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


def test_band_pipeline_gives_the_same_bits_on_every_call(forced_bands):
    # Threads take the weight-gradient slots dynamically; each slot sums its
    # fixed run of bands in order, and the slots are summed in order.
    cfg = config(N=4, C=8, O=6, H=20, W=9, G=2)
    t = make(cfg, dtype=torch.float32, seed=5)
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        first = native_backward(grad, t, cfg)
        for _ in range(4):
            for a, b in zip(native_backward(grad, t, cfg), first):
                assert (a is None and b is None) or torch.equal(a, b)
    finally:
        torch.set_num_threads(saved)


def test_band_pipeline_and_chunk_loop_agree_by_default_on_a_large_map(monkeypatch):
    # The default selection (hundreds of positions per band) on a map where it
    # takes the band pipeline for up to 4 threads, against the chunk loop.
    cfg = config(N=2, C=16, O=8, H=64, W=64)
    t = make(cfg, dtype=torch.float32, seed=6)
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(min(saved, 4))
        bands = native_backward(grad, t, cfg)
        monkeypatch.setenv("ERFTOOL_CPU_BANDS", "0")
        chunks = native_backward(grad, t, cfg)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(bands, chunks):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The default did take the other path: its weight gradient, summed by
    # bands and slots, differs from the chunk loop's in the last bits.
    assert not torch.equal(bands[1], chunks[1])


# Column rows in registers (native/cpu/dense_rows_cpu.h): with kernel offsets
# and scopes of up to 16 cells they replace the scatter of build_rows, whole
# vectors of channels (16 floats / 8 doubles with AVX-512) plus a channel-by-
# channel tail. Same arithmetic, so the same bits as the scatter, which
# ERFTOOL_CPU_COLUMN_BUILD=scatter forces. Without kernel offsets (DC) each
# tap's values go straight into its cell. Every non-depthwise layout takes
# the backward's pass by runs of positions (lane_backward_cpu.h).
DENSE_CASES = {
    "scope4_wide": config(C=40, O=12, H=9, W=11),
    "scope3_groups_offset_groups": config(C=48, O=10, groups=2, G=3, S=(3, 3)),
    "scope2_one_tap_column": config(C=17, O=5, k=(2, 2), S=(2, 2), p=(0, 0)),
    "nonsquare_stride_dilation": config(C=36, O=6, k=(2, 3), S=(3, 5), s=(2, 1), p=(0, 2),
                                        d=(2, 1), H=13, W=8, G=2),
    "mask_rigid_grid": config(C=32, O=8, mask=True),
    "dk_dc_mask": config(C=24, O=8, doff=True, mask=True, G=2, DG=2),
    "runs_across_rows": config(N=3, C=16, O=4, H=5, W=23),  # 23 = 16 + 7 lanes
    # Scopes of 17-32 cells: the register build in two passes over the taps.
    "scope5": config(C=24, O=8, S=(5, 5)),
    "scope4x6_dk_dc": config(C=20, O=6, k=(3, 3), S=(4, 6), G=2, DG=2, doff=True, mask=True),
    # Offset groups of 4 and 8 channels: narrower vectors than a register
    # (vector_cpu.h, for_channel_vectors), in the rows and the backward's pass.
    "narrow_offset_groups": config(C=32, O=8, G=8, DG=4, doff=True, mask=True),
    # DC: the scope is the kernel (or centred in it), each tap fills its cell
    "dc_v1": config(C=24, O=8, koff=False, S=(3, 3), doff=True),
    "dc_v2_centred_scope4_groups": config(C=40, O=12, groups=2, DG=2, koff=False, doff=True,
                                          mask=True),
    "dc_whole_pixel_offsets": config(C=20, O=6, koff=False, S=(3, 3), doff=True,
                                     integer_doff=True),
    "dk_dc_whole_pixel_offsets": config(C=20, O=6, doff=True, integer_doff=True),
    # One image with data offsets: the band pipeline splits its bands among
    # slots with input-gradient buffers of their own (image_parts).
    "one_image_dk_dc": config(N=1, C=24, O=8, H=13, W=11, G=2, DG=2, doff=True, mask=True),
    "one_image_dc": config(N=1, C=20, O=6, H=12, W=9, koff=False, S=(3, 3), doff=True),
}


def _forced_scatter_results(monkeypatch, t, grad, cfg):
    dense = (native_forward(t, cfg),) + tuple(native_backward(grad, t, cfg))
    monkeypatch.setenv("ERFTOOL_CPU_COLUMN_BUILD", "scatter")
    scatter = (native_forward(t, cfg),) + tuple(native_backward(grad, t, cfg))
    monkeypatch.delenv("ERFTOOL_CPU_COLUMN_BUILD")
    return dense, scatter


@pytest.mark.parametrize("bands", ["0", "1"], ids=["chunk_loop", "band_pipeline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_column_rows_equal_the_scatter_bit_for_bit(monkeypatch, name, dtype, bands):
    monkeypatch.setenv("ERFTOOL_CPU_BANDS", bands)
    cfg = DENSE_CASES[name]
    t = make(cfg, dtype=dtype, seed=7)
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg), dtype=dtype)
    dense, scatter = _forced_scatter_results(monkeypatch, t, grad, cfg)
    for a, b in zip(dense, scatter):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("bands", ["0", "1"], ids=["chunk_loop", "band_pipeline"])
@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_wide_layouts_match_reference(monkeypatch, name, bands):
    # Whole vectors of channels and their tails, in the column rows and in
    # the backward's pass by runs of positions (lane_backward_cpu.h).
    monkeypatch.setenv("ERFTOOL_CPU_BANDS", bands)
    check_against_reference(DENSE_CASES[name])


def test_one_image_band_pipeline_does_not_depend_on_the_schedule(monkeypatch):
    # Slots of one image run on whichever thread takes them; their input
    # gradients are added in slot order, so repeated calls agree bit for bit.
    monkeypatch.setenv("ERFTOOL_CPU_BANDS", "1")
    cfg = DENSE_CASES["one_image_dk_dc"]
    t = make(cfg, dtype=torch.float32, seed=9)
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg))
    first = native_backward(grad, t, cfg)
    for _ in range(3):
        for a, b in zip(native_backward(grad, t, cfg), first):
            assert (a is None and b is None) or torch.equal(a, b)


def test_dense_column_rows_read_nothing_at_nan_and_inf_offsets(monkeypatch):
    cfg = DENSE_CASES["scope4_wide"]
    t = make(cfg, seed=8)
    koff = t["koff"]
    koff[:, 0::4] = float("nan")
    koff[:, 1::4] = float("inf")
    koff[:, 2::8] = -float("inf")
    koff[0, :, 0, 0] = 1e30  # far outside the scope
    grad = torch.randn(cfg["N"], cfg["O"], *out_size(cfg), dtype=torch.float64)
    dense, scatter = _forced_scatter_results(monkeypatch, t, grad, cfg)
    assert torch.isfinite(dense[0]).all()
    assert torch.equal(dense[0], scatter[0])
    assert torch.equal(dense[2], scatter[2])  # the weight gradient (from the column rows)
