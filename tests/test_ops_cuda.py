"""CUDA kernels of erftool's native operators.

Checks, on a CUDA device (skipped without one):
  * the native CUDA op against the pure-PyTorch reference in float64
    (forward, and every gradient against autograd through the reference);
  * CUDA against the native CPU kernels in float32 and float64;
  * float16 / bfloat16 against float32 within tolerance;
  * torch.autograd.gradcheck in float64 on CUDA through the public operators;
  * chunking (chunk_bytes), output_mask handling, determinism of the rigid path;
  * the column build's paths against each other, the global DK's batched
    products and per-image kernels.
On any machine with g++ (C++20) and the CUDA headers: the kernels compiled as
host C++ against the reference (CPU emulation; float64, and float16 / bfloat16
within two roundings of the type), and the torch glue compiled syntax-only
against the installed torch's headers. Also on a CUDA device: the ops under
torch.autocast and captured in a CUDA graph.

TF32 is switched off for the whole module (cuBLAS / cuDNN), so that float32
comparisons measure the kernels rather than reduced-precision GEMMs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Tuple

import pytest
import torch

from erftool.ops import _args, _native, reference
import erftool.ops as ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(scope="module", autouse=True)
def _strict_fp32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module", autouse=True)
def native_module():
    if not torch.cuda.is_available():
        return None  # the CUDA tests skip themselves; the emulation tests need no module
    module = _native.load_native()
    if module is None:
        pytest.fail(f"native module failed to build: {_native.native_error()}")
    if not module.has_cuda_kernels():
        pytest.fail("native module was built without its CUDA kernels (ERFTOOL_WITH_CUDA unset)")
    return module


@dataclass(frozen=True)
class Case:
    name: str
    N: int = 2
    C: int = 4
    H: int = 7
    W: int = 8
    C_out: int = 6
    groups: int = 1
    kernel: Tuple[int, int] = (3, 3)
    scope: Tuple[int, int] = (4, 4)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (1, 1)
    dilation: Tuple[int, int] = (1, 1)
    G: int = 1
    DG: int = 1
    kernel_offset: bool = True
    data_offset: bool = False
    mask: bool = False
    offset_scale: float = 0.7

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def out_size(self) -> Tuple[int, int]:
        return _args.output_size("test", (self.H, self.W), self.kernel, self.stride, self.padding,
                                 self.dilation)

    @property
    def geometry(self) -> _args.Geometry:
        return _args.Geometry(self.kernel, self.stride, self.padding, self.dilation, self.groups,
                              self.G, self.DG, tuple(self.out_size))


CASES = [
    Case("local_dk"),
    Case("centred_dk_rigid", kernel_offset=False),
    Case("dk_groups_strided", N=3, C=8, C_out=4, groups=2, G=4, kernel=(3, 2), scope=(5, 4),
         stride=(2, 1), padding=(2, 1), dilation=(2, 1), H=9, W=7),
    Case("dk_large_offsets", offset_scale=2.5),
    Case("dk_scope_slabs", kernel=(5, 5), scope=(7, 7), padding=(2, 2), H=9, W=9, C=3, C_out=2),
    Case("dk_odd_scope", kernel=(3, 3), scope=(6, 5)),
    Case("dk_mask_rigid", mask=True),
    Case("dc_v1", kernel_offset=False, scope=(3, 3), data_offset=True, DG=2, offset_scale=1.5),
    Case("dc_v2", kernel_offset=False, scope=(3, 3), data_offset=True, mask=True, DG=1,
         stride=(2, 2), H=9, W=10),
    Case("dk_dc", C=8, G=2, DG=4, data_offset=True, mask=True, groups=2, C_out=4),
    Case("dk_dc_more_kernel_groups", C=8, G=4, DG=2, data_offset=True, offset_scale=1.2),
    Case("dk_dc_coprime_groups", C=6, G=2, DG=3, data_offset=True, mask=True, C_out=3),
    Case("one_by_one", kernel=(1, 1), scope=(2, 2), padding=(0, 0), G=2),
    # Few positions, many channels: channel segments are split over several blocks.
    Case("many_channels", N=1, C=128, C_out=4, H=5, W=6, data_offset=True, mask=True),
    # Depthwise layers (one input channel per group) take a forward of their own.
    Case("depthwise_dk", C=4, C_out=8, groups=4, G=2),
    Case("depthwise_dk_dc", C=4, C_out=4, groups=4, G=4, DG=2, data_offset=True, mask=True,
         stride=(2, 1)),
    Case("depthwise_dc", C=4, C_out=4, groups=4, scope=(3, 3), kernel_offset=False,
         data_offset=True, mask=True, DG=4),
    Case("depthwise_many_channels", N=1, C=128, C_out=128, groups=128, H=5, W=6,
         data_offset=True, mask=True),
]
CASE_IDS = [c.name for c in CASES]


def make_inputs(case: Case, dtype=torch.float64, device="cuda", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(
            device=device, dtype=dtype)

    ho, wo = case.out_size
    x = rand(case.N, case.C, case.H, case.W)
    w = rand(case.C_out, case.C // case.groups, *case.scope, scale=0.5)
    ko = rand(case.N, 2 * case.G * case.taps, ho, wo, scale=case.offset_scale) \
        if case.kernel_offset else None
    do = rand(case.N, 2 * case.DG * case.taps, ho, wo, scale=case.offset_scale) \
        if case.data_offset else None
    m = (torch.rand(case.N, case.DG * case.taps, ho, wo, generator=gen, dtype=torch.float64)
         .to(device=device, dtype=dtype)) if case.mask else None
    return x, w, ko, do, m


def native_forward(case: Case, x, w, ko, do, m, chunk_bytes=1 << 28):
    return torch.ops.erftool_native.deform_forward(
        x, w, ko, do, m, list(case.kernel), list(case.stride), list(case.padding),
        list(case.dilation), case.groups, case.G, case.DG, chunk_bytes)


def native_backward(case: Case, go, x, w, ko, do, m, chunk_bytes=1 << 28,
                    output_mask=(True,) * 5):
    return torch.ops.erftool_native.deform_backward(
        go, x, w, ko, do, m, list(case.kernel), list(case.stride), list(case.padding),
        list(case.dilation), case.groups, case.G, case.DG, chunk_bytes, list(output_mask))


def reference_forward(case: Case, x, w, ko, do, m):
    return reference.deform_column_conv(x, w, ko, "local", do, m, None, case.geometry)


def reference_grads(case: Case, go, x, w, ko, do, m):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True)
              for t in (x, w, ko, do, m)]
    out = reference_forward(case, *leaves)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, go))
    return [None if t is None else next(grads) for t in leaves]


def assert_close_or_none(actual, expected, name, **tol):
    if expected is None:
        assert actual is None, f"{name}: expected no gradient"
        return
    assert actual is not None, f"{name}: gradient missing"
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tol)


GRAD_NAMES = ("grad_input", "grad_weight", "grad_kernel_offset", "grad_data_offset", "grad_mask")


# ------------------------------------------------------------------ float64 oracle

@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_reference_float64(case):
    x, w, ko, do, m = make_inputs(case)
    out = native_forward(case, x, w, ko, do, m)
    torch.testing.assert_close(out, reference_forward(case, x, w, ko, do, m),
                               rtol=1e-10, atol=1e-10)


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_matches_reference_float64(case):
    x, w, ko, do, m = make_inputs(case)
    gen = torch.Generator().manual_seed(2)
    go = torch.randn(case.N, case.C_out, *case.out_size, generator=gen,
                     dtype=torch.float64).cuda()
    grads = native_backward(case, go, x, w, ko, do, m)
    expected = reference_grads(case, go, x, w, ko, do, m)
    for name, got, exp in zip(GRAD_NAMES, grads, expected):
        assert_close_or_none(got, exp, name, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ CUDA vs CPU

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_matches_cpu(case, dtype):
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    cpu = make_inputs(case, dtype=dtype, device="cpu")
    gpu = [None if t is None else t.cuda() for t in cpu]
    gen = torch.Generator().manual_seed(3)
    go_cpu = torch.randn(case.N, case.C_out, *case.out_size, generator=gen).to(dtype)
    out_gpu = native_forward(case, *gpu)
    out_cpu = native_forward(case, *cpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tol)
    g_gpu = native_backward(case, go_cpu.cuda(), *gpu)
    g_cpu = native_backward(case, go_cpu, *cpu)
    for name, a, b in zip(GRAD_NAMES, g_gpu, g_cpu):
        assert_close_or_none(None if a is None else a.cpu(), b, name, **tol)


# ------------------------------------------------------------------ half types

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)],
                         ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "local_dk", "dk_groups_strided", "dc_v2", "dk_dc", "dk_scope_slabs")],
    ids=lambda c: c.name)
def test_half_types_match_float32(case, dtype, tol):
    ref = make_inputs(case, dtype=torch.float32)
    low = [None if t is None else t.to(dtype) for t in ref]
    # Compare against float32 run on the same (rounded) inputs.
    ref = [None if t is None else t.float() for t in low]
    gen = torch.Generator().manual_seed(4)
    go = torch.randn(case.N, case.C_out, *case.out_size, generator=gen).cuda().to(dtype)
    out_low = native_forward(case, *low)
    assert out_low.dtype == dtype
    assert _rel_err(out_low, native_forward(case, *ref)) < tol
    g_low = native_backward(case, go, *low)
    g_ref = native_backward(case, go.float(), *ref)
    for name, a, b in zip(GRAD_NAMES, g_low, g_ref):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        assert _rel_err(a, b) < 2 * tol, f"{name}: relative error {_rel_err(a, b):.3g}"


# ------------------------------------------------------------------ gradcheck

@requires_cuda
def test_gradcheck_local_dk_public_api():
    case = Case("gc_local", N=1, C=2, C_out=2, H=5, W=5, G=2)
    x, w, ko, _, _ = make_inputs(case)
    leaves = [t.requires_grad_(True) for t in (x, w, ko)]

    def fn(x, w, ko):
        return ops.deform_kernel2d(x, w, ko, kernel_size=case.kernel, padding=case.padding,
                                   offset_groups=case.G, backend="native")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    nondet_tol=1e-12)  # fp64 atomics: order varies


@requires_cuda
def test_gradcheck_dk_dc_public_api():
    case = Case("gc_dkdc", N=1, C=4, C_out=2, H=5, W=6, G=2, DG=2, data_offset=True,
                stride=(2, 1))
    x, w, ko, do, _ = make_inputs(case)
    leaves = [t.requires_grad_(True) for t in (x, w, ko, do)]

    def fn(x, w, ko, do):
        return ops.deform_kernel2d(x, w, ko, kernel_size=case.kernel, stride=case.stride,
                                   padding=case.padding, offset_groups=case.G, data_offset=do,
                                   backend="native")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    nondet_tol=1e-12)  # fp64 atomics: order varies


@requires_cuda
def test_gradcheck_dcn_v2_public_api():
    case = Case("gc_dcn", N=1, C=2, C_out=3, H=5, W=5, scope=(3, 3), kernel_offset=False,
                data_offset=True, mask=True)
    x, w, _, do, m = make_inputs(case)
    b = torch.randn(case.C_out, dtype=torch.float64, device="cuda")
    leaves = [t.requires_grad_(True) for t in (x, do, w, b, m)]

    def fn(x, do, w, b, m):
        return ops.deform_conv2d(x, do, w, b, padding=1, mask=m, backend="native")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    nondet_tol=1e-12)  # fp64 atomics: order varies


@requires_cuda
def test_gradcheck_native_op_all_inputs():
    """DK + DC + mask together, straight through the native op pair."""
    case = Case("gc_all", N=2, C=4, C_out=2, H=4, W=5, G=2, DG=2, data_offset=True, mask=True)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, ko, do, m):
            ctx.save_for_backward(x, w, ko, do, m)
            return native_forward(case, x, w, ko, do, m)

        @staticmethod
        def backward(ctx, go):
            return tuple(native_backward(case, go.contiguous(), *ctx.saved_tensors))

    leaves = [t.requires_grad_(True) for t in make_inputs(case)]
    assert torch.autograd.gradcheck(Op.apply, leaves, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    nondet_tol=1e-12)  # fp64 atomics: order varies


# ------------------------------------------------------------------ public API

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_public_ops_cuda_match_cpu(dtype):
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 9, 9, generator=gen, dtype=dtype)
    w = torch.randn(6, 4, 4, 4, generator=gen, dtype=dtype)
    bias = torch.randn(6, generator=gen, dtype=dtype)
    local = torch.randn(2, 18, 9, 9, generator=gen, dtype=dtype)
    glob = torch.randn(2, 18, generator=gen, dtype=dtype)
    dcn_off = torch.randn(2, 18, 9, 9, generator=gen, dtype=dtype)
    w3 = torch.randn(6, 4, 3, 3, generator=gen, dtype=dtype)
    mask = torch.rand(2, 9, 9, 9, generator=gen, dtype=dtype)
    calls = {
        "local": lambda d: ops.deform_kernel2d(d(x), d(w), d(local), kernel_size=3, padding=1,
                                               bias=d(bias), backend="native"),
        "global": lambda d: ops.deform_kernel2d(d(x), d(w), d(glob), kernel_size=3, padding=1,
                                                backend="native"),
        "global_dc": lambda d: ops.deform_kernel2d(d(x), d(w), d(glob), kernel_size=3,
                                                   padding=1, data_offset=d(dcn_off),
                                                   backend="native"),
        "dcn": lambda d: ops.deform_conv2d(d(x), d(dcn_off), d(w3), d(bias), padding=1,
                                           mask=d(mask), backend="native"),
    }
    for name, call in calls.items():
        got = call(lambda t: t.cuda())
        expected = call(lambda t: t)
        torch.testing.assert_close(got.cpu(), expected, msg=lambda m: f"{name}: {m}", **tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_public_ops_under_autocast_run_in_the_autocast_dtype(dtype):
    """Mixed arguments (float32 input and weight, low-precision offsets from a
    generator layer) inside torch.autocast("cuda"): the ops run in the
    autocast dtype, exactly as on arguments cast by hand, and the gradients
    come back in each argument's own dtype."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 9, 9, generator=gen).cuda()
    w = torch.randn(6, 4, 4, 4, generator=gen).cuda()
    w3 = torch.randn(6, 4, 3, 3, generator=gen).cuda()
    local = (0.5 * torch.randn(2, 18, 9, 9, generator=gen)).cuda().to(dtype)
    glob = (0.5 * torch.randn(2, 18, generator=gen)).cuda().to(dtype)
    mask = torch.rand(2, 9, 9, 9, generator=gen).cuda().to(dtype)
    calls = {
        "local": (lambda a, b, c: ops.deform_kernel2d(a, b, c, kernel_size=3, padding=1),
                  (x, w, local)),
        "global": (lambda a, b, c: ops.deform_kernel2d(a, b, c, kernel_size=3, padding=1),
                   (x, w, glob)),
        "dcn_v2": (lambda a, b, c, m: ops.deform_conv2d(a, b, c, padding=1, mask=m),
                   (x, local, w3, mask)),
    }
    for name, (call, args) in calls.items():
        leaves = [t.detach().clone().requires_grad_() for t in args]
        with torch.autocast("cuda", dtype=dtype):
            out = call(*leaves)
        assert out.dtype == dtype, name
        out.float().sum().backward()
        # The same path as under autocast (with gradients: the global DK may
        # then keep its kernels), on the arguments cast by hand.
        want = call(*[t.to(dtype).detach().requires_grad_() for t in args])
        torch.testing.assert_close(out.detach(), want.detach(), rtol=0, atol=0,
                                   msg=lambda m: f"{name}: {m}")
        for leaf in leaves:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
            assert torch.isfinite(leaf.grad).all(), name


