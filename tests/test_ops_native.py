"""Native kernels against the pure-PyTorch reference: values and every
gradient in float64, agreement in float32, gradcheck and opcheck."""
import dataclasses

import pytest
import torch

import erftool.ops as ops

from _op_cases import CASES, IDS, differentiable


def test_native_backend_is_built_and_active():
    info = ops.backend_info()
    assert info["native_available"], f"native module failed to build: {info['native_error']}"
    assert info["active_cpu"] == "native"


def test_backend_info_reports_tuning_overrides(monkeypatch):
    monkeypatch.delenv("ERFTOOL_CHUNK_MB", raising=False)
    monkeypatch.delenv("ERFTOOL_CUDA_COLUMN_BUILD", raising=False)
    for name in ("ERFTOOL_CPU_COLUMN_BUILD", "ERFTOOL_CPU_BANDS", "ERFTOOL_CPU_GEMM"):
        monkeypatch.delenv(name, raising=False)
    info = ops.backend_info()
    assert info["chunk_mb"] == 256 and info["cuda_column_build"] == "by scope (default)"
    assert info["cpu_tuning"] == "defaults"
    monkeypatch.setenv("ERFTOOL_CHUNK_MB", "32")
    monkeypatch.setenv("ERFTOOL_CUDA_COLUMN_BUILD", "shared")
    monkeypatch.setenv("ERFTOOL_CPU_COLUMN_BUILD", "scatter")
    monkeypatch.setenv("ERFTOOL_CPU_BANDS", "0")
    info = ops.backend_info()
    assert info["chunk_mb"] == 32 and info["cuda_column_build"] == "shared"
    assert info["cpu_tuning"] == {"ERFTOOL_CPU_COLUMN_BUILD": "scatter", "ERFTOOL_CPU_BANDS": "0"}


def _grads(case, tensors, backend):
    leaves = {k: v.detach().clone().requires_grad_(k in differentiable(case, tensors))
              for k, v in tensors.items()}
    out = case.call(leaves, backend=backend)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_native_matches_reference_float64_forward_and_gradients(case):
    tensors = case.make(torch.float64)
    out_n, grads_n = _grads(case, tensors, "native")
    out_r, grads_r = _grads(case, tensors, "reference")
    torch.testing.assert_close(out_n, out_r, rtol=1e-10, atol=1e-10)
    for name in differentiable(case, tensors):
        torch.testing.assert_close(grads_n[name], grads_r[name], rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_native_matches_reference_float32(case):
    tensors = case.make(torch.float32)
    out_n, grads_n = _grads(case, tensors, "native")
    out_r, grads_r = _grads(case, tensors, "reference")
    torch.testing.assert_close(out_n, out_r, rtol=1e-4, atol=1e-4)
    for name in differentiable(case, tensors):
        torch.testing.assert_close(grads_n[name], grads_r[name], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_native(case):
    # Small shapes: the full (not fast-mode) gradcheck is one backward per output.
    small = dataclasses.replace(case, batch=1, size=(5, 5), c_in=2 * case.groups,
                                c_out=2 * case.groups)
    small = dataclasses.replace(small, offset_groups=min(case.offset_groups, small.c_in),
                                data_groups=min(case.data_groups, small.c_in))
    tensors = small.make(torch.float64)
    case = small
    names = differentiable(case, tensors)

    def fn(*args):
        return case.call({**tensors, **dict(zip(names, args))}, backend="native")

    inputs = tuple(tensors[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _op_args(case, tensors, backend):
    t = tensors
    if case.op == "dk":
        return torch.ops.erftool.deform_kernel2d.default, (
            t["input"], t["weight"], t["offset"], t.get("data_offset"), t.get("bias"),
            list(case.kernel), list(case.stride), list(case.padding), list(case.dilation),
            case.groups, case.offset_groups, backend)
    return torch.ops.erftool.deform_conv2d.default, (
        t["input"], t["data_offset"], t["weight"], t.get("bias"), t.get("mask"),
        list(case.stride), list(case.padding), list(case.dilation), backend)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7], CASES[11]],
                         ids=[IDS[0], IDS[5], IDS[7], IDS[11]])
def test_opcheck(case, backend):
    tensors = {k: v.requires_grad_() for k, v in case.make(torch.float64).items()}
    op, args = _op_args(case, tensors, backend)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", [CASES[7], CASES[5]], ids=[IDS[7], IDS[5]])
def test_torch_compile_fullgraph_matches_eager(case):
    # Forward and every gradient: AOTAutograd traces the Autograd-key kernel
    # (for the global DK, the forward that keeps its kernels for the backward).
    tensors = case.make(torch.float32)

    def fn(t):
        return case.call(t).relu().sum()

    def value_and_grads(f):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
        out = f(leaves)
        return [out.detach(), *torch.autograd.grad(out, list(leaves.values()))]

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for got, want in zip(value_and_grads(compiled), value_and_grads(fn)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[9]], ids=[IDS[0], IDS[5], IDS[9]])
def test_empty_batch(case):
    tensors = {k: (v[:0] if k not in ("weight", "bias") else v).requires_grad_()
               for k, v in case.make(torch.float64).items()}
    out = case.call(tensors, backend="native")
    assert out.shape == (0, case.c_out) + case.out_size()
    out.sum().backward()
    assert tensors["weight"].grad is not None and torch.all(tensors["weight"].grad == 0)


