"""Speed of the global Deformable Kernel's per-image kernels and their gradients
(erftool_native::global_kernels / global_kernels_backward), against the
memory floor measured in the same run: one copy of a tensor the size of the
kernels (every pass writes or reads them once at least).

Prints, per shape and layout, the median milliseconds of the forward, the
backward with both gradients, and with each alone, and their ratio to that
copy. CPU by default; --device cuda times with CUDA events.

Usage:
    python benchmarks/bench_global_kernels.py [--device cpu|cuda] [--threads 2]
        [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import timed  # noqa: E402
from erftool.ops import _native  # noqa: E402

# (label, images, C_out, C_in/groups, groups, offset_groups, scope): 3 x 3 taps.
SHAPES = [
    ("8x256->256 s4", 8, 256, 256, 1, 1, 4),
    ("32x64->64 s4", 32, 64, 64, 1, 1, 4),
    ("8x256 dw s4", 8, 256, 1, 256, 1, 4),
    ("8x256->256 s4 G4", 8, 256, 256, 1, 4, 4),
    ("8x256->256 s7", 8, 256, 256, 1, 1, 7),  # a scope of several vectors of cells (CPU)
]


def median_ms(fn, repeats: int, device: str) -> float:
    if device == "cuda":  # CUDA events around each call, as the GPU benchmark times
        return timed(fn, warmup=5, reps=repeats, queued=False)
    for _ in range(5):  # warm-up, and the allocator's steady state
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(shape, tap_major: bool, device: str, repeats: int):
    label, n, o, cg, groups, offset_groups, scope = shape
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(o, cg, scope, scope, generator=g).to(device)
    offset = (0.5 * torch.randn(n, 2 * offset_groups * 9, generator=g)).to(device)
    args = (weight, offset, [3, 3], groups, offset_groups, tap_major)
    op = torch.ops.erftool_native
    kernels = op.global_kernels(*args)
    grad = torch.randn_like(kernels)
    floor = torch.empty_like(kernels)
    times = {
        "copy": median_ms(lambda: floor.copy_(grad), repeats, device),
        "forward": median_ms(lambda: op.global_kernels(*args), repeats, device),
        "backward": median_ms(lambda: op.global_kernels_backward(grad, *args, [True, True]),
                              repeats, device),
        "weight grad": median_ms(lambda: op.global_kernels_backward(grad, *args, [True, False]),
                                 repeats, device),
        "offset grad": median_ms(lambda: op.global_kernels_backward(grad, *args, [False, True]),
                                 repeats, device),
    }
    layout = "tap-major" if tap_major else "channel-major"
    mb = kernels.numel() * kernels.element_size() / 2**20
    cells = "  ".join(f"{k} {v:7.3f} ms ({v / times['copy']:5.1f}x)"
                      for k, v in times.items() if k != "copy")
    print(f"{label:18s} {layout:13s} kernels {mb:6.1f} MB  copy {times['copy']:7.3f} ms  {cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if _native.load_native() is None:
        print(f"native module unavailable: {_native.native_error()}", file=sys.stderr)
        return 1
    if args.device == "cuda" and not (torch.cuda.is_available() and _native.has_cuda_kernels()):
        print("no CUDA device or no CUDA kernels in the native module", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda"
             else f", {args.threads} threads")
          + f", fp32, 3x3 taps, median of {args.repeats}; (Nx) = multiple of the copy")
    for shape in SHAPES:
        for tap_major in (False, True):
            bench_shape(shape, tap_major, args.device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
