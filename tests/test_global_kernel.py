"""The global Deformable Kernel's per-image convolution (erftool.ops._global_kernel),
beyond what the operator-level tests cover: numerics of its tap-by-tap form."""
import pytest
import torch

import erftool.ops as ops
from erftool.ops import _args, _global_gemm, _global_kernel, _native, reference


def assert_operator_matches_reference(x, w, off, g, **kwargs):
    """deform_kernel2d (native backend) against the reference backend:
    forward and the input, weight and offset gradients, in float64."""
    got = ops.deform_kernel2d(x, w, off, **kwargs)
    want = ops.deform_kernel2d(x, w, off, backend="reference", **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    probe = torch.randn(want.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(got, (x, w, off), probe),
                    torch.autograd.grad(want, (x, w, off), probe)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def assert_resample_kernel_matches_oracle(w, off, kernel_size, offset_groups, groups, g):
    """erftool.ops.resample_kernel (autograd form) against reference.resample_kernel:
    the kernels and the weight and offset gradients, in float64."""
    fast = ops.resample_kernel(w, off, kernel_size, offset_groups, groups)
    oracle = reference.resample_kernel(w, off, kernel_size, offset_groups, groups)
    torch.testing.assert_close(fast, oracle, rtol=0, atol=1e-12)
    probe = torch.randn(oracle.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(fast, (w, off), probe),
                    torch.autograd.grad(oracle, (w, off), probe)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# One output of nine taps: +1000, then seven of ~0.1, then -1000. Half-precision
# running sums would lose the 0.7 (1000 + 0.1 rounds back to 1000 in bfloat16).
HALF_TAP_SUM_GEOMETRY = _args.Geometry((3, 3), (1, 1), (0, 0), (1, 1), 1, 1, 1, (1, 1))


def assert_half_type_tap_sums_kept_in_float32():
    """_global_kernel's forward and backward, in whichever form is in force, on
    the nine-tap case above, in bfloat16."""
    assert _native.load_native() is not None, _native.native_error()
    weight = torch.tensor([1000.0] + [0.1] * 7 + [-1000.0], dtype=torch.bfloat16).view(
        1, 1, 3, 3)
    x = torch.ones(1, 1, 3, 3, dtype=torch.bfloat16)
    offset = torch.zeros(1, 18, dtype=torch.bfloat16)
    geom = HALF_TAP_SUM_GEOMETRY
    out = _global_kernel.forward(x, weight, offset, None, geom)
    assert out.dtype == torch.bfloat16
    assert abs(out.item() - 0.7) < 0.01
    grads = _global_kernel.backward(torch.ones_like(out), x, weight, offset, geom,
                                    [True, True, True])
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    torch.testing.assert_close(grads[0], weight)  # d out / d input = kernel
    torch.testing.assert_close(grads[1], x)  # d out / d weight = input


@pytest.mark.parametrize("groups, offset_groups", [(1, 1), (2, 2), (2, 4), (3, 1)])
def test_fast_resample_kernel_matches_the_oracle_with_gradients(groups, offset_groups):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 12 // groups, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    off = (0.9 * torch.randn(3, 2 * offset_groups * 6, dtype=torch.float64, generator=g)
           ).requires_grad_(True)
    assert_resample_kernel_matches_oracle(w, off, (2, 3), offset_groups, groups, g)


def test_resample_kernel_follows_the_backend_in_force():
    # The native pair by default, the reference (plain autograd) under use_backend.
    assert _native.load_native() is not None, _native.native_error()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    off = torch.randn(2, 18, dtype=torch.float64, generator=g, requires_grad=True)
    native = ops.resample_kernel(w, off, 3, groups=2)
    with ops.use_backend("reference"):
        oracle = ops.resample_kernel(w, off, 3, groups=2)
    def nodes(t):  # names of the autograd graph's nodes
        seen, todo = set(), [t.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and type(node).__name__ not in seen:
                seen.add(type(node).__name__)
                todo.extend(next_fn for next_fn, _ in node.next_functions)
        return seen

    assert "_ResampleKernelBackward" in nodes(native)
    assert "_ResampleKernelBackward" not in nodes(oracle)
    torch.testing.assert_close(native, oracle, rtol=0, atol=1e-12)


@pytest.mark.parametrize("images_per_chunk", [1, 2])
@pytest.mark.parametrize("groups, offset_groups", [(1, 1), (2, 2)])
def test_conv_form_by_image_chunks_matches_the_oracle(monkeypatch, images_per_chunk, groups,
                                                      offset_groups):
    # 3 images in chunks of 1 or 2 (an uneven last chunk): every chunk's output,
    # input, weight and offset gradients must land in the right place.
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 12 // groups, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    geom = _args.Geometry((3, 3), (1, 1), (1, 1), (1, 1), groups, offset_groups, 1, (3, 3))
    per_image = w.shape[0] * w.shape[1] * geom.taps * w.element_size()
    monkeypatch.setattr(_native, "chunk_bytes", lambda: images_per_chunk * per_image)
    x = torch.randn(3, 12, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert _global_kernel.form(x, w) == "conv"
    assert len(_global_kernel._image_chunks(x, w, geom)) == -(-3 // images_per_chunk)
    off = torch.randn(3, 2 * offset_groups * 9, dtype=torch.float64,
                      generator=g).requires_grad_(True)
    assert_operator_matches_reference(x, w, off, g, kernel_size=3, padding=1, groups=groups,
                                      offset_groups=offset_groups)


@pytest.mark.parametrize("images_per_chunk", [2, 1])
def test_backward_takes_the_forwards_kernels_when_they_fit_one_chunk(monkeypatch,
                                                                     images_per_chunk):
    # Two images: in one chunk the forward keeps their kernels and the
    # backward resamples none; in two, each is resampled again.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 6, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    off = torch.randn(2, 36, dtype=torch.float64, generator=g, requires_grad=True)
    per_image = w.shape[0] * w.shape[1] * 9 * w.element_size()
    monkeypatch.setattr(_native, "chunk_bytes", lambda: images_per_chunk * per_image)
    resampled = []  # images per call of _kernels
    real_kernels = _global_kernel._kernels
    monkeypatch.setattr(_global_kernel, "_kernels", lambda weight, offset, *rest: (
        resampled.append(offset.shape[0]) or real_kernels(weight, offset, *rest)))
    assert_operator_matches_reference(x, w, off, g, kernel_size=3, padding=1, groups=2,
                                      offset_groups=2)
    assert resampled == ([2] if images_per_chunk == 2 else [1, 1, 1, 1])


def test_kept_kernels_ops_pass_opcheck():
    # The forward that keeps the kernels, and the backward that takes them.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g)
    w = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=g)
    off = torch.randn(2, 36, dtype=torch.float64, generator=g)
    bias = torch.randn(6, dtype=torch.float64, generator=g)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 2)
    keeping = torch.ops.erftool._global_deform_kernel2d_keeping_kernels.default
    torch.library.opcheck(keeping, (x, w, off, bias, *geometry))
    out, kernels = keeping(x, w, off, bias, *geometry)
    assert kernels.shape == (2, 6, 2, 9)
    torch.library.opcheck(torch.ops.erftool.deform_backward.default, (
        torch.randn_like(out), x, w, off, None, None, *geometry, "native",
        [True, True, True, False, False, True], kernels))


def test_non_finite_global_offsets_contribute_nothing():
    # A NaN, infinite or huge offset puts its tap's sample off the scope: the
    # tap reads zero weight and gets a zero offset gradient, exactly as with a
    # finite offset far outside, and no index is computed from the bad value.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    off = 0.5 * torch.randn(2, 18, dtype=torch.float64, generator=g)
    off[0, 0], off[0, 5], off[1, 8], off[1, 11] = float("nan"), float("inf"), float("-inf"), 1e30
    far = off.clone()
    far[~torch.isfinite(far) | (far.abs() > 1e20)] = 1e6
    off.requires_grad_(True), far.requires_grad_(True)
    assert_operator_matches_reference(x, w, off, g, kernel_size=3, padding=1)
    out_bad = ops.deform_kernel2d(x, w, off, kernel_size=3, padding=1)
    out_far = ops.deform_kernel2d(x, w, far, kernel_size=3, padding=1)
    torch.testing.assert_close(out_bad, out_far, rtol=0, atol=0)
    (grad_bad,) = torch.autograd.grad(out_bad.sum(), off)
    (grad_far,) = torch.autograd.grad(out_far.sum(), far)
    torch.testing.assert_close(grad_bad, grad_far, rtol=0, atol=0)
    assert (grad_bad[0, :2] == 0).all() and (grad_bad[1, 10:12] == 0).all()


@pytest.fixture
def gemm_form(monkeypatch):
    """The global DK's GPU form (batched matrix products), forced on CPU, with
    the native module loaded (as the operator's native backend would have)."""
    assert _native.load_native() is not None, _native.native_error()
    monkeypatch.setattr(_global_kernel, "form", lambda input, weight: "gemm")


GEMM_CASES = {  # name: (C_in, C_out, size (H, W), op keyword arguments)
    "plain": (4, 6, (5, 5), dict(kernel_size=3, padding=1)),
    "groups_offset_groups": (8, 6, (5, 4), dict(kernel_size=3, padding=1, groups=2,
                                                 offset_groups=4)),
    "dilated": (4, 4, (7, 6), dict(kernel_size=(3, 2), padding=(2, 0), dilation=(2, 3))),
    "strided_dilated": (6, 3, (9, 8), dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0),
                                          dilation=(2, 3), groups=3, offset_groups=3)),
}


@pytest.mark.parametrize("layout", ["one_product", "tap_sums"])
@pytest.mark.parametrize("one_image_chunks", [False, True])
@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm_form_matches_the_oracle(gemm_form, monkeypatch, layout, one_image_chunks, case):
    monkeypatch.setattr(_global_gemm, "layout", lambda input, weight, geom: layout)
    if one_image_chunks:
        monkeypatch.setenv("ERFTOOL_CHUNK_MB", "1e-6")
    c, o, size, kwargs = GEMM_CASES[case]
    groups, offset_groups = kwargs.get("groups", 1), kwargs.get("offset_groups", 1)
    kernel = _args.pair("test", "kernel_size", kwargs["kernel_size"], 1)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, c, *size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(o, c // groups, kernel[0] + 1, kernel[1] + 2, dtype=torch.float64,
                    generator=g, requires_grad=True)
    off = (0.8 * torch.randn(3, 2 * offset_groups * kernel[0] * kernel[1], dtype=torch.float64,
                             generator=g)).requires_grad_(True)
    per_chunk = _global_gemm._images_per_chunk(x, w, _geometry_of(x, w, kwargs))
    assert (per_chunk == 1) if one_image_chunks else (per_chunk >= 3)
    assert_operator_matches_reference(x, w, off, g, **kwargs)


def _geometry_of(x, w, kwargs) -> _args.Geometry:
    def pair(name, default, minimum=1):
        return _args.pair("test", name, kwargs.get(name, default), minimum)

    kernel, stride = pair("kernel_size", 1), pair("stride", 1)
    padding, dilation = pair("padding", 0, minimum=0), pair("dilation", 1)
    out = _args.output_size("test", x.shape[2:], kernel, stride, padding, dilation)
    return _args.Geometry(kernel, stride, padding, dilation, kwargs.get("groups", 1),
                          kwargs.get("offset_groups", 1), 1, out)


@pytest.mark.parametrize("layout", ["one_product", "tap_sums"])
def test_gemm_form_keeps_half_type_sums_in_float32(gemm_form, monkeypatch, layout):
    monkeypatch.setattr(_global_gemm, "layout", lambda input, weight, geom: layout)
    assert_half_type_tap_sums_kept_in_float32()


def test_global_dk_on_cpu_takes_the_grouped_convolution():
    # (on CUDA: test_ops_cuda.py::test_global_dk_runs_the_gemm_form_on_cuda)
    for channels, size in ((12, 3), (2, 12)):  # kernels larger, image larger
        w = torch.zeros(4, channels, 4, 4)
        assert _global_kernel.form(torch.zeros(2, channels, size, size), w) == "conv"


@pytest.mark.parametrize("layout", ["one_product", "tap_sums"])
def test_gemm_form_passes_opcheck(gemm_form, monkeypatch, layout):
    # The public operator with the GPU form forced, and the native forward itself.
    monkeypatch.setattr(_global_gemm, "layout", lambda input, weight, geom: layout)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    off = torch.randn(3, 2 * 2 * 9, dtype=torch.float64, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.erftool.deform_kernel2d.default, (
        x, w, off, None, None, [3, 3], [1, 1], [1, 1], [1, 1], 2, 2, "native"))
    torch.library.opcheck(torch.ops.erftool_native.global_gemm_forward.default, (
        x.detach(), w.detach(), off.detach(), [3, 3], [1, 1], [1, 1], [1, 1], 2, 2, layout, 2))
    torch.library.opcheck(torch.ops.erftool_native.global_kernels.default, (
        w.detach(), off.detach(), [3, 3], 2, 2, layout == "tap_sums"))
    kernels = torch.ops.erftool_native.global_kernels(w.detach(), off.detach(), [3, 3], 2, 2,
                                                      layout == "tap_sums")
    torch.library.opcheck(torch.ops.erftool_native.global_kernels_backward.default, (
        torch.randn_like(kernels), w.detach(), off.detach(), [3, 3], 2, 2, layout == "tap_sums",
        [True, True]))


@pytest.mark.parametrize("layout", ["one_product", "tap_sums"])
def test_gemm_form_non_finite_offsets_contribute_nothing(gemm_form, monkeypatch, layout):
    # As below for the other forms: NaN / infinite / huge offsets read zero weight.
    monkeypatch.setattr(_global_gemm, "layout", lambda input, weight, geom: layout)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g)
    w = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=g)
    off = 0.5 * torch.randn(2, 18, dtype=torch.float64, generator=g)
    off[0, 0], off[0, 5], off[1, 8], off[1, 11] = float("nan"), float("inf"), float("-inf"), 1e30
    far = off.clone()
    far[~torch.isfinite(far) | (far.abs() > 1e20)] = 1e6
    got = ops.deform_kernel2d(x, w, off, kernel_size=3, padding=1)
    torch.testing.assert_close(got, ops.deform_kernel2d(x, w, far, kernel_size=3, padding=1),
                               rtol=0, atol=0)
    torch.testing.assert_close(got, ops.deform_kernel2d(x, w, far, kernel_size=3, padding=1,
                                                        backend="reference"),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("scope", [(4, 4), (3, 3), (4, 3), (3, 5)])
def test_gemm_form_offset_gradient_at_cell_boundaries(gemm_form, scope):
    # Offsets that put samples exactly on cells, on the scope's edges (-1, S - 1)
    # and just outside: the native backward's slopes must match the floor-based corners
    # of the reference there (one-sided), not a symmetric subgradient.
    g = torch.Generator().manual_seed(11)
    values = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.5], dtype=torch.float64)
    off = values[torch.randint(0, len(values), (2, 18), generator=g)].requires_grad_(True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, *scope, dtype=torch.float64, generator=g, requires_grad=True)
    assert_operator_matches_reference(x, w, off, g, kernel_size=3, padding=1)


