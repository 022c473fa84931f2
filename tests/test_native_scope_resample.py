"""The native four-corner scope resampling of the global Deformable Kernel
(native/cpu/scope_resample_cpu.cpp) against the dense product it replaces:
float64 forward and both gradients, the float32 (streaming-store) path,
block edges, thread-count independence and index checking."""
import pytest
import torch

from erftool.ops import _native

pytestmark = pytest.mark.skipif(
    _native.load_native() is None, reason=f"native module unavailable: {_native.native_error()}")

op = None if _native.load_native() is None else torch.ops.erftool_native


def corners(rows, cells, dtype, seed=0):
    """Random corner sets, with a repeated cell and a zero weight in row 0
    (both occur at the scope's border)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, cells, (rows, 4), generator=g)
    weight = torch.rand(rows, 4, generator=g, dtype=torch.float64).to(dtype)
    index[0, 1] = index[0, 0]
    weight[0, 3] = 0
    return index, weight


def dense(index, weight, cells):
    return torch.zeros(index.shape[0], cells, dtype=weight.dtype).scatter_add(1, index, weight)


def resample(w, index, weight):
    out = torch.empty(index.shape[0], w.shape[0], dtype=w.dtype)
    op.scope_resample(w, index, weight, out)
    return out


# m against blocks of 512 columns (forward) and 2048 (backward): one partial
# block, several whole blocks, a ragged last block
@pytest.mark.parametrize("m, cells", [(1, 9), (7, 16), (1024, 16), (1300, 25), (4500, 16)])
def test_matches_the_dense_product_with_both_gradients(m, cells):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(m, cells, dtype=torch.float64, generator=g)
    index, weight = corners(11, cells, torch.float64)
    coef = dense(index, weight, cells)
    torch.testing.assert_close(resample(w, index, weight), coef @ w.t(), rtol=0, atol=1e-12)

    grad = torch.randn(11, m, dtype=torch.float64, generator=g)
    start = torch.randn(m, cells, dtype=torch.float64, generator=g)
    grad_weight = start.clone()  # the kernel adds into it
    grad_corners = op.scope_resample_backward(grad, w, index, weight, grad_weight, True)
    torch.testing.assert_close(grad_weight, start + grad.t() @ coef, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_corners, (grad @ w).gather(1, index), rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [4096, 4100])  # whole aligned vectors (streamed) and not
def test_float32_matches_float64(m):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(m, 16, dtype=torch.float64, generator=g)
    index, weight = corners(9, 16, torch.float64)
    want = resample(w, index, weight)
    got = resample(w.float(), index, weight.float())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(9, m, dtype=torch.float64, generator=g)
    grad_weight = torch.zeros(m, 16, dtype=torch.float64)
    grad_corners = op.scope_resample_backward(grad, w, index, weight, grad_weight, True)
    grad_weight32 = torch.zeros(m, 16)
    grad_corners32 = op.scope_resample_backward(grad.float(), w.float(), index, weight.float(),
                                                grad_weight32, True)
    torch.testing.assert_close(grad_weight32, grad_weight.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_corners32, grad_corners.float(), rtol=1e-4, atol=1e-3)


def test_backward_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5000, 16, generator=g)
    index, weight = corners(24, 16, torch.float32)
    grad = torch.randn(24, 5000, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grad_weight = torch.zeros(5000, 16)
            grad_corners = op.scope_resample_backward(grad, w, index, weight, grad_weight, True)
            results.append((grad_weight, grad_corners))
    finally:
        torch.set_num_threads(threads)
    for grad_weight, grad_corners in results[1:]:
        assert torch.equal(grad_weight, results[0][0])
        assert torch.equal(grad_corners, results[0][1])


def test_backward_computes_only_what_is_asked():
    w = torch.randn(40, 16)
    index, weight = corners(3, 16, torch.float32)
    grad = torch.randn(3, 40)
    assert op.scope_resample_backward(grad, w, index, weight, torch.empty(0), False) is None
    grad_weight = torch.zeros(40, 16)
    assert op.scope_resample_backward(grad, w, index, weight, grad_weight, False) is None
    assert grad_weight.abs().sum() > 0


@pytest.mark.parametrize("bad", [-1, 16])
def test_corner_index_outside_the_scope_raises(bad):
    w = torch.randn(40, 16)
    index, weight = corners(3, 16, torch.float32)
    index[2, 2] = bad
    with pytest.raises(RuntimeError, match="out of range"):
        resample(w, index, weight)
    with pytest.raises(RuntimeError, match="out of range"):
        op.scope_resample_backward(torch.randn(3, 40), w, index, weight, torch.zeros(40, 16), True)
