"""torch.library registration of erftool's operators.

Public custom operators:
    erftool::deform_kernel2d  (Deformable Kernel, optionally + DC)
    erftool::deform_conv2d    (torchvision-compatible deformable convolution)
and their shared backward operator erftool::deform_backward. Each has a fake
kernel (torch.compile / FakeTensor) and the forward ops carry autograd. The
backward op is not itself differentiable: double backward raises (a
deliberate choice; ERFs and training need first-order gradients only).

Kernels come from the backend chosen per call (see _backend.py): the native
column-form library, or the pure-PyTorch reference.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _args, _backend, _global_kernel, _native, reference


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


@torch.library.custom_op("erftool::deform_kernel2d", mutates_args=())
def deform_kernel2d_op(
    input: Tensor, weight: Tensor, offset: Tensor, data_offset: Optional[Tensor],
    bias: Optional[Tensor], kernel_size: List[int], stride: List[int], padding: List[int],
    dilation: List[int], groups: int, offset_groups: int, backend: str,
) -> Tensor:
    geom = _geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                     offset_groups, data_offset)
    out = _forward(backend or None, input, weight, offset, data_offset, None, bias, geom)
    return out.contiguous()


@deform_kernel2d_op.register_fake
def _(input, weight, offset, data_offset, bias, kernel_size, stride, padding, dilation,
      groups, offset_groups, backend):
    out = _args.output_size("erftool", input.shape[2:], kernel_size, stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0]) + tuple(out))


@torch.library.custom_op("erftool::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
    mask: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
    backend: str,
) -> Tensor:
    geom = _deform_conv_geometry(input, offset, weight, stride, padding, dilation)
    out = _forward(backend or None, input, weight, None, offset, mask, bias, geom)
    return out.contiguous()


def _deform_conv_geometry(input, offset, weight, stride, padding, dilation):
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    groups = input.shape[1] // weight.shape[1]
    return _geometry(input, weight, kernel, stride, padding, dilation, groups, 1, offset)


@deform_conv2d_op.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation, backend):
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    out = _args.output_size("erftool", input.shape[2:], kernel, stride, padding, dilation)
    return input.new_empty((input.shape[0], weight.shape[0]) + tuple(out))


# ---------------------------------------------------------------- backward

@contextlib.contextmanager
def _autograd_reenabled():
    """Custom-op kernels run below the autograd dispatch keys; the reference
    and global-conv backward passes differentiate plain torch code, so they
    lift that exclusion (and only that one) for their duration."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def _autograd_backward(fn, grad_output, tensors, needs):
    """Gradients of fn(*tensors) by autograd (reference and global-conv paths)."""
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
              needs):
    """Gradients (input, weight, kernel_offset, data_offset, mask, bias)."""
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
                                        needs, _autograd_reenabled) + [None, None]
    else:
        grads = _native_backward(grad_output, input, weight, kernel_offset, data_offset, mask,
                                 geom, needs)
    return list(grads) + [grad_bias]


@torch.library.custom_op("erftool::deform_backward", mutates_args=())
def deform_backward_op(
    grad_output: Tensor, input: Tensor, weight: Tensor, kernel_offset: Optional[Tensor],
    data_offset: Optional[Tensor], mask: Optional[Tensor], kernel_size: List[int],
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    offset_groups: int, backend: str, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    geom = _geometry(input, weight, kernel_size, stride, padding, dilation, groups,
                     offset_groups, data_offset)
    grads = _backward(backend or None, grad_output, input, weight, kernel_offset, data_offset,
                      mask, geom, needs)
    # Custom ops return tensors only: an absent gradient is an empty tensor.
    return tuple(g.contiguous() if g is not None else input.new_empty(0) for g in grads)


@deform_backward_op.register_fake
def _(grad_output, input, weight, kernel_offset, data_offset, mask, kernel_size, stride,
      padding, dilation, groups, offset_groups, backend, needs):
    like = (input, weight, kernel_offset, data_offset, mask)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format)
             if t is not None and n else input.new_empty(0)
             for t, n in zip(like, needs[:5])]
    bias = input.new_empty(weight.shape[0]) if needs[5] else input.new_empty(0)
    return tuple(grads + [bias])


def _or_none(grad: Tensor, needed: bool) -> Optional[Tensor]:
    return grad if needed else None


# deform_kernel2d: inputs (input, weight, offset, data_offset, bias, ...)
def _dk_setup(ctx, inputs, output):
    (input, weight, offset, data_offset, bias, kernel_size, stride, padding, dilation,
     groups, offset_groups, backend) = inputs
    ctx.save_for_backward(input, weight, offset, data_offset)
    ctx.config = (kernel_size, stride, padding, dilation, groups, offset_groups, backend)
    ctx.has_bias = bias is not None


def _dk_backward(ctx, grad_output):
    input, weight, offset, data_offset = ctx.saved_tensors
    kernel_size, stride, padding, dilation, groups, offset_groups, backend = ctx.config
    ni = ctx.needs_input_grad
    needs = [ni[0], ni[1], ni[2], ni[3] and data_offset is not None, False,
             ni[4] and ctx.has_bias]
    g = deform_backward_op(grad_output, input, weight, offset, data_offset, None,
                           kernel_size, stride, padding, dilation, groups, offset_groups,
                           backend, needs)
    return (_or_none(g[0], needs[0]), _or_none(g[1], needs[1]), _or_none(g[2], needs[2]),
            _or_none(g[3], needs[3]), _or_none(g[5], needs[5]),
            None, None, None, None, None, None, None)


deform_kernel2d_op.register_autograd(_dk_backward, setup_context=_dk_setup)


# deform_conv2d: inputs (input, offset, weight, bias, mask, ...)
def _dc_setup(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.config = (stride, padding, dilation, backend)
    ctx.has_bias = bias is not None


def _dc_backward(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    stride, padding, dilation, backend = ctx.config
    geom = _deform_conv_geometry(input, offset, weight, stride, padding, dilation)
    ni = ctx.needs_input_grad
    needs = [ni[0], ni[2], False, ni[1], ni[4] and mask is not None, ni[3] and ctx.has_bias]
    g = deform_backward_op(grad_output, input, weight, None, offset, mask,
                           list(geom.kernel_size), stride, padding, dilation, geom.groups, 1,
                           backend, needs)
    return (_or_none(g[0], needs[0]), _or_none(g[3], needs[3]), _or_none(g[1], needs[1]),
            _or_none(g[5], needs[5]), _or_none(g[4], needs[4]), None, None, None, None)


deform_conv2d_op.register_autograd(_dc_backward, setup_context=_dc_setup)


def native_module():
    """The loaded native library (or None); exposed for diagnostics."""
    return _native.load_native()