@requires_cuda
@pytest.mark.parametrize("op", ["local_dk", "global_dk", "dk_dc", "dcn_v2"])
def test_cuda_graph_capture_replays_forward_and_backward(op):
    """The ops launch only on the current stream, allocate through the caching
    allocator and never wait on the device, so a training step through them
    can be captured in a CUDA graph (what torch.compile's "reduce-overhead"
    mode does to remove the host time per call): a replay on new data gives
    the eager results."""
    gen = torch.Generator().manual_seed(7)

    def data():
        return {
            "x": torch.randn(2, 4, 9, 9, generator=gen),
            "w": torch.randn(6, 4, 4, 4, generator=gen),
            "w3": torch.randn(6, 4, 3, 3, generator=gen),
            "local": 0.7 * torch.randn(2, 18, 9, 9, generator=gen),
            "glob": 0.7 * torch.randn(2, 18, generator=gen),
            "data": 0.7 * torch.randn(2, 18, 9, 9, generator=gen),
            "mask": torch.rand(2, 9, 9, 9, generator=gen),
            "go": torch.randn(2, 6, 9, 9, generator=gen),
        }

    calls = {
        "local_dk": lambda t: ops.deform_kernel2d(t["x"], t["w"], t["local"], kernel_size=3,
                                                  padding=1),
        "global_dk": lambda t: ops.deform_kernel2d(t["x"], t["w"], t["glob"], kernel_size=3,
                                                   padding=1),
        "dk_dc": lambda t: ops.deform_kernel2d(t["x"], t["w"], t["local"], kernel_size=3,
                                               padding=1, data_offset=t["data"]),
        "dcn_v2": lambda t: ops.deform_conv2d(t["x"], t["data"], t["w3"], padding=1,
                                              mask=t["mask"]),
    }
    call = calls[op]
    wanted = ("x", "w", "w3", "local", "glob", "data", "mask")
    static = {k: v.cuda().requires_grad_(k in wanted) for k, v in data().items()}

    def step():
        out = call(static)
        out.backward(static["go"])
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in static.values():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    fresh = data()
    with torch.no_grad():
        for k, v in fresh.items():
            static[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()

    eager = {k: v.cuda().requires_grad_(k in wanted) for k, v in fresh.items()}
    want = call(eager)
    want.backward(eager["go"])
    torch.testing.assert_close(static_out, want)
    for k in wanted:
        if eager[k].grad is not None:
            assert static[k].grad is not None, k
            torch.testing.assert_close(static[k].grad, eager[k].grad, msg=lambda m: f"{k}: {m}")


@requires_cuda
@pytest.mark.parametrize("layout", ["one_product", "tap_sums"])
@pytest.mark.parametrize("groups, offset_groups", [(1, 1), (2, 4)])
def test_global_dk_runs_the_gemm_form_on_cuda(monkeypatch, layout, groups, offset_groups):
    # Forward and every gradient against the reference in float64, each layout
    # of the batched products, several image chunks; then bfloat16 against
    # float32 on the same rounded inputs, forward and gradients.
    from erftool.ops import _global_gemm, _global_kernel

    monkeypatch.setattr(_global_gemm, "layout", lambda i, w, g: layout)
    monkeypatch.setenv("ERFTOOL_CHUNK_MB", "1e-6")  # one image per chunk
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 8, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 8 // groups, 4, 5, generator=gen, dtype=torch.float64)
    off = 0.8 * torch.randn(3, 2 * offset_groups * 6, generator=gen, dtype=torch.float64)
    kwargs = dict(kernel_size=(3, 2), padding=(1, 0), dilation=(1, 2), groups=groups,
                  offset_groups=offset_groups)
    assert _global_kernel.form(x.cuda(), w.cuda()) == "gemm"
    leaves = [t.cuda().requires_grad_() for t in (x, w, off)]
    got = ops.deform_kernel2d(*leaves, backend="native", **kwargs)
    cpu = [t.detach().clone().requires_grad_() for t in (x, w, off)]
    want = ops.deform_kernel2d(*cpu, backend="reference", **kwargs)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    probe = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, leaves, probe.cuda()),
                    torch.autograd.grad(want, cpu, probe)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)
    low = [t.cuda().bfloat16().requires_grad_() for t in (x, w, off)]
    ref = [t.detach().float().requires_grad_() for t in low]  # the same rounded inputs
    out_low, out_ref = (ops.deform_kernel2d(*t, **kwargs) for t in (low, ref))
    assert out_low.dtype == torch.bfloat16
    assert _rel_err(out_low, out_ref) < 2e-2
    go = probe.cuda().bfloat16()
    for name, a, b in zip(("input", "weight", "offset"), torch.autograd.grad(out_low, low, go),
                          torch.autograd.grad(out_ref, ref, go.float())):
        assert a.dtype == torch.bfloat16, name
        assert _rel_err(a, b) < 4e-2, f"{name}: relative error {_rel_err(a, b):.3g}"


