"""torch.library registration of erftool's operators.

Public custom operators:
    erftool::deform_kernel2d  (Deformable Kernel, optionally + DC)
    erftool::deform_conv2d    (torchvision-compatible deformable convolution)
and their shared backward operator erftool::deform_backward; a global DK
forward with gradients may go through
erftool::_global_deform_kernel2d_keeping_kernels instead, which also returns the
per-image kernels for the backward to take. Each has a fake
kernel (torch.compile / FakeTensor), the forward ops carry autograd and
cast mixed-precision arguments under torch.autocast (_autocast.py). The
backward op is not itself differentiable: double backward raises (a
deliberate choice; ERFs and training need first-order gradients only).

The ops are defined with torch.library.Library, their kernels registered as
CompositeExplicitAutograd (every device: the kernels pick the backend) and
their autograd as Autograd-key kernels around a torch.autograd.Function, as
torchvision does in C++. torch.library.custom_op would do the same with more
host work per call: its autograd wrapper rebuilds the schema's argument list
once per argument on every forward with grad (79 us for these 12 arguments,
torch 2.13 on the 2-core EPYC), a fixed cost that shows on a GPU where a
call's device time is short (benchmarks/bench_host.py).

Kernels come from the backend chosen per call (see _backend.py): the native
column-form library, or the pure-PyTorch reference.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _args, _autocast, _backend, _global_kernel, _native, reference


def _geometry(input, weight, kernel_size, stride, padding, dilation, groups, offset_groups,
              data_offset) -> _args.Geometry:
    taps = kernel_size[0] * kernel_size[1]
    out = _args.output_size("erftool", input.shape[2:], kernel_size, stride, padding, dilation)
    return _args.Geometry(
        tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups,
        offset_groups, _args.data_groups_of(data_offset, taps), out)


def _kind(kernel_offset: Optional[Tensor]) -> str:
    return "global" if kernel_offset is not None and kernel_offset.dim() == 2 else "local"


# ---------------------------------------------------------------- forward

def _expand_global(kernel_offset, geom):
    if kernel_offset is None or kernel_offset.dim() == 4:
        return kernel_offset
    return kernel_offset[:, :, None, None].expand(-1, -1, *geom.out_size).contiguous()


def _native_forward(input, weight, kernel_offset, data_offset, mask, bias, geom):
    out = torch.ops.erftool_native.deform_forward(
        input.contiguous(), weight.contiguous(),
        None if kernel_offset is None else _expand_global(kernel_offset, geom).contiguous(),
        None if data_offset is None else data_offset.contiguous(),
        None if mask is None else mask.contiguous(),
        list(geom.kernel_size), list(geom.stride), list(geom.padding), list(geom.dilation),
        geom.groups, geom.offset_groups, geom.data_offset_groups, _native.chunk_bytes())
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _uses_global_conv(kernel_offset, data_offset, mask) -> bool:
    return kernel_offset is not None and kernel_offset.dim() == 2 and data_offset is None \
        and mask is None


def _forward(backend, input, weight, kernel_offset, data_offset, mask, bias, geom):
    if input.shape[0] == 0:
        return input.new_zeros((0, weight.shape[0]) + tuple(geom.out_size))
    chosen = _backend.resolve(backend, input)
    if chosen == "reference":
        return reference.deform_column_conv(
            input, weight, kernel_offset, _kind(kernel_offset), data_offset, mask, bias, geom)
    if _uses_global_conv(kernel_offset, data_offset, mask):
        return _global_kernel.forward(input, weight, kernel_offset, bias, geom)
    return _native_forward(input, weight, kernel_offset, data_offset, mask, bias, geom)


_LIB = torch.library.Library("erftool", "DEF")  # kept alive: the registrations live with it
_LIB.define(
    "deform_kernel2d(Tensor input, Tensor weight, Tensor offset, Tensor? data_offset, "
    "Tensor? bias, SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
    "SymInt groups, SymInt offset_groups, str backend) -> Tensor")
_LIB.define(
    "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, "
    "SymInt[] stride, SymInt[] padding, SymInt[] dilation, str backend) -> Tensor")
_LIB.define(
    "_global_deform_kernel2d_keeping_kernels(Tensor input, Tensor weight, Tensor offset, "
    "Tensor? bias, SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, SymInt groups, SymInt offset_groups) -> (Tensor, Tensor)")
_LIB.define(
    "deform_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? kernel_offset, "
    "Tensor? data_offset, Tensor? mask, SymInt[] kernel_size, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, SymInt groups, SymInt offset_groups, str backend, "
    "bool[] needs, Tensor? global_kernels=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)")


def _kernel(name: str):
    """Registers the decorated function as the op's kernel on every device."""
    def register(fn):
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return register