def test_nan_and_inf_offsets_do_not_crash_native():
    case = CASES[7]
    tensors = case.make(torch.float64)
    tensors["offset"][0, :5] = float("nan")
    tensors["offset"][1, 3:9] = float("inf")
    tensors["data_offset"][0, 2:] = float("-inf")
    tensors["data_offset"][1, :4] = 1e30
    out = case.call(tensors, backend="native")
    ref = case.call(tensors, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()


def test_zero_offsets_scope_equal_kernel_is_conv2d_native():
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    off = torch.zeros(2, 18, 5, 4, dtype=torch.float64)
    got = ops.deform_kernel2d(x, w, off, kernel_size=3, stride=2, padding=1, groups=2,
                              backend="native")
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, stride=2, padding=1,
                                                               groups=2), rtol=0, atol=1e-12)


def test_backend_environment_variable_and_context(monkeypatch):
    assert ops.requested_backend() == "auto"
    monkeypatch.setenv("ERFTOOL_BACKEND", "reference")
    assert ops.requested_backend() == "reference"
    with ops.use_backend("native"):
        assert ops.requested_backend() == "native"
    monkeypatch.setenv("ERFTOOL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        ops.requested_backend()


@pytest.mark.parametrize("case", [CASES[0], CASES[9]], ids=[IDS[0], IDS[9]])
def test_double_backward_raises_a_clear_error(case):
    tensors = {k: v.requires_grad_() for k, v in case.make(torch.float64).items()}
    out = case.call(tensors, backend="native")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), tensors["input"], create_graph=True)


def test_autograd_function_only_when_a_gradient_can_flow(monkeypatch):
    # Under no_grad, or with no input requiring grad, the Autograd-key kernel
    # goes straight to the kernel (no autograd.Function, no graph node).
    from erftool.ops import _custom_ops

    def refuse(*args):
        raise AssertionError("autograd.Function used without gradients")

    monkeypatch.setattr(_custom_ops._DeformKernel2dFunction, "apply", refuse)
    case = CASES[0]
    tensors = case.make(torch.float32)
    assert case.call(tensors).grad_fn is None
    with torch.no_grad():
        assert case.call({k: v.requires_grad_() for k, v in tensors.items()}).grad_fn is None
    with pytest.raises(AssertionError, match="without gradients"):
        case.call(tensors)  # now some inputs require grad: the Function is used