@requires_cuda
def test_depthwise_global_dk_on_cuda_keeps_the_grouped_convolution():
    from erftool.ops import _global_kernel

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 6, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64)
    off = 0.8 * torch.randn(3, 18, generator=gen, dtype=torch.float64)
    assert _global_kernel.form(x.cuda(), w.cuda()) == "conv"
    leaves = [t.cuda().requires_grad_() for t in (x, w, off)]
    got = ops.deform_kernel2d(*leaves, kernel_size=3, padding=1, groups=6, backend="native")
    cpu = [t.detach().clone().requires_grad_() for t in (x, w, off)]
    want = ops.deform_kernel2d(*cpu, kernel_size=3, padding=1, groups=6, backend="reference")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    probe = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, leaves, probe.cuda()),
                    torch.autograd.grad(want, cpu, probe)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ plumbing

@requires_cuda
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[9]], ids=lambda c: c.name)
def test_chunking_gives_the_same_result(case):
    case = replace(case, N=3)
    x, w, ko, do, m = make_inputs(case)
    go = torch.randn(case.N, case.C_out, *case.out_size, dtype=torch.float64, device="cuda")
    whole_out = native_forward(case, x, w, ko, do, m, chunk_bytes=1 << 30)
    whole = native_backward(case, go, x, w, ko, do, m, chunk_bytes=1 << 30)
    per_image = case.C * case.scope[0] * case.scope[1] * case.out_size[0] * case.out_size[1] * 8
    for chunk in (1, 2 * per_image, 4 * per_image):  # 1 image, 2 + 1, 1 + ... images
        out = native_forward(case, x, w, ko, do, m, chunk_bytes=chunk)
        torch.testing.assert_close(out, whole_out, rtol=1e-12, atol=1e-12)
        grads = native_backward(case, go, x, w, ko, do, m, chunk_bytes=chunk)
        for name, a, b in zip(GRAD_NAMES, grads, whole):
            assert_close_or_none(a, b, f"{name} (chunk_bytes={chunk})", rtol=1e-11, atol=1e-11)


