"""Choosing between the native kernels and the pure-PyTorch reference.

Priority: the `backend=` argument of a call, then `use_backend(...)`, then the
ERFTOOL_BACKEND environment variable, then "auto" (native where it is built
for the tensor's device and dtype, else the reference with one warning).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Optional

import torch

from . import _native

BACKENDS = ("auto", "native", "reference")
# The native CPU kernels' path overrides (native/cpu/deform_cpu.cpp).
_CPU_TUNING = ("ERFTOOL_CPU_COLUMN_BUILD", "ERFTOOL_CPU_BANDS", "ERFTOOL_CPU_GEMM")
_override: Optional[str] = None
_warned = set()


def _validated(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return name


def requested(argument: Optional[str] = None) -> str:
    """The backend asked for, before checking what is available."""
    if argument is not None:
        return _validated(argument, "backend argument")
    if _override is not None:
        return _override
    env = os.environ.get("ERFTOOL_BACKEND")
    if env:
        return _validated(env, "ERFTOOL_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block."""
    global _override
    previous, _override = _override, _validated(name, "use_backend")
    try:
        yield
    finally:
        _override = previous


def native_unsupported_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the native kernels cannot run this call, or None if they can."""
    module = _native.load_native()
    if module is None:
        return f"native module unavailable ({_native.native_error()})"
    if device.type == "cuda" and not module.has_cuda_kernels():
        return "native module was built without CUDA kernels"
    if device.type not in ("cpu", "cuda"):
        return f"no native kernels for device type {device.type!r}"
    return None


def resolve(argument: Optional[str], tensor: torch.Tensor) -> str:
    """'native' or 'reference' for a call on `tensor`."""
    name = requested(argument)
    if name == "reference":
        return "reference"
    reason = native_unsupported_reason(tensor.device, tensor.dtype)
    if reason is None:
        return "native"
    if name == "native":
        raise RuntimeError(f"erftool: the native backend was requested but {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"erftool: {reason}; falling back to the slower pure-PyTorch reference backend",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def backend_info() -> dict:
    """What `erftool doctor` prints: which backend is active, and why."""
    module = _native.load_native()
    asked = requested()
    info = {
        "requested": asked,
        "source": "use_backend()" if _override is not None else (
            "ERFTOOL_BACKEND" if os.environ.get("ERFTOOL_BACKEND") else "default"),
        "native_available": module is not None,
        "native_error": _native.native_error(),
        "native_build_dir": _native.build_dir(),
        "openmp": bool(module is not None and module.has_openmp()),
        "openmp_threads": module.openmp_max_threads() if module is not None else None,
        "cuda_kernels": bool(module is not None and module.has_cuda_kernels()),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # Tuning overrides a benchmark may have left set (ERFTOOL_CHUNK_MB,
        # ERFTOOL_CUDA_COLUMN_BUILD, ERFTOOL_CPU_*): they change speed and
        # memory, not results.
        "chunk_mb": _native.chunk_bytes() / (1 << 20),
        "cuda_column_build": os.environ.get("ERFTOOL_CUDA_COLUMN_BUILD") or "by scope (default)",
        "cpu_tuning": {name: os.environ[name] for name in _CPU_TUNING if os.environ.get(name)}
        or "defaults",
    }
    if asked == "reference":
        info["active_cpu"] = "reference"
        info["why"] = f"forced by {info['source']}"
    elif module is not None:
        info["active_cpu"] = "native"
        info["why"] = "native module built and loaded"
    else:
        info["active_cpu"] = "reference"
        info["why"] = f"native module unavailable: {_native.native_error()}"
    return info