def _fake(name: str):
    def register(fn):
        torch.library.register_fake(f"erftool::{name}", fn, lib=_LIB)
        return fn
    return register


@_kernel("deform_kernel2d")
def deform_kernel2d_kernel(input, weight, offset, data_offset, bias, kernel_size, stride,
                           padding, dilation, groups, offset_groups, backend):
    geom = _geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                     offset_groups, data_offset)
    out = _forward(backend or None, input, weight, offset, data_offset, None, bias, geom)
    return out.contiguous()


@_fake("deform_kernel2d")
def _(input, weight, offset, data_offset, bias, kernel_size, stride, padding, dilation,
      groups, offset_groups, backend):
    out = _args.output_size("erftool", input.shape[2:], kernel_size, stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0]) + tuple(out))


def _keeps_global_kernels(input, weight, offset, data_offset, kernel_size, backend) -> bool:
    """Whether a global DK forward with gradients goes through
    _global_deform_kernel2d_keeping_kernels (see _global_kernel.keeps_kernels)."""
    return _uses_global_conv(offset, data_offset, None) \
        and _global_kernel.keeps_kernels(input, weight, kernel_size) \
        and _backend.resolve(backend or None, input) != "reference"


@_kernel("_global_deform_kernel2d_keeping_kernels")
def global_keeping_kernels_kernel(input, weight, offset, bias, kernel_size, stride, padding,
                                  dilation, groups, offset_groups):
    """The global DK forward (native backend) and the per-image kernels it
    convolved with, which the backward then takes instead of resampling them."""
    geom = _geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                     offset_groups, None)
    out, kernels = _global_kernel.forward_keeping_kernels(input, weight, offset, bias, geom)
    return out.contiguous(), kernels


@_fake("_global_deform_kernel2d_keeping_kernels")
def _(input, weight, offset, bias, kernel_size, stride, padding, dilation, groups,
      offset_groups):
    out = _args.output_size("erftool", input.shape[2:], kernel_size, stride, padding, dilation)
    taps = kernel_size[0] * kernel_size[1]
    return (input.new_empty((input.shape[0], weight.shape[0]) + tuple(out)),
            weight.new_empty((input.shape[0], weight.shape[0], weight.shape[1], taps)))


@_kernel("deform_conv2d")
def deform_conv2d_kernel(input, offset, weight, bias, mask, stride, padding, dilation, backend):
    geom = _deform_conv_geometry(input, offset, weight, stride, padding, dilation)
    out = _forward(backend or None, input, weight, None, offset, mask, bias, geom)
    return out.contiguous()


def _deform_conv_geometry(input, offset, weight, stride, padding, dilation):
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    groups = input.shape[1] // weight.shape[1]
    return _geometry(input, weight, kernel, stride, padding, dilation, groups, 1, offset)


@_fake("deform_conv2d")
def _(input, offset, weight, bias, mask, stride, padding, dilation, backend):
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    out = _args.output_size("erftool", input.shape[2:], kernel, stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0]) + tuple(out))


# ---------------------------------------------------------------- backward

