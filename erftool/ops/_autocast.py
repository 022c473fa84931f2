"""How erftool's operators run inside a torch.autocast region.

Under autocast the layers around a deformable one hand it tensors of mixed
precision: an offset generator (a conv or linear layer) returns float16 /
bfloat16 offsets while the input or the scope weight is still float32. The ops
therefore cast their floating-point arguments to one dtype first, as autocast
does for conv2d:
  * CUDA: the autocast dtype (float16 or bfloat16; the CUDA kernels take both
    and accumulate in float32);
  * CPU: float32, since the CPU kernels take float32 and float64 only (casting
    bfloat16 up is exact).
As in autocast itself, float64 tensors are left alone. The casts are
differentiable, so gradients reach float32 parameters in their own dtype.

The public functions (erftool.ops.deform_kernel2d / deform_conv2d) cast before
checking their arguments; the Autocast kernels registered here do the same for
code that calls torch.ops.erftool.* directly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def run_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype the ops run in on this device type inside an enabled
    autocast region, or None outside one."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    if device_type == "cpu":
        return torch.float32
    return torch.get_autocast_dtype(device_type)


def cast(args: Sequence, device_type: str, dtype: torch.dtype) -> list:
    """args with every float16/bfloat16/float32 tensor on device_type cast to dtype."""
    return [
        a.to(dtype) if isinstance(a, Tensor) and a.device.type == device_type
        and a.dtype in _CASTABLE and a.dtype != dtype else a
        for a in args
    ]


def cast_for(input, args: Sequence) -> list:
    """args as the op should see them for this input (cast under autocast);
    unchanged when input is no tensor (the argument checks name it)."""
    if not isinstance(input, Tensor):
        return list(args)
    dtype = run_dtype(input.device.type)
    return list(args) if dtype is None else cast(args, input.device.type, dtype)


def register(lib: torch.library.Library, name: str, op) -> None:
    """Autocast kernels of `name` on CPU and CUDA: cast, then call `op` with
    that device's autocast key excluded (below it, the autograd kernel)."""
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + ("CPU" if device_type == "cpu" else "CUDA")
        keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(*args, _device_type=device_type, _keys=keys):
            dtype = run_dtype(_device_type)
            if dtype is not None:
                args = cast(args, _device_type, dtype)
            with torch._C._ExcludeDispatchKeyGuard(_keys):
                return op(*args)

        lib.impl(name, kernel, key_name)