@pytest.mark.parametrize("needs", [[True, False, False], [False, True, False], [False, False, True],
                                   [False, True, True], [True, True, True]])
def test_gemm_form_backward_computes_what_is_asked(gemm_form, needs):
    # Each pass skips the work of the gradients not asked for (the ERF engine
    # asks for the input's only); what it returns must not change.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=g)
    w = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=g)
    off = torch.randn(3, 2 * 2 * 9, dtype=torch.float64, generator=g)
    grad = torch.randn(3, 6, 5, 5, dtype=torch.float64, generator=g)
    geom = _args.Geometry((3, 3), (1, 1), (1, 1), (1, 1), 2, 2, 1, (5, 5))
    full = _global_kernel.backward(grad, x, w, off, geom, [True] * 3)
    some = _global_kernel.backward(grad, x, w, off, geom, needs)
    for wanted, a, b in zip(needs, some, full):
        if wanted:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a is None


@pytest.mark.parametrize("layout", ["one_product", "tap_sums"])
@pytest.mark.parametrize("groups, offset_groups", [(1, 1), (2, 4)])
def test_gemm_native_ops_in_bfloat16_track_float32(layout, groups, offset_groups):
    # The half-type paths of native/composite/global_gemm.cpp (kernels resampled
    # and summed in float32, gradients accumulated in float32), run on CPU: the
    # GPU form's arithmetic, which CI cannot run on a device.
    assert _native.load_native() is not None, _native.native_error()
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 8, 7, 6, generator=g)
    w = torch.randn(6, 8 // groups, 4, 5, generator=g)
    off = 0.8 * torch.randn(3, 2 * offset_groups * 6, generator=g)
    geometry = ([3, 2], [1, 1], [1, 0], [1, 2], groups, offset_groups)
    low = [t.bfloat16() for t in (x, w, off)]
    ref = [t.float() for t in low]  # the same rounded inputs

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    out = [torch.ops.erftool_native.global_gemm_forward(*t, *geometry, layout, 1)
           for t in (low, ref)]
    assert out[0].dtype == torch.bfloat16 and rel(*out) < 1e-2
    grad = torch.randn(out[1].shape, generator=g).bfloat16()
    grads = [torch.ops.erftool_native.global_gemm_backward(
        gr, *t, *geometry, 1, [True] * 3) for t, gr in ((low, grad), (ref, grad.float()))]
    for a, b in zip(*grads):
        assert a.dtype == torch.bfloat16 and rel(a, b) < 1e-2


# (C_out, C_in/groups, groups, offset_groups, kernel, scope)
# The last: 81 cells, several of the CPU backward's vectors of cells, each
# with the taps that reach it.
KERNEL_CASES = [(6, 4, 2, 2, (3, 3), (4, 4)), (4, 3, 1, 3, (3, 1), (5, 2)),
                (8, 1, 8, 4, (2, 3), (3, 5)), (5, 6, 1, 1, (3, 3), (3, 3)),
                (3, 2, 1, 1, (5, 5), (9, 9))]


def kernel_case_tensors(case, seed):
    """Scope weight and global offsets (3 images) of a KERNEL_CASES entry, float64,
    with a NaN, an infinite and a huge offset."""
    o, cg, groups, offset_groups, kernel, scope = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, cg, *scope, dtype=torch.float64, generator=g)
    off = 1.5 * torch.randn(3, 2 * offset_groups * kernel[0] * kernel[1], dtype=torch.float64,
                            generator=g)
    off[0, 0], off[1, 3], off[2, 1] = float("nan"), float("inf"), -1e30
    return w, off, g