@requires_cuda
def test_output_mask_selects_gradients():
    case = CASES[9]
    x, w, ko, do, m = make_inputs(case)
    go = torch.randn(case.N, case.C_out, *case.out_size, dtype=torch.float64, device="cuda")
    full = native_backward(case, go, x, w, ko, do, m)
    for bits in itertools.product((False, True), repeat=5):
        grads = native_backward(case, go, x, w, ko, do, m, output_mask=bits)
        for name, want, got, ref in zip(GRAD_NAMES, bits, grads, full):
            if want:
                torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12,
                                           msg=lambda s: f"{name} {bits}: {s}")
            else:
                assert got is None, f"{name} returned although output_mask={bits}"
    # Absent inputs give absent gradients whatever output_mask says.
    grads = native_backward(case, go, x, w, None, None, None)
    assert grads[2] is None and grads[3] is None and grads[4] is None


@requires_cuda
def test_rigid_path_is_deterministic():
    case = replace(CASES[0], N=4, C=16, C_out=16, H=16, W=16)
    x, w, ko, do, m = make_inputs(case, dtype=torch.float32)
    go = torch.randn(case.N, case.C_out, *case.out_size, device="cuda")
    a = native_backward(case, go, x, w, ko, do, m)
    b = native_backward(case, go, x, w, ko, do, m)
    for name, ga, gb in zip(GRAD_NAMES, a, b):
        if ga is not None:
            assert torch.equal(ga, gb), f"{name} differs between two identical calls"


