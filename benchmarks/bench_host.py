"""Fixed cost per call of erftool's operators, against conv2d's.

On a tiny input (1 x 4 x 8 x 8, 3x3 taps, one thread) the arithmetic is
negligible and a call's time is what it costs to get to the kernels: argument
checks, the custom-operator and autograd layers, the backend choice and the
native operations' own set-up. On a GPU that cost is host time, paid on every
call whatever the layer's size: a layer whose device time is smaller is
host-bound (benchmarks/RESULTS.md). Prints, per op, the median microseconds
of forward (no grad) and forward+backward calls, and their ratio to
F.conv2d's on the same input, measured in the same run. The global DK is
timed in its GPU form (the batched products of erftool/ops/_global_gemm.py),
forced here on the CPU.

Usage:
    python benchmarks/bench_host.py [--repeats 7] [--calls 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import erftool.ops as ops  # noqa: E402
from erftool.ops import _global_kernel, _native  # noqa: E402


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over repeats of the mean microseconds of `calls` back-to-back calls."""
    for _ in range(max(10, calls // 10)):
        fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def make_calls():
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    n, c, hw = 1, 4, 8
    x, w3, w4 = leaf(n, c, hw, hw), leaf(c, c, 3, 3), leaf(c, c, 4, 4)
    local, glob = leaf(n, 18, hw, hw, scale=0.5), leaf(n, 18, scale=0.5)
    data, mask = leaf(n, 18, hw, hw, scale=0.5), torch.rand(n, 9, hw, hw).requires_grad_()
    return {
        "conv2d": lambda: F.conv2d(x, w3, padding=1),
        "local_dk": lambda: ops.deform_kernel2d(x, w4, local, kernel_size=3, padding=1),
        "global_dk": lambda: ops.deform_kernel2d(x, w4, glob, kernel_size=3, padding=1),
        "dk_dc": lambda: ops.deform_kernel2d(x, w4, local, kernel_size=3, padding=1,
                                             data_offset=data),
        "dc": lambda: ops.deform_conv2d(x, data, w3, padding=1, mask=mask),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if _native.load_native() is None:
        print(f"bench_host: native module unavailable: {_native.native_error()}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    _global_kernel.form = lambda input, weight: "gemm"  # the GPU form, on the CPU

    rows = {}
    for name, fn in make_calls().items():
        with torch.no_grad():
            fwd = per_call_us(fn, args.calls, args.repeats)
        both = per_call_us(lambda: fn().sum().backward(), args.calls, args.repeats)
        rows[name] = {"fwd_us": fwd, "fwd_bwd_us": both}
    base = rows["conv2d"]
    print(f"torch {torch.__version__}, 1 thread, input 1x4x8x8, median of {args.repeats} x "
          f"{args.calls} calls")
    print(f"{'op':>10} {'fwd us':>9} {'/conv2d':>8} {'fwd+bwd us':>11} {'/conv2d':>8}")
    for name, row in rows.items():
        row["fwd_ratio"] = row["fwd_us"] / base["fwd_us"]
        row["fwd_bwd_ratio"] = row["fwd_bwd_us"] / base["fwd_bwd_us"]
        print(f"{name:>10} {row['fwd_us']:9.1f} {row['fwd_ratio']:7.1f}x "
              f"{row['fwd_bwd_us']:11.1f} {row['fwd_bwd_ratio']:7.1f}x")
    if args.json:  # written whole or not at all
        target = Path(args.json)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
        os.replace(partial, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
