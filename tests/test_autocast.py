"""The operators and modules inside torch.autocast on CPU: mixed-precision
arguments are cast to float32 (the CPU kernels' dtype), with the same values
and gradients as an explicit cast, through the public functions, through
torch.ops directly and under torch.compile. (CUDA: tests/test_ops_cuda.py.)"""
import pytest
import torch

import erftool.ops as ops
from erftool.nn import DeformConv2d, DeformKernel2d, DeformKernelConv2d

from _op_cases import CASES, IDS, differentiable
from test_ops_native import _op_args

# Local DK, global DK, DK + DC, DCNv2 with mask.
AUTOCAST_CASES = [CASES[0], CASES[5], CASES[7], CASES[11]]
AUTOCAST_IDS = [IDS[0], IDS[5], IDS[7], IDS[11]]
LOW = (torch.bfloat16, torch.float16)


def _half_offsets(tensors, low):
    """The tensors as an autocast region hands them over: offsets and mask
    from a generator layer in the low dtype, input and weight in float32."""
    return {k: v.to(low) if k in ("offset", "data_offset", "mask") else v
            for k, v in tensors.items()}


def _value_and_grads(case, tensors, autocast_dtype=None):
    # As test_ops_native._grads, but with only the forward inside the region
    # (backward outside it, as PyTorch recommends).
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    if autocast_dtype is None:
        out = case.call(leaves, backend="native")
    else:
        with torch.autocast("cpu", dtype=autocast_dtype):
            out = case.call(leaves, backend="native")
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_public_op_casts_mixed_arguments_to_float32(case, low):
    mixed = _half_offsets(case.make(torch.float32), low)
    out, grads = _value_and_grads(case, mixed, autocast_dtype=low)
    # The same op on the arguments cast by hand: same kernels, same values.
    cast = {k: v.float() for k, v in mixed.items()}
    want_out, want_grads = _value_and_grads(case, cast)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for name in differentiable(case, mixed):
        # Each gradient comes back in its argument's own dtype.
        assert grads[name].dtype == mixed[name].dtype, name
        torch.testing.assert_close(grads[name], want_grads[name].to(mixed[name].dtype),
                                   rtol=0, atol=0, msg=lambda m: f"grad of {name}: {m}")


def test_mixed_arguments_outside_autocast_still_raise():
    case = CASES[0]
    mixed = _half_offsets(case.make(torch.float32), torch.bfloat16)
    with pytest.raises(ValueError, match="offset has dtype torch.bfloat16"):
        case.call(mixed, backend="native")


@pytest.mark.parametrize("case", [CASES[0], CASES[11]], ids=[IDS[0], IDS[11]])
def test_torch_ops_call_is_cast_by_the_autocast_kernel(case):
    mixed = _half_offsets(case.make(torch.float32), torch.bfloat16)
    op, args = _op_args(case, mixed, "native")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(*args)
    op, args = _op_args(case, {k: v.float() for k, v in mixed.items()}, "native")
    torch.testing.assert_close(out, op(*args), rtol=0, atol=0)


def test_float64_arguments_are_left_alone():
    case = CASES[7]
    tensors = case.make(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.call(tensors, backend="native")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, case.call(tensors, backend="native"), rtol=0, atol=0)


def _modules():
    torch.manual_seed(0)
    made = [
        DeformKernel2d(8, 8, 3, scope=4, padding=1),
        DeformKernel2d(8, 8, 3, scope=4, padding=1, mode="global"),
        DeformConv2d(8, 8, 3, padding=1, modulated=True),
        DeformKernelConv2d(8, 8, 3, scope=4, padding=1),
    ]
    for m in made:  # non-zero offset generators: offsets that move something
        for name, p in m.named_parameters():
            if "weight" in name and p.dim() > 1 and not p.detach().any():
                torch.nn.init.normal_(p, std=0.05)
    return made


@pytest.mark.parametrize("index", range(4), ids=["dk-local", "dk-global", "dcv2", "dk+dc"])
def test_modules_train_under_autocast(index):
    """A bfloat16 conv feeds the module, whose offset generators run in
    bfloat16 too: the step runs and every parameter gets a finite float32
    gradient pointing the float32 step's way. (bfloat16 offsets move the
    sampling points by their rounding, so the offset generators' gradients,
    sums of slopes that partly cancel, differ from float32 by up to ~20 % in
    norm; the op's own arithmetic is checked exactly above.)"""
    module = _modules()[index]
    stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))

    def step(autocast):
        for p in list(module.parameters()) + list(stem.parameters()):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(stem(x))
        out.float().square().mean().backward()
        return out.float(), {n: p.grad.clone() for n, p in module.named_parameters()}

    out_amp, grads_amp = step(True)
    out_fp32, grads_fp32 = step(False)
    assert out_amp.dtype == torch.float32
    torch.testing.assert_close(out_amp, out_fp32, rtol=0.05, atol=0.05)
    for name, g in grads_amp.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads_fp32[name].flatten(),
                                                       dim=0)
        assert cosine > 0.95, (name, float(cosine))


def test_torch_compile_under_autocast_matches_eager():
    case = CASES[7]
    mixed = _half_offsets(case.make(torch.float32), torch.bfloat16)

    def fn(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return case.call(t)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(mixed), fn(mixed), rtol=0, atol=0)
    assert ops.backend_info()["active_cpu"] == "native"


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[11]], ids=[IDS[0], IDS[5], IDS[11]])
def test_backward_inside_the_autocast_region_matches(case):
    """The backward's own products (GEMMs, convolutions) must not be cast
    down when backward() is called inside the region."""
    tensors = case.make(torch.float32)
    inside = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        case.call(inside, backend="native").sum().backward()
    outside = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    case.call(outside, backend="native").sum().backward()
    for name in inside:
        torch.testing.assert_close(inside[name].grad, outside[name].grad, rtol=0, atol=0)
