"""Run erftool's CUDA kernels on the CPU, for machines without a GPU.

native/cuda/deform_kernels.cu is compiled as host C++ (g++ -std=c++20) after
two mechanical rewrites (`kernel<<<grid, block, smem, stream>>>(args)` becomes
`emu_launch(kernel, grid, block, smem, stream, args)`, the `extern __shared__`
buffer becomes the emulated block's buffer); emu.h supplies threadIdx and
friends, __syncthreads (a std::barrier) and atomicAdd; emu_api.cpp stubs the
CUDA runtime calls and exports the launchers to ctypes. `Emulated` mirrors
the torch glue (native/cuda/deform_cuda.cpp: chunks, per-group GEMMs, the
launch sequence) with CPU tensors, so the kernels' indexing, reductions and
barriers are checked against erftool.ops.reference without a GPU.

Needs g++ with C++20 and the CUDA headers (cuda_runtime.h, cuda_fp16.h;
nvcc's include folder). float64, float32, and float16 / bfloat16 with the CUDA
glue's float32 accumulators (offset-gradient partials, the weight gradient,
the atomic input gradient with data offsets, then cast_kernel). Usage:
    python native/cuda/emulate/emulate.py          # checks a set of cases, exit 1 on mismatch
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
CUDA_DIR = HERE.parent
NATIVE_DIR = CUDA_DIR.parent


def cuda_include_dir() -> Optional[Path]:
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve().parent.parent
        candidates += [real / "include", Path(nvcc).parent.parent / "include"]
    candidates.append(Path("/usr/local/cuda/include"))
    for path in candidates:
        if (path / "cuda_runtime.h").exists() and (path / "cuda_fp16.h").exists():
            return path
    return None


_PROBE = """
#include <atomic>
#include <barrier>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
int main() { std::barrier<> b(1); b.arrive_and_wait(); float f = 0;
             std::atomic_ref<float>(f).fetch_add(1.f); return __half2float(__float2half(f)) != 1.f; }
"""
_probe_result = {}


def unavailable_reason() -> Optional[str]:
    """Why the emulation cannot run here (None when it can)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx})"
    include = cuda_include_dir()
    if include is None:
        return "CUDA headers (cuda_runtime.h, cuda_fp16.h) not found"
    if "reason" not in _probe_result:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cpp"
            src.write_text(_PROBE)
            done = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-I", str(include),
                                   str(src)], capture_output=True, text=True)
        _probe_result["reason"] = None if done.returncode == 0 else (
            f"{cxx} cannot compile C++20 <barrier> / std::atomic_ref with the CUDA headers: "
            + (done.stderr.strip().splitlines() or ["?"])[-1][:200])
    return _probe_result["reason"]


def _rewrite(source: str) -> str:
    source = source.replace("extern __shared__ __align__(16) unsigned char smem[];",
                            "unsigned char* smem = emu_smem();")
    source, launches = re.subn(
        r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(",
        lambda m: f"emu_launch({m.group(1)}, {m.group(2)}, ", source, flags=re.S)
    if launches == 0 or "emu_smem()" not in source:
        raise RuntimeError("emulate.py: deform_kernels.cu no longer matches the rewrite rules")
    return source.replace('#include "deform_kernels.cuh"',
                          '#include "emu.h"\n#include "deform_kernels.cuh"', 1)


_LIB = None


def _compile_command(source, target) -> list:
    # -Bsymbolic: the launchers call the runtime stubs of emu_api.cpp, never a
    # real libcudart that the process loaded first (a CUDA build of torch does:
    # its cudaFuncSetAttribute refused the host function with error 400).
    return [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-fPIC", "-shared",
            "-Wl,-Bsymbolic", "-fpermissive", "-w", "-pthread", "-I", str(cuda_include_dir()),
            "-I", str(NATIVE_DIR / "include"), "-I", str(CUDA_DIR), "-I", str(HERE),
            str(source), str(HERE / "emu_api.cpp"), "-o", str(target)]


def load(build_root: Optional[str] = None) -> ctypes.CDLL:
    """Compile (cached by content) and load the emulated kernels."""
    global _LIB
    if _LIB is not None:
        return _LIB
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"CUDA emulation unavailable: {reason}")
    cu = (CUDA_DIR / "deform_kernels.cu").read_text()
    parts = [cu, (CUDA_DIR / "deform_kernels.cuh").read_text(),
             (NATIVE_DIR / "include" / "erftool" / "deform_math.h").read_text(),
             (HERE / "emu.h").read_text(), (HERE / "emu_api.cpp").read_text()]
    parts += _compile_command("kernels_emu.cpp", "lib.so")
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    root = Path(build_root or os.path.join(tempfile.gettempdir(), "erftool-cuda-emulation"))
    work = root / digest
    lib_path = work / "libdeform_emu.so"
    if not lib_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        (work / "kernels_emu.cpp").write_text(_rewrite(cu))
        tmp = work / f"lib.{os.getpid()}.so"
        cmd = _compile_command(work / "kernels_emu.cpp", tmp)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError("emulate.py: compiling the emulated kernels failed:\n"
                               + done.stderr[-4000:])
        os.replace(tmp, lib_path)
    _LIB = ctypes.CDLL(str(lib_path))
    return _LIB


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


