"""Finding and capturing the probed layer.

The probed layer is named by its dotted module name ("layer3.1.conv2"); the
empty name "" (or None when the model output is spatial) means the model's
output. A forward hook captures the layer's output and then aborts the rest of
the forward pass (`_StopForward`): the layers after the probe cannot influence
its gradient, so running them would only cost time and memory.
"""
from __future__ import annotations

import difflib
from typing import Optional, Tuple

import torch
from torch import nn

OUTPUT = ""  # layer name meaning "the model's output"


class _StopForward(Exception):
    """Raised by the capture hook once the probed output is known."""


def is_spatial(t) -> bool:
    """A (N, C, H, W) tensor with more than one spatial location."""
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] * t.shape[-2] > 1


def resolve_layer(model: nn.Module, layer) -> Tuple[str, Optional[nn.Module]]:
    """(name, module) for a dotted name or a submodule; ("", None) for the output."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, (None if name == OUTPUT else module)
        raise ValueError("layer: the given module is not part of the model")
    if layer == OUTPUT:
        return OUTPUT, None
    modules = dict(model.named_modules())
    if layer in modules:
        return layer, modules[layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else \
        f"some layers: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
    raise ValueError(f"unknown layer {layer!r}; {hint}")


def run_to_layer(model: nn.Module, module: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Forward `x` and return the output of `module` (its first call), or the
    model's output when module is None."""
    if module is None:
        return _forward(model, x)
    captured = []

    def hook(_mod, _inp, out):
        captured.append(out)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        _forward(model, x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("layer: the probed module was not called in the forward pass")
    out = captured[0]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    return out


def _forward(model, x):
    try:
        return model(x)
    except (_StopForward, ValueError):
        raise
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "mismatched channel count" if "channel" in first else "model forward failed"
        raise ValueError(f"{kind} for inputs of shape {tuple(x.shape)}: {first}") from None


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The model output if spatial, else the last module (in completion order)
    whose output is spatial. Runs one no-grad forward on `x`."""
    last = [None]
    names = {id(m): n for n, m in model.named_modules()}

    def hook(mod, _inp, out):
        if is_spatial(out) and names.get(id(mod)):
            last[0] = names[id(mod)]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            out = _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    if is_spatial(out):
        return OUTPUT
    if last[0] is None:
        raise ValueError("model has no spatial output: no module returns an (N, C, H, W) map "
                         "with more than one location")
    return last[0]