@pytest.mark.parametrize("tap_major", [False, True], ids=["channel_major", "tap_major"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"o{c[0]}cg{c[1]}g{c[2]}G{c[3]}")
def test_native_global_kernels_match_the_oracle(case, tap_major):
    # erftool_native::global_kernels on CPU runs math::global_kernel_corners / _value, the
    # per-element arithmetic of its CUDA kernel; non-finite and far offsets
    # read zero weight.
    assert _native.load_native() is not None, _native.native_error()
    _, _, groups, offset_groups, kernel, _ = case
    w, off, _ = kernel_case_tensors(case, 17)
    oracle = reference.resample_kernel(w, off, kernel, offset_groups, groups)  # (N, O, cg, kh, kw)
    got = torch.ops.erftool_native.global_kernels(w, off, list(kernel), groups, offset_groups,
                                                  tap_major)
    expected = oracle.flatten(3)
    if tap_major:
        expected = expected.permute(3, 0, 1, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tap_major", [False, True], ids=["channel_major", "tap_major"])
@pytest.mark.parametrize("scope", [4, 5])
def test_native_global_kernels_in_float32_track_float64(tap_major, scope):
    # float32 with runs of 8 channels: the CPU kernel's streaming stores (whole
    # aligned vectors: in place tap-major, a transposed block channel-major);
    # its backward, channel-major rows read in place and tap-major ones through
    # block transposes, over one vector of 16 cells (scope 4) or two (scope 5)
    # in float32 against two or four vectors of 8 in float64.
    assert _native.load_native() is not None, _native.native_error()
    g = torch.Generator().manual_seed(19)
    w = torch.randn(5, 16, scope, scope, dtype=torch.float64, generator=g)
    off = 1.2 * torch.randn(3, 2 * 2 * 9, dtype=torch.float64, generator=g)
    args = ([3, 3], 1, 2, tap_major)
    wide = torch.ops.erftool_native.global_kernels(w, off, *args)
    narrow = torch.ops.erftool_native.global_kernels(w.float(), off.float(), *args)
    torch.testing.assert_close(narrow, wide.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(wide.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.ops.erftool_native.global_kernels_backward(
                        grad.float(), w.float(), off.float(), *args, [True, True]),
                    torch.ops.erftool_native.global_kernels_backward(
                        grad, w, off, *args, [True, True])):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tap_major", [False, True], ids=["channel_major", "tap_major"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"o{c[0]}cg{c[1]}g{c[2]}G{c[3]}")
def test_native_global_kernels_backward_matches_autograd_of_the_oracle(case, tap_major):
    # The weight and offset gradients of erftool_native::global_kernels against
    # autograd through reference.resample_kernel; samples outside the scope,
    # NaN and infinite offsets get zero gradient.
    assert _native.load_native() is not None, _native.native_error()
    _, _, groups, offset_groups, kernel, _ = case
    w, off, g = kernel_case_tensors(case, 18)
    off[2, 2] = 0.5  # on a cell where (S - K) / 2 is a half
    w.requires_grad_(), off.requires_grad_()
    oracle = reference.resample_kernel(w, off, kernel, offset_groups, groups).flatten(3)
    grad = torch.randn(oracle.shape, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad(oracle, (w, off), grad)
    if tap_major:
        grad = grad.permute(3, 0, 1, 2).contiguous()
    args = (w.detach(), off.detach(), list(kernel), groups, offset_groups, tap_major)
    got = torch.ops.erftool_native.global_kernels_backward(grad, *args, [True, True])
    for name, a, b in zip(("weight", "offset"), got, expected):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, torch.nan_to_num(b), rtol=0, atol=1e-11, msg=name)
    only_offset = torch.ops.erftool_native.global_kernels_backward(grad, *args, [False, True])
    assert only_offset[0] is None
    torch.testing.assert_close(only_offset[1], got[1], rtol=0, atol=0)


@pytest.mark.parametrize("tap_major", [False, True], ids=["channel_major", "tap_major"])
def test_native_global_kernels_backward_with_every_tap_on_one_vector_of_cells(tap_major):
    # Each of 25 taps pulled next to the scope's first cell: the CPU backward's
    # first vector of cells gets all of them, in its blocks of 12, 12 and 1 taps.
    assert _native.load_native() is not None, _native.native_error()
    g = torch.Generator().manual_seed(21)
    w = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    pulled = torch.stack([0.3 - rows, 0.6 - cols], dim=-1).reshape(1, 50).double()
    off = (pulled + 0.05 * torch.rand(2, 50, dtype=torch.float64, generator=g)).requires_grad_()
    oracle = reference.resample_kernel(w, off, (5, 5), 1, 1).flatten(3)
    grad = torch.randn(oracle.shape, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad(oracle, (w, off), grad)
    if tap_major:
        grad = grad.permute(3, 0, 1, 2).contiguous()
    got = torch.ops.erftool_native.global_kernels_backward(
        grad, w.detach(), off.detach(), [5, 5], 1, 1, tap_major, [True, True])
    for name, a, b in zip(("weight", "offset"), got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)