@requires_cuda
def test_atomic_input_gradient_alerts_under_deterministic_algorithms(monkeypatch):
    # Data offsets scatter the input gradient with atomics (not deterministic):
    # PyTorch's convention is to raise under use_deterministic_algorithms, and
    # to stay silent for the gradients that are deterministic. (cuBLAS itself
    # is deterministic only with this workspace setting, which torch checks.)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rigid = CASES[0]
    deformed = next(c for c in CASES if c.data_offset)
    saved = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for case in (rigid, deformed):
            x, w, ko, do, m = make_inputs(case)
            go = torch.randn(case.N, case.C_out, *case.out_size, dtype=torch.float64,
                             device="cuda")
            without_input = (False, True, True, True, True)
            native_backward(case, go, x, w, ko, do, m, output_mask=without_input)
            if case is rigid:
                native_backward(case, go, x, w, ko, do, m)
            else:
                with pytest.raises(RuntimeError, match="deform_backward .CUDA. input gradient"):
                    native_backward(case, go, x, w, ko, do, m)
    finally:
        torch.use_deterministic_algorithms(saved)


@requires_cuda
def test_non_contiguous_and_current_stream():
    case = CASES[9]
    x, w, ko, do, m = make_inputs(case)
    expected = native_forward(case, x, w, ko, do, m)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = native_forward(case, xt, w, ko, do, m)
    stream.synchronize()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@requires_cuda
