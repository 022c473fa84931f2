"""Loading the native operator library.

The C++ (and, where torch has CUDA, the CUDA) kernels under `native/` are
compiled with torch's extension machinery on first use and cached, keyed by
the sources, the torch build and the CPU, so installing erftool never needs
torch inside an isolated build environment. The first build prints a
one-line notice; every later import loads the cached library.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"
_lock = threading.Lock()
_state = {"tried": False, "module": None, "error": None, "build_dir": None}


def chunk_bytes() -> int:
    """Bound on the extra buffers (columns, per-image kernels) of the native
    kernels, which work through the batch in chunks of images within it:
    ERFTOOL_CHUNK_MB, default 256. A global DK forward with gradients keeps
    its per-image kernels for the backward only when they fit this bound."""
    return int(float(os.environ.get("ERFTOOL_CHUNK_MB", "256")) * (1 << 20))


def _cuda_wanted() -> bool:
    if os.environ.get("ERFTOOL_NO_CUDA_BUILD"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _sources(with_cuda: bool) -> List[Path]:
    files = [NATIVE_DIR / "binding.cpp"] + sorted((NATIVE_DIR / "composite").glob("*.cpp"))
    files += sorted((NATIVE_DIR / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((NATIVE_DIR / "cuda").glob("*.cu"))
        files += sorted((NATIVE_DIR / "cuda").glob("*.cpp"))
    return files


def _cpu_tag() -> str:
    # -march=native code must not be reused on another CPU model.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") or line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir(sources: List[Path], flags: List[str]) -> Path:
    digest = hashlib.sha256()
    headers = sorted(NATIVE_DIR.rglob("*.h")) + sorted(NATIVE_DIR.rglob("*.cuh"))
    for path in sources + headers:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for item in flags + [torch.__version__, sys.version, _cpu_tag()]:
        digest.update(item.encode())
    root = os.environ.get("ERFTOOL_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "erftool", "native"
    )
    return Path(root) / digest.hexdigest()[:16]


def _compile():
    from torch.utils.cpp_extension import load

    with_cuda = _cuda_wanted()
    sources = _sources(with_cuda)
    cflags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64"):
        cflags.append("-march=native")
    cuda_flags = ["-O3", "--use_fast_math", "-std=c++17"]
    if with_cuda:
        cflags.append("-DERFTOOL_WITH_CUDA")
        cuda_flags.append("-DERFTOOL_WITH_CUDA")
    build_dir = _build_dir(sources, cflags + (cuda_flags if with_cuda else []))
    build_dir.mkdir(parents=True, exist_ok=True)
    _state["build_dir"] = str(build_dir)
    if not any(build_dir.glob("erftool_native*.so")):
        print(
            f"erftool: compiling the native operators (first use, about a minute); "
            f"cached in {build_dir}",
            file=sys.stderr,
        )
    return load(
        name="erftool_native",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(NATIVE_DIR / "include")],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=bool(os.environ.get("ERFTOOL_BUILD_VERBOSE")),
    )


def load_native():
    """The native module, compiling it on first use; None if unavailable."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if os.environ.get("ERFTOOL_NO_NATIVE"):
                _state["error"] = "disabled by ERFTOOL_NO_NATIVE"
            elif not (NATIVE_DIR / "binding.cpp").exists():
                _state["error"] = f"native sources not found at {NATIVE_DIR}"
            else:
                try:
                    _state["module"] = _compile()
                except Exception as exc:  # compiler missing, build failure, ...
                    message = str(exc).strip().splitlines()
                    _state["error"] = (
                        f"{type(exc).__name__}: {message[-1] if message else ''}".strip()
                    )
        return _state["module"]


def native_error() -> Optional[str]:
    load_native()
    return _state["error"]


def build_dir() -> Optional[str]:
    return _state["build_dir"]


def has_cuda_kernels() -> bool:
    module = load_native()
    return bool(module is not None and module.has_cuda_kernels())