_SUFFIXES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16",
             torch.bfloat16: "bf16"}


def _suffix(dtype: torch.dtype) -> str:
    if dtype not in _SUFFIXES:
        raise TypeError(f"emulation supports float64 / float32 / float16 / bfloat16, not {dtype}")
    return _SUFFIXES[dtype]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """acc_t of deform_kernels.cuh: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Emulated:
    """deform_forward / deform_backward as deform_cuda.cpp runs them, on CPU tensors."""

    def __init__(self, kernel_size, stride, padding, dilation, groups, offset_groups,
                 data_offset_groups):
        self.k, self.s, self.p, self.d = (tuple(v) for v in (kernel_size, stride, padding,
                                                             dilation))
        self.groups, self.G_arg, self.DG_arg = groups, offset_groups, data_offset_groups
        self.lib = load()

    def _geometry(self, x, w, ko, do, m):
        n, c, h, wd = x.shape
        ho = (h + 2 * self.p[0] - self.d[0] * (self.k[0] - 1) - 1) // self.s[0] + 1
        wo = (wd + 2 * self.p[1] - self.d[1] * (self.k[1] - 1) - 1) // self.s[1] + 1
        G = self.G_arg if ko is not None else 1
        DG = self.DG_arg if (do is not None or m is not None) else 1
        return n, c, h, wd, ho, wo, G, DG

    def _params(self, nb, c, h, wd, ho, wo, scope, G, DG):
        return (ctypes.c_long * 18)(nb, c, h, wd, ho, wo, *self.k, *scope, *self.s, *self.p,
                                    *self.d, G, DG)

    @staticmethod
    def _chunk(t, n0, cur):
        return None if t is None else t[n0:n0 + cur].contiguous()

    def forward(self, x, w, ko, do, m, images_per_chunk=None):
        n, c, h, wd, ho, wo, G, DG = self._geometry(x, w, ko, do, m)
        scope = tuple(w.shape[2:])
        P, S2 = ho * wo, scope[0] * scope[1]
        R, o = c * S2, w.shape[0]
        Rg, Og = R // self.groups, o // self.groups
        nb = images_per_chunk or n
        out = torch.empty(n, o, ho, wo, dtype=x.dtype)
        if w.shape[1] == 1 and self.groups == c:  # depthwise: every image in one launch
            dense = [None if t is None else t.contiguous() for t in (x, w, ko, do, m)]
            rc = getattr(self.lib, "depthwise_" + _suffix(x.dtype))(
                self._params(n, c, h, wd, ho, wo, scope, G, DG), ctypes.c_long(o // c),
                *(_ptr(t) for t in dense), _ptr(out))
            if rc != 0:
                raise RuntimeError(f"depthwise_forward returned CUDA error {rc}")
            return out
        w2 = w.reshape(o, Rg)
        build = getattr(self.lib, "build_" + _suffix(x.dtype))
        for n0 in range(0, n, nb):
            cur = min(nb, n - n0)
            cols = torch.full((R, cur * P), float("nan"), dtype=x.dtype)
            rc = build(self._params(cur, c, h, wd, ho, wo, scope, G, DG),
                       *(_ptr(self._chunk(t, n0, cur)) for t in (x, ko, do, m)), _ptr(cols))
            if rc != 0:
                raise RuntimeError(f"build_columns returned CUDA error {rc}")
            for g in range(self.groups):  # one product per image, straight into NCHW
                dst = out[n0:n0 + cur, g * Og:(g + 1) * Og].view(cur, Og, P)
                torch.bmm(w2[g * Og:(g + 1) * Og].expand(cur, Og, Rg),
                          cols[g * Rg:(g + 1) * Rg].view(Rg, cur, P).transpose(0, 1), out=dst)
        return out

    def backward(self, go, x, w, ko, do, m, images_per_chunk=None):
        n, c, h, wd, ho, wo, G, DG = self._geometry(x, w, ko, do, m)
        scope = tuple(w.shape[2:])
        P, S2, K = ho * wo, scope[0] * scope[1], self.k[0] * self.k[1]
        R, o = c * S2, w.shape[0]
        Rg, Og = R // self.groups, o // self.groups
        dt, sfx, acc = x.dtype, _suffix(x.dtype), _acc_dtype(x.dtype)
        half_type = acc != dt
        nb = images_per_chunk or n
        segments = getattr(self.lib, "segments_" + sfx)
        segments.restype = ctypes.c_long
        U = segments(self._params(nb, c, h, wd, ho, wo, scope, G, DG))
        assert U % (G // math.gcd(G, DG) * DG) == 0 and c % U == 0, U
        nan = float("nan")
        w2 = w.reshape(o, Rg)
        # With data offsets the input gradient is an atomics target of acc_t.
        gin = torch.zeros_like(x, dtype=acc) if do is not None else torch.full_like(x, nan)
        gw = torch.zeros(o, Rg, dtype=acc)
        gko = None if ko is None else torch.full_like(ko, nan)
        gdo = None if do is None else torch.full_like(do, nan)
        gm = None if m is None else torch.full_like(m, nan)
        lib = self.lib
        for n0 in range(0, n, nb):
            cur = min(nb, n - n0)
            prm = self._params(cur, c, h, wd, ho, wo, scope, G, DG)
            xs, kos, dos, ms = (self._chunk(t, n0, cur) for t in (x, ko, do, m))
            cols = torch.full((R, cur * P), nan, dtype=dt)
            assert getattr(lib, "build_" + sfx)(prm, _ptr(xs), _ptr(kos), _ptr(dos), _ptr(ms),
                                                _ptr(cols)) == 0
            gcols = torch.full((R, cur * P), nan, dtype=dt)
            # Every group in one batched product (groups, Og, cur*P).
            go_g = go[n0:n0 + cur].transpose(0, 1).reshape(self.groups, Og, cur * P)
            torch.bmm(w2.view(self.groups, Og, Rg).transpose(1, 2), go_g,
                      out=gcols.view(self.groups, Rg, cur * P))
            cols_t = cols.view(self.groups, Rg, cur * P).transpose(1, 2)
            if half_type:
                gw.view(self.groups, Og, Rg).add_(torch.bmm(go_g, cols_t))
            else:
                gw.view(self.groups, Og, Rg).baddbmm_(go_g, cols_t)
            parts = [torch.full((cur * U * j * P,), nan, dtype=acc) if t is not None else None
                     for t, j in ((ko, 2 * K), (do, 2 * K), (m, K))]
            gin_chunk = gin[n0:n0 + cur]
            if ko is not None or do is not None or m is not None:
                rc = getattr(lib, "fused_" + sfx)(
                    prm, ctypes.c_long(U), _ptr(gcols), _ptr(xs), _ptr(kos), _ptr(dos), _ptr(ms),
                    *(_ptr(p) for p in parts), _ptr(gin_chunk) if do is not None else None)
                assert rc == 0, rc
            if do is None:
                assert getattr(lib, "rigid_" + sfx)(prm, _ptr(gcols), _ptr(kos), _ptr(ms),
                                                    _ptr(gin_chunk)) == 0
            for part, full, groups, j in zip(parts, (gko, gdo, gm), (G, DG, DG),
                                             (2 * K, 2 * K, K)):
                if part is not None:
                    assert getattr(lib, "reduce_" + sfx)(cur, U, groups, j, P, _ptr(part),
                                                         _ptr(full[n0:n0 + cur])) == 0
        if gin.dtype != dt:
            cast = torch.empty_like(x)
            assert getattr(lib, "cast_" + sfx)(_ptr(gin), _ptr(cast), ctypes.c_long(gin.numel())) == 0
            gin = cast
        return gin, gw.to(dt).view_as(w), gko, gdo, gm


def _main() -> int:
    sys.path.insert(0, str(NATIVE_DIR.parent))
    sys.path.insert(0, str(NATIVE_DIR.parent / "tests"))
    import test_ops_cuda as cases  # the CUDA test-suite's cases and oracle

    failures = 0
    for case in cases.CASES:
        x, w, ko, do, m = cases.make_inputs(case, device="cpu")
        go = torch.randn(case.N, case.C_out, *case.out_size, dtype=torch.float64)
        ref = cases.reference_forward(case, x, w, ko, do, m)
        ref_grads = cases.reference_grads(case, go, x, w, ko, do, m)
        emu = Emulated(case.kernel, case.stride, case.padding, case.dilation, case.groups,
                       case.G, case.DG)
        for nb in (None, 1):
            out = emu.forward(x, w, ko, do, m, nb)
            grads = emu.backward(go, x, w, ko, do, m, nb)
            errors = [float((out - ref).abs().max())] + [
                None if a is None else float((a - b).abs().max())
                for a, b in zip(grads, ref_grads)]
            bad = any(e is not None and not e < 1e-9 for e in errors)
            failures += bad
            print(f"{'FAIL' if bad else 'ok'} {case.name} images_per_chunk={nb}: max errors "
                  + ", ".join("-" if e is None else f"{e:.1e}" for e in errors), flush=True)
    print("emulate.py:", "all cases match" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main())