def test_nan_offsets_do_not_read_out_of_bounds():
    case = CASES[9]
    x, w, ko, do, m = make_inputs(case)
    ko = ko.clone()
    do = do.clone()
    ko[:, :4] = float("nan")
    do[:, 2:6] = float("inf")
    out = native_forward(case, x, w, ko, do, m)
    torch.cuda.synchronize()
    assert out.shape == (case.N, case.C_out, *case.out_size)


@requires_cuda
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("local_dk", "dc_v2", "dk_dc")],
                         ids=lambda c: c.name)
def test_column_build_paths_agree(case, monkeypatch):
    """The register (scope <= 4 x 4) and identity (DCN) paths of the column
    build against its shared-memory path, float32, forward and backward."""
    x, w, ko, do, m = make_inputs(case, dtype=torch.float32)
    go = torch.randn(case.N, case.C_out, *case.out_size, device="cuda")
    default = [native_forward(case, x, w, ko, do, m), *native_backward(case, go, x, w, ko, do, m)]
    monkeypatch.setenv("ERFTOOL_CUDA_COLUMN_BUILD", "shared")
    shared = [native_forward(case, x, w, ko, do, m), *native_backward(case, go, x, w, ko, do, m)]
    for name, got, exp in zip(("output",) + GRAD_NAMES, default, shared):
        assert_close_or_none(got, exp, name, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ CPU emulation
# The CUDA kernels compiled as host C++ (native/cuda/emulate): their indexing,
# block reductions and barriers checked against the reference on machines
# without a GPU. Needs g++ (C++20) and the CUDA headers; skipped otherwise.

def _emulation():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "native" / "cuda" / "emulate" / "emulate.py"
    spec = importlib.util.spec_from_file_location("erftool_cuda_emulate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reason = module.unavailable_reason()
    if reason:
        pytest.skip(f"CUDA emulation unavailable: {reason}")
    return module


# The column build's three paths (deform_kernels.cu): identity (dc_v1, dc_v2),
# registers (scopes up to 4 x 4: local_dk, one_by_one, dk_large_offsets, dk_dc,
# ...), shared memory (dk_groups_strided, dk_scope_slabs, dk_odd_scope); and the
# depthwise forward (depthwise_*).
EMULATED = ["local_dk", "centred_dk_rigid", "dk_groups_strided", "dk_large_offsets",
            "dk_scope_slabs", "dk_odd_scope", "dk_mask_rigid", "dc_v1", "dc_v2", "dk_dc",
            "dk_dc_coprime_groups", "one_by_one", "many_channels", "depthwise_dk",
            "depthwise_dk_dc", "depthwise_dc", "depthwise_many_channels"]
# Rerun with the shared-memory path forced (ERFTOOL_CUDA_COLUMN_BUILD=shared).
EMULATED_SHARED = ["local_dk", "dk_large_offsets", "dc_v2", "dk_dc"]


EMULATION_RUNS = [(c, "default") for c in CASES if c.name in EMULATED] + [
    (c, "shared") for c in CASES if c.name in EMULATED_SHARED]


@pytest.mark.parametrize("case, column_build", EMULATION_RUNS,
                         ids=[f"{c.name}-{build}" for c, build in EMULATION_RUNS])
def test_kernels_under_cpu_emulation(case, column_build, monkeypatch):
    if column_build == "shared":
        monkeypatch.setenv("ERFTOOL_CUDA_COLUMN_BUILD", "shared")
    emulate = _emulation()
    x, w, ko, do, m = make_inputs(case, device="cpu")
    gen = torch.Generator().manual_seed(6)
    go = torch.randn(case.N, case.C_out, *case.out_size, generator=gen, dtype=torch.float64)
    emu = emulate.Emulated(case.kernel, case.stride, case.padding, case.dilation, case.groups,
                           case.G, case.DG)
    expected = reference_forward(case, x, w, ko, do, m)
    expected_grads = reference_grads(case, go, x, w, ko, do, m)
    if case.name in ("dk_groups_strided", "dk_dc", "many_channels", "depthwise_many_channels"):
        # Pretend to have many multiprocessors: blocks then split channel segments.
        monkeypatch.setenv("ERFTOOL_EMU_SMS", "200")
    for images_per_chunk in ((None, 1) if case.name == "dk_dc" else (None,)):
        torch.testing.assert_close(emu.forward(x, w, ko, do, m, images_per_chunk), expected,
                                   rtol=1e-10, atol=1e-10)
        grads = emu.backward(go, x, w, ko, do, m, images_per_chunk)
        for name, got, exp in zip(GRAD_NAMES, grads, expected_grads):
            assert_close_or_none(got, exp, name, rtol=1e-9, atol=1e-9)


# Half types: the same kernels instantiated for __half / __nv_bfloat16, with
# the glue's float32 accumulators (what torch.autocast("cuda") runs).
EMULATED_HALF = ["local_dk", "dk_groups_strided", "dc_v2", "dk_dc", "depthwise_dk_dc"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in EMULATED_HALF],
                         ids=lambda c: c.name)
def test_half_type_kernels_under_cpu_emulation(case, dtype):
    """Against the float64 reference on the same rounded inputs: relative
    errors within two roundings of the type (0.6 of one was measured: the
    float32 sums are exact enough that the result's own rounding dominates),
    every gradient in the type."""
    emulate = _emulation()
    tol = 2 * torch.finfo(dtype).eps
    low = [None if t is None else t.to(dtype) for t in make_inputs(case, device="cpu")]
    exact = [None if t is None else t.double() for t in low]
    gen = torch.Generator().manual_seed(6)
    go = torch.randn(case.N, case.C_out, *case.out_size, generator=gen).to(dtype)
    emu = emulate.Emulated(case.kernel, case.stride, case.padding, case.dilation, case.groups,
                           case.G, case.DG)
    out = emu.forward(*low)
    assert out.dtype == dtype
    assert _rel_err(out.double(), reference_forward(case, *exact)) < tol
    grads = emu.backward(go, *low)
    expected = reference_grads(case, go.double(), *exact)
    for name, got, want in zip(GRAD_NAMES, grads, expected):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = _rel_err(got.double(), want)
        assert err < tol, f"{name}: relative error {err:.3g}"


def test_global_kernels_under_cpu_emulation():
    """launch_global_kernels (one thread per kernel entry) against the CPU op,
    both layouts, offset groups and non-finite offsets."""
    import ctypes

    emulate = _emulation()
    lib = emulate.load()
    assert _native.load_native() is not None, _native.native_error()
    g = torch.Generator().manual_seed(21)
    o, cg, groups, offset_groups, (kh, kw), (sh, sw) = 6, 4, 2, 4, (3, 2), (4, 5)
    w = torch.randn(o, cg, sh, sw, dtype=torch.float64, generator=g)
    off = 1.5 * torch.randn(3, 2 * offset_groups * kh * kw, dtype=torch.float64, generator=g)
    off[0, 0], off[1, 5] = float("nan"), float("-inf")
    shape = (ctypes.c_long * 9)(3, o, cg, groups, offset_groups, kh, kw, sh, sw)
    for tap_major in (False, True):
        expected = torch.ops.erftool_native.global_kernels(w, off, [kh, kw], groups,
                                                           offset_groups, tap_major)
        got = torch.full_like(expected, float("nan"))
        assert lib.kernels_f64(shape, int(tap_major), emulate._ptr(w), emulate._ptr(off),
                               emulate._ptr(got)) == 0
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# (C_out, C_in/groups, groups, offset_groups, kernel, scope): the second scope
# has more cells (72) than one pass of the weight-gradient kernel sums (64).
GLOBAL_BACKWARD_CASES = [(6, 4, 2, 4, (3, 2), (4, 5)), (3, 2, 1, 1, (3, 3), (9, 8))]


@pytest.mark.parametrize("case", GLOBAL_BACKWARD_CASES, ids=["groups", "wide_scope"])
def test_global_kernels_backward_under_cpu_emulation(case):
    """launch_global_kernels_backward (a thread per kernel entry, a block per
    sample) against the CPU op: both layouts, offset groups, a scope wider
    than one pass, non-finite offsets, and each gradient alone."""
    import ctypes

    emulate = _emulation()
    lib = emulate.load()
    assert _native.load_native() is not None, _native.native_error()
    g = torch.Generator().manual_seed(23)
    o, cg, groups, offset_groups, (kh, kw), (sh, sw) = case
    w = torch.randn(o, cg, sh, sw, dtype=torch.float64, generator=g)
    off = 2.5 * torch.randn(3, 2 * offset_groups * kh * kw, dtype=torch.float64, generator=g)
    off[0, 0], off[1, 5], off[2, 2] = float("nan"), float("-inf"), 1.0  # 1.0: an integer sample
    shape = (ctypes.c_long * 9)(3, o, cg, groups, offset_groups, kh, kw, sh, sw)
    for tap_major in (False, True):
        kernels = torch.ops.erftool_native.global_kernels(w, off, [kh, kw], groups,
                                                          offset_groups, tap_major)
        grad = torch.randn(kernels.shape, dtype=torch.float64, generator=g)
        expected = torch.ops.erftool_native.global_kernels_backward(
            grad, w, off, [kh, kw], groups, offset_groups, tap_major, [True, True])
        for mask in ((True, True), (True, False), (False, True)):
            got = [torch.full_like(t, float("nan")) for t in expected]
            pointers = [emulate._ptr(t) if wanted else None for t, wanted in zip(got, mask)]
            assert lib.kernels_backward_f64(shape, int(tap_major), emulate._ptr(grad),
                                            emulate._ptr(w), emulate._ptr(off), *pointers) == 0
            for t, e, wanted in zip(got, expected, mask):
                if wanted:
                    torch.testing.assert_close(t, e, rtol=0, atol=1e-12)
                else:
                    assert torch.isnan(t).all()  # not written


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
def test_global_kernels_and_backward_cuda_match_cpu(dtype):
    g = torch.Generator().manual_seed(22)
    w = torch.randn(8, 4, 4, 4, generator=g).to(dtype)
    off = (1.2 * torch.randn(5, 2 * 2 * 9, generator=g)).to(dtype)
    off[0, 0] = float("nan")
    tol = {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6),
           torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    grad_tol = {torch.float64: dict(rtol=0, atol=1e-11),
                torch.float32: dict(rtol=1e-5, atol=1e-5),
                torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}[dtype]
    op = torch.ops.erftool_native
    for tap_major in (False, True):
        args = ([3, 3], 2, 2, tap_major)
        expected = op.global_kernels(w, off, *args)
        torch.testing.assert_close(op.global_kernels(w.cuda(), off.cuda(), *args).cpu(),
                                   expected, **tol)
        grad = torch.randn(expected.shape, generator=g).to(dtype)
        got = op.global_kernels_backward(grad.cuda(), w.cuda(), off.cuda(), *args, [True, True])
        for a, b in zip(got, op.global_kernels_backward(grad, w, off, *args, [True, True])):
            torch.testing.assert_close(a.cpu(), b, **grad_tol)


# ------------------------------------------------------------------ torch glue
# native/cuda/deform_cuda.cpp (the TORCH_LIBRARY_IMPL of the CUDA kernels) is
# built only where torch has CUDA. The CPU wheel ships torch's c10/cuda and
# ATen headers too, less one header its CMake build generates, so a syntax-only
# compile against them catches misuse of torch's API on any machine.

def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    from torch.utils import cpp_extension

    emulate = _emulation()  # the same needs: g++ with C++20 and the CUDA headers
    root = Path(__file__).resolve().parents[1]
    torch_includes = cpp_extension.include_paths()
    generated = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any((Path(p) / generated).exists() for p in torch_includes):
        (tmp_path / generated).parent.mkdir(parents=True)
        (tmp_path / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path), *torch_includes, str(emulate.cuda_include_dir()),
                str(root / "native" / "include"), str(root / "native" / "cuda")]
    for source in sorted((root / "native" / "cuda").glob("*.cpp")):
        done = subprocess.run(
            [os.environ.get("CXX", "g++"), "-fsyntax-only", "-std=c++20", "-DERFTOOL_WITH_CUDA",
             *(f"-I{p}" for p in includes), str(source)],
            capture_output=True, text=True)
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert done.returncode == 0, f"{source.name}:\n" + "\n".join(errors[:10])
