"""CPU benchmarks of erftool's native operators against oneDNN conv2d.

Per shape, fp32, a fixed torch thread count, forward and forward+backward
wall-clock medians (after warm-up) of
  * conv3x3      F.conv2d with a 3x3 kernel, padding 1: the anchor of the ratios
  * conv4x4      F.conv2d with a 4x4 kernel, padding 1 (as many multiply-adds
                 as a scope-4 local DK, for scale; one output row/col fewer)
  * dk_s4        local Deformable Kernel, scope 4x4, per-location offsets
  * dk_s3        local Deformable Kernel, scope 3x3
  * dk_global    global Deformable Kernel, scope 4x4, per-image offsets
  * dk_dc        local DK (scope 4x4) + data offsets (DK + DC)
  * dc           deformable convolution, DCNv2 (offsets + mask)
each with the native backend, plus the pure-PyTorch reference of the local
ops (fewer repeats, after one untimed call: a cold first call of the
reference can take twice its later ones, DC on 56^2x64 1148 ms and then
430-510 ms) for the native/reference speed-up. Beside it the summary prints a
ceiling: the reference's time over that of the op's matrix products alone
(forward+backward: three products of C_out x C_in/groups*cells x N*H*W
multiply-adds, 16 scope cells for a scope-4 DK and DK + DC, 9 taps for DC) at
the best rate torch.mm reaches in the run (--gemm-size cubed, float32). No
column-form op whose products run at that rate can beat the reference by more.
Ratios are
to conv3x3 of the same shape measured in the same run: the ratio of medians,
and the "paired" median of per-repeat ratios with conv3x3 timed right before
each repeat (robust to other processes loading a shared machine).

Allocator: glibc's malloc hands large freed blocks back to the system and
page-faults them in again on the next call. On the 2-core VM these results
come from, that cost more than the depthwise conv2d itself (115 ms
forward+backward against 30 ms with freed memory kept; kernel time 4.4 s
against 0.6 s) and varied several-fold with the host's load. By default
(--allocator steady) the script re-runs itself with glibc told to keep freed
memory (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): the steady state of a
caching allocator such as jemalloc or tcmalloc, for the baseline and our ops
alike. --allocator system keeps glibc's defaults.

Processes: on the 2-core VM, a process's speed is set at its start and can
differ by up to 2x from the next one's (conv2d 56^2x64 forward at 9-17 ms in
five processes in a row, each steady within itself), and our ops do not move in
step with conv2d. --processes K runs the whole measurement in K fresh
processes, one after another, and reports per row the median over them of
every time and ratio.

Usage:
    python benchmarks/bench_ops.py [--threads 2] [--repeats 5] [--processes 3]
                                   [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Targets on CPU (fwd+bwd ratio to conv3x3; native/reference speed-up).
TARGETS = {"dk_s4": 3.0, "dk_s3": 3.0, "dk_global": 1.5, "dc": 3.0}
MIN_SPEEDUP_VS_REFERENCE = 10.0

# glibc tunables that keep freed memory (see the module docstring).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}

# (name, N, C_in, C_out, H=W, groups)
SHAPES = [
    ("56x56_c64", 8, 64, 64, 56, 1),
    ("14x14_c256", 8, 256, 256, 14, 1),
    ("56x56_c256_dw", 8, 256, 256, 56, 256),
]

NATIVE_OPS = ["dk_s4", "dk_s3", "dk_global", "dk_dc", "dc"]
REFERENCE_OPS = ["dk_s4", "dk_dc", "dc"]
# weight cells per input channel in the column form's products
PRODUCT_CELLS = {"dk_s4": 16, "dk_dc": 16, "dc": 9}


def _op_api():
    """The public functions (backend="native"/"reference"), or None before they exist."""
    try:
        import erftool.ops as ops

        return ops
    except Exception:  # pragma: no cover - only while erftool.ops is being written
        return None


class Problem:
    """Tensors of one shape, reused by every op."""

    def __init__(self, n, cin, cout, hw, groups, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.groups = groups
        self.k = 3
        taps = self.k * self.k
        self.x = torch.randn(n, cin, hw, hw, generator=g)
        self.w3 = torch.randn(cout, cin // groups, 3, 3, generator=g) * 0.1
        self.w4 = torch.randn(cout, cin // groups, 4, 4, generator=g) * 0.1
        self.koff = 0.5 * torch.randn(n, 2 * taps, hw, hw, generator=g)
        self.koff_global = 0.5 * torch.randn(n, 2 * taps, generator=g)
        self.doff = torch.randn(n, 2 * taps, hw, hw, generator=g)
        self.mask = torch.rand(n, taps, hw, hw, generator=g)
        self.grad = torch.randn(n, cout, hw, hw, generator=g)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def make_call(ops, name, p: Problem, backend):
    """A closure computing the op's output from fresh leaves (for fwd+bwd)."""
    dk = lambda x, w, k, d: ops.deform_kernel2d(  # noqa: E731
        x, w, k, kernel_size=3, padding=1, groups=p.groups, data_offset=d, backend=backend)
    if name == "conv3x3":
        return lambda x, w: F.conv2d(x, w, padding=1, groups=p.groups), (p.x, p.w3)
    if name == "conv4x4":
        return lambda x, w: F.conv2d(x, w, padding=1, groups=p.groups), (p.x, p.w4)
    if name == "dk_s4":
        return lambda x, w, k: dk(x, w, k, None), (p.x, p.w4, p.koff)
    if name == "dk_s3":
        return lambda x, w, k: dk(x, w, k, None), (p.x, p.w3, p.koff)
    if name == "dk_global":
        return lambda x, w, k: dk(x, w, k, None), (p.x, p.w4, p.koff_global)
    if name == "dk_dc":
        return lambda x, w, k, d: dk(x, w, k, d), (p.x, p.w4, p.koff, p.doff)
    if name == "dc":  # groups come from the weight's shape, as in torchvision
        return lambda x, o, w, m: ops.deform_conv2d(x, o, w, padding=1, mask=m, backend=backend), (
            p.x, p.doff, p.w3, p.mask)
    raise ValueError(name)