@contextlib.contextmanager
def _autograd_reenabled():
    """Custom-op kernels run below the autograd dispatch keys; the reference
    backward differentiates plain torch code, so it lifts that exclusion (and
    only that one) for its duration."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _autograd_backward(fn, grad_output, tensors, needs):
    """Gradients of fn(*tensors) by autograd (the reference backend)."""
    with _autograd_reenabled():
        leaves = [
            None if t is None else t.detach().requires_grad_(bool(need))
            for t, need in zip(tensors, needs)
        ]
        out = fn(*leaves)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad_output, allow_unused=True) if wanted \
            else []
    it = iter(grads)
    result = []
    for t in leaves:
        if t is not None and t.requires_grad:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g)
        else:
            result.append(None)
    return result


def _native_backward(grad_output, input, weight, kernel_offset, data_offset, mask, geom, needs):
    local = _expand_global(kernel_offset, geom)
    grads = torch.ops.erftool_native.deform_backward(
        grad_output.contiguous(), input.contiguous(), weight.contiguous(),
        None if local is None else local.contiguous(),
        None if data_offset is None else data_offset.contiguous(),
        None if mask is None else mask.contiguous(),
        list(geom.kernel_size), list(geom.stride), list(geom.padding), list(geom.dilation),
        geom.groups, geom.offset_groups, geom.data_offset_groups, _native.chunk_bytes(),
        [bool(n) for n in needs[:5]])
    grads = list(grads)
    if kernel_offset is not None and kernel_offset.dim() == 2 and grads[2] is not None:
        grads[2] = grads[2].sum(dim=(2, 3))  # one global offset feeds every location
    return grads


def _backward(backend, grad_output, input, weight, kernel_offset, data_offset, mask, geom,
              needs, global_kernels=None):
    """Gradients (input, weight, kernel_offset, data_offset, mask, bias);
    global_kernels: those a global DK forward kept (native backend only)."""
    grad_bias = grad_output.sum(dim=(0, 2, 3)) if needs[5] else None
    if input.shape[0] == 0:
        zeros = [None if t is None or not n else torch.zeros_like(t) for t, n in zip(
            (input, weight, kernel_offset, data_offset, mask), needs)]
        return zeros + [grad_bias]
    chosen = _backend.resolve(backend, input)
    tensors = (input, weight, kernel_offset, data_offset, mask)
    if chosen == "reference":
        grads = _autograd_backward(
            lambda i, w, k, d, m: reference.deform_column_conv(
                i, w, k, _kind(kernel_offset), d, m, None, geom),
            grad_output, tensors, needs[:5])
    elif _uses_global_conv(kernel_offset, data_offset, mask):
        grads = _global_kernel.backward(grad_output, input, weight, kernel_offset, geom,
                                        needs, global_kernels) + [None, None]
    else:
        grads = _native_backward(grad_output, input, weight, kernel_offset, data_offset, mask,
                                 geom, needs)
    return list(grads) + [grad_bias]


@_kernel("deform_backward")
def deform_backward_kernel(grad_output, input, weight, kernel_offset, data_offset, mask,
                           kernel_size, stride, padding, dilation, groups, offset_groups,
                           backend, needs, global_kernels=None) -> Tuple[Tensor, ...]:
    geom = _geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                     offset_groups, data_offset)
    grads = _backward(backend or None, grad_output, input, weight, kernel_offset, data_offset,
                      mask, geom, needs, global_kernels)
    # Custom ops return tensors only: an absent gradient is an empty tensor.
    return tuple(g.contiguous() if g is not None else input.new_empty(0) for g in grads)


@_fake("deform_backward")
def _(grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride,
      padding, dilation, groups, offset_groups, backend, needs, global_kernels=None):
    like = (input, weight, kernel_offset, data_offset, mask)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format)
             if t is not None and n else input.new_empty(0)
             for t, n in zip(like, needs[:5])]
    bias = input.new_empty(weight.shape[0]) if needs[5] else input.new_empty(0)
    return tuple(grads + [bias])


def _or_none(grad: Tensor, needed: bool) -> Optional[Tensor]:
    return grad if needed else None


def _below_autograd(op, args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _autograd_kernel(op, function, tensor_args):
    """The Autograd-key kernel of `op`: through `function` when a gradient can
    flow, else straight to the kernel below autograd (no graph node)."""
    def kernel(*args):
        if torch.is_grad_enabled() and any(
                args[i] is not None and args[i].requires_grad for i in tensor_args):
            return function.apply(*args)
        return _below_autograd(op, args)
    return kernel


class _DeformKernel2dFunction(torch.autograd.Function):
    # inputs (input, weight, offset, data_offset, bias, ...)
    @staticmethod
    def forward(ctx, input, weight, offset, data_offset, bias, kernel_size, stride, padding,
                dilation, groups, offset_groups, backend):
        kernels = None
        if _keeps_global_kernels(input, weight, offset, data_offset, kernel_size, backend):
            out, kernels = _below_autograd(
                torch.ops.erftool._global_deform_kernel2d_keeping_kernels.default, (
                    input, weight, offset, bias, kernel_size, stride, padding, dilation,
                    groups, offset_groups))
        else:
            out = _below_autograd(torch.ops.erftool.deform_kernel2d.default, (
                input, weight, offset, data_offset, bias, kernel_size, stride, padding,
                dilation, groups, offset_groups, backend))
        ctx.save_for_backward(input, weight, offset, data_offset, kernels)
        ctx.config = (kernel_size, stride, padding, dilation, groups, offset_groups, backend)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, offset, data_offset, kernels = ctx.saved_tensors
        kernel_size, stride, padding, dilation, groups, offset_groups, backend = ctx.config
        ni = ctx.needs_input_grad
        needs = [ni[0], ni[1], ni[2], ni[3] and data_offset is not None, False,
                 ni[4] and ctx.has_bias]
        g = torch.ops.erftool.deform_backward.default(
            grad_output, input, weight, offset, data_offset, None, kernel_size, stride,
            padding, dilation, groups, offset_groups, backend, needs, kernels)
        return (_or_none(g[0], needs[0]), _or_none(g[1], needs[1]), _or_none(g[2], needs[2]),
                _or_none(g[3], needs[3]), _or_none(g[5], needs[5]),
                None, None, None, None, None, None, None)


class _DeformConv2dFunction(torch.autograd.Function):
    # inputs (input, offset, weight, bias, mask, ...)
    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation, backend):
        out = _below_autograd(torch.ops.erftool.deform_conv2d.default, (
            input, offset, weight, bias, mask, stride, padding, dilation, backend))
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.config = (stride, padding, dilation, backend)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, offset, weight, mask = ctx.saved_tensors
        stride, padding, dilation, backend = ctx.config
        geom = _deform_conv_geometry(input, offset, weight, stride, padding, dilation)
        ni = ctx.needs_input_grad
        needs = [ni[0], ni[2], False, ni[1], ni[4] and mask is not None,
                 ni[3] and ctx.has_bias]
        g = torch.ops.erftool.deform_backward.default(
            grad_output, input, weight, None, offset, mask, list(geom.kernel_size), stride,
            padding, dilation, geom.groups, 1, backend, needs)
        return (_or_none(g[0], needs[0]), _or_none(g[3], needs[3]), _or_none(g[1], needs[1]),
                _or_none(g[5], needs[5]), _or_none(g[4], needs[4]), None, None, None, None)


def _no_double_backward(*args):
    """deform_backward is not differentiable (first-order gradients only)."""
    if torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args):
        raise RuntimeError(
            "erftool: double backward through deform_kernel2d / deform_conv2d is not "
            "supported (first-order gradients only)")
    return _below_autograd(torch.ops.erftool.deform_backward.default, args)


_LIB.impl("deform_kernel2d", _autograd_kernel(
    torch.ops.erftool.deform_kernel2d.default, _DeformKernel2dFunction, (0, 1, 2, 3, 4)),
    "Autograd")
_LIB.impl("deform_conv2d", _autograd_kernel(
    torch.ops.erftool.deform_conv2d.default, _DeformConv2dFunction, (0, 1, 2, 3, 4)),
    "Autograd")
_LIB.impl("deform_backward", _no_double_backward, "Autograd")
_autocast.register(_LIB, "deform_kernel2d", torch.ops.erftool.deform_kernel2d.default)
_autocast.register(_LIB, "deform_conv2d", torch.ops.erftool.deform_conv2d.default)


def native_module():
    """The loaded native library (or None); exposed for diagnostics."""
    return _native.load_native()