def timed(fn, repeats, warmup, anchor=None):
    """Median and min wall time of fn in ms; with an anchor, also the median of
    per-repeat ratios fn/anchor, the anchor timed right before fn each time so
    that load from other processes on a shared machine mostly cancels."""
    for _ in range(warmup):
        fn()
    times, ratios = [], []
    for _ in range(repeats):
        if anchor is not None:
            t0 = time.perf_counter()
            anchor()
            t_anchor = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if anchor is not None:
            ratios.append(times[-1] / t_anchor)
    paired = statistics.median(ratios) if ratios else None
    return 1e3 * statistics.median(times), 1e3 * min(times), paired


def gemm_gflops(size, repeats):
    """The best float32 rate (GFLOP/s) of torch.mm on two size x size matrices
    over `repeats` calls after one untimed call: what the column form's
    products could reach at most on this machine."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def product_gflop_fwdbwd(op, n, cin, cout, hw, groups):
    """GFLOP of the op's three column-form products (3x3 taps, stride 1,
    padding 1: the output is hw x hw)."""
    return 3 * 2 * n * hw * hw * cout * (cin // groups) * PRODUCT_CELLS[op] / 1e9


def _closures(ops, name, p, backend):
    fn, tensors = make_call(ops, name, p, backend)

    def forward():
        with torch.no_grad():
            fn(*tensors)

    def forward_backward():
        leaves = [_leaf(t) for t in tensors]
        out = fn(*leaves)
        grad = p.grad[..., : out.shape[2], : out.shape[3]] if out.shape != p.grad.shape else p.grad
        out.backward(grad)

    return forward, forward_backward


def measure(ops, name, p, backend, repeats, warmup, anchors=None):
    fwd_fn, fb_fn = _closures(ops, name, p, backend)
    a_fwd, a_fb = anchors if anchors else (None, None)
    fwd = timed(fwd_fn, repeats, warmup, a_fwd)
    result = {"fwd_ms": fwd[0], "fwd_min_ms": fwd[1]}
    if fwd[2] is not None:
        result["paired_ratio_fwd"] = fwd[2]
    try:
        fb = timed(fb_fn, repeats, warmup, a_fb)
        result.update(fwdbwd_ms=fb[0], fwdbwd_min_ms=fb[1])
        if fb[2] is not None:
            result["paired_ratio_fwdbwd"] = fb[2]
    except (RuntimeError, NotImplementedError) as exc:
        result["fwdbwd_error"] = str(exc).splitlines()[0]
    return result


def run(args):
    torch.set_num_threads(args.threads)
    print(f"cpu: {_cpu_name()} {_cpu_identity()}", flush=True)
    ops = _op_api()
    if ops is None:
        sys.exit("erftool.ops is not importable")
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    gflops = gemm_gflops(args.gemm_size, args.repeats)
    print(f"torch.mm {args.gemm_size}^3 float32: best {gflops:.0f} GFLOP/s", flush=True)
    for sname, n, cin, cout, hw, groups in shapes:
        p = Problem(n, cin, cout, hw, groups)
        anchors = _closures(ops, "conv3x3", p, None)
        base = {}
        for name in ["conv3x3", "conv4x4"]:
            base[name] = measure(ops, name, p, None, args.repeats, args.warmup)
            rows.append(dict(shape=sname, op=name, backend="onednn", **base[name]))
            _print(rows[-1], base["conv3x3"])
        for name in NATIVE_OPS:
            r = measure(ops, name, p, "native", args.repeats, args.warmup, anchors)
            rows.append(dict(shape=sname, op=name, backend="native", **r))
            _print(rows[-1], base["conv3x3"])
        if not args.no_reference:
            for name in REFERENCE_OPS:  # slow: few repeats
                r = measure(ops, name, p, "reference", args.ref_repeats, args.ref_warmup)
                rows.append(dict(shape=sname, op=name, backend="reference", **r,
                                 gemm_gflops=gflops, product_gflop_fwdbwd=product_gflop_fwdbwd(
                                     name, n, cin, cout, hw, groups)))
                _print(rows[-1], base["conv3x3"])
    _add_ratios(rows)
    _summary(rows)
    _write(args, rows)


def _write(args, rows):
    if args.json:
        meta = dict(threads=args.threads, repeats=args.repeats, processes=args.processes,
                    torch=torch.__version__, cpu=_cpu_name(), **_cpu_identity(),
                    machine=platform.machine(), dtype="float32", allocator=args.allocator,
                    malloc_env={k: os.environ.get(k) for k in STEADY_MALLOC})
        path = Path(args.json)
        partial = path.with_name(path.name + ".partial")  # never a half-written file
        partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        os.replace(partial, path)
        print(f"wrote {args.json}")


def median_rows(runs):
    """Rows of several processes' runs (same rows in the same order) as one set:
    each numeric field the median over the runs that have it."""
    merged = []
    for same in zip(*runs):
        row = dict(same[0])
        for key in {k for r in same for k, v in r.items() if isinstance(v, float)}:
            values = [r[key] for r in same if key in r]
            row[key] = statistics.median(values)
        merged.append(row)
    return merged


def run_in_processes(args, argv):
    """The measurement in args.processes fresh processes; their median rows."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"run{i}.json"
            child = [*_without_option(argv, "--json"), "--processes", "1", "--json", str(out)]
            print(f"process {i + 1} of {args.processes}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), *child], check=True)
            runs.append(json.loads(out.read_text())["rows"])
    rows = median_rows(runs)
    print(f"\nmedian over {args.processes} processes:")
    conv = {r["shape"]: r for r in rows if r["op"] == "conv3x3"}
    for r in rows:
        _print(r, conv[r["shape"]])
    _summary(rows)
    _write(args, rows)


def _without_option(argv, name):
    """argv without `name value` / `name=value`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def _add_ratios(rows):
    conv = {r["shape"]: r for r in rows if r["op"] == "conv3x3"}
    native = {(r["shape"], r["op"]): r for r in rows if r["backend"] == "native"}
    for r in rows:
        c = conv[r["shape"]]
        r["ratio_fwd"] = r["fwd_ms"] / c["fwd_ms"]
        if "fwdbwd_ms" in r:
            r["ratio_fwdbwd"] = r["fwdbwd_ms"] / c["fwdbwd_ms"]
        if r["backend"] == "reference" and (r["shape"], r["op"]) in native:
            nat = native[(r["shape"], r["op"])]
            r["speedup_native_fwd"] = r["fwd_ms"] / nat["fwd_ms"]
            if "fwdbwd_ms" in r and "fwdbwd_ms" in nat:
                r["speedup_native_fwdbwd"] = r["fwdbwd_ms"] / nat["fwdbwd_ms"]
        if r.get("gemm_gflops") and "fwdbwd_ms" in r:
            products_ms = 1e3 * r["product_gflop_fwdbwd"] / r["gemm_gflops"]
            r["speedup_ceiling_fwdbwd"] = r["fwdbwd_ms"] / products_ms


def _print(r, conv):
    """One row; its ratios to conv, unless it carries them (the medians over
    processes of each process's ratios)."""
    fb = r.get("fwdbwd_ms")
    ratio_f = r.get("ratio_fwd", r["fwd_ms"] / conv["fwd_ms"])
    text = f"{r['shape']:16s} {r['op']:10s} {r['backend']:9s} fwd {r['fwd_ms']:9.1f} ms ({ratio_f:5.2f}x)"
    if "paired_ratio_fwd" in r:
        text += f" [paired {r['paired_ratio_fwd']:5.2f}x]"
    if fb is not None:
        text += f"  fwd+bwd {fb:9.1f} ms ({r.get('ratio_fwdbwd', fb / conv['fwdbwd_ms']):5.2f}x)"
    if "paired_ratio_fwdbwd" in r:
        text += f" [paired {r['paired_ratio_fwdbwd']:5.2f}x]"
    elif "fwdbwd_error" in r:
        text += f"  fwd+bwd: {r['fwdbwd_error']}"
    print(text, flush=True)


def _summary(rows):
    print("\nchecks (fwd+bwd ratio to conv3x3; native speed-up over the reference):")
    for r in rows:
        if r["backend"] == "native" and r["op"] in TARGETS and "ratio_fwdbwd" in r:
            ratio = r.get("paired_ratio_fwdbwd", r["ratio_fwdbwd"])
            ok = ratio <= TARGETS[r["op"]]
            print(f"  {r['shape']:16s} {r['op']:8s} {ratio:5.2f}x (paired) "
                  f"(target <= {TARGETS[r['op']]}x) {'ok' if ok else 'MISSED'}")
        if "speedup_native_fwdbwd" in r:
            ok = r["speedup_native_fwdbwd"] >= MIN_SPEEDUP_VS_REFERENCE
            print(f"  {r['shape']:16s} {r['op']:8s} native {r['speedup_native_fwdbwd']:6.1f}x "
                  f"faster than reference (target >= {MIN_SPEEDUP_VS_REFERENCE}x) "
                  f"{'ok' if ok else 'MISSED'}")
        if "speedup_ceiling_fwdbwd" in r:
            print(f"  {r['shape']:16s} {r['op']:8s} ceiling {r['speedup_ceiling_fwdbwd']:5.1f}x "
                  f"(its products alone, {r['product_gflop_fwdbwd']:.1f} GFLOP at "
                  f"{r['gemm_gflops']:.0f} GFLOP/s)")


def _cpu_fields():
    """The first processor's fields of /proc/cpuinfo ({} elsewhere)."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_name():
    return _cpu_fields().get("model name") or platform.processor()


def _cpu_identity():
    """What the ratios depend on beyond the model name, which a VM may report
    as a bare "AMD EPYC": family and model (AMD family 25 is Zen 3 from model 0
    and Zen 4 from model 16), and the vector ISA ATen (hence oneDNN's conv2d
    baseline) dispatches to."""
    fields = _cpu_fields()
    return dict(cpu_family=fields.get("cpu family"), cpu_model=fields.get("model"),
                avx512f="avx512f" in fields.get("flags", "").split(),
                aten_cpu_capability=torch.backends.cpu.get_cpu_capability())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--ref-warmup", type=int, default=1,
                    help="untimed calls of each reference op first (0: time the cold call too)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--gemm-size", type=int, default=2048,
                    help="matrix size of the torch.mm that sets the ceiling's GEMM rate")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--processes", type=int, default=1,
                    help="run in this many fresh processes; report the medians")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--allocator", choices=["steady", "system"], default="steady",
                    help="steady: glibc keeps freed memory (default); system: glibc defaults")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.allocator == "steady" and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        # glibc reads its tunables at start-up: run again with them set
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv],
                  {**os.environ, **STEADY_MALLOC})
    print(f"allocator: {args.allocator}", flush=True)
    if args.processes > 1:
        run_in_processes(args, argv)
    else:
        run(args)


if __name__ == "__main__":
    main()
