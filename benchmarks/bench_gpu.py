"""GPU benchmarks of erftool's native CUDA operators against cuDNN conv2d.

Measures, per shape and dtype, forward and forward+backward medians (CUDA
events, after warm-up), and the kernel time alone of each (profiler), of
  * conv2d           torch.nn.functional.conv2d, 3x3 (cuDNN, benchmark mode): the anchor
  * local DK         erftool.ops.deform_kernel2d, scope 4x4, per-location offsets
  * global DK        erftool.ops.deform_kernel2d, scope 4x4, per-image offsets
  * DC               erftool.ops.deform_conv2d (DCNv2 with mask)
  * DK+DC            deform_kernel2d with kernel and data offsets
  * torchvision DC   torchvision.ops.deform_conv2d, when torchvision is installed
and reports the ratios to conv2d against the targets (local DK forward
<= 2.5x, global DK forward <= 1.3x).

TF32 is pinned (--tf32 off|on, default off) for cuBLAS and cuDNN alike and
reported with the results. Diagnostics: --global-forms also times the global
DK with each of its forms forced (the batched products in either layout, and
the CPU's size rule) and cuDNN's convolution with per-image weights alone, in
NCHW and channels-last layout (a candidate building block); --column-paths
also times the ops that build columns with the column build's shared-memory
path forced (ERFTOOL_CUDA_COLUMN_BUILD=shared: the register and identity
paths' baseline); --profile prints the CUDA kernels of one forward, and one
forward+backward, of each op on the first shape of each dtype.
Usage:
    python benchmarks/bench_gpu.py --out gpu-results [--quick] [--dtypes float32,bfloat16]
        [--global-forms] [--column-paths] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
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
from erftool.ops import _native  # noqa: E402

TARGETS = {"local_dk": 2.5, "global_dk": 1.3}

# (name, N, C_in, C_out, H=W, groups): ResNet-stage-like shapes and one depthwise
# layer, 3x3 kernels, stride 1, pad 1.
SHAPES = [
    ("r2_56x56_c64", 32, 64, 64, 56, 1),
    ("r3_28x28_c128", 32, 128, 128, 28, 1),
    ("r4_14x14_c256", 32, 256, 256, 14, 1),
    ("r5_7x7_c512", 32, 512, 512, 7, 1),
    ("dw_56x56_c256", 32, 256, 256, 56, 256),
]
QUICK_SHAPES = [SHAPES[1], SHAPES[2]]


def timed(fn, warmup: int, reps: int, queued: bool = True) -> float:
    """Median milliseconds of fn() between CUDA events recorded around each call.
    queued: the calls run back to back and the host waits once at the end, so
    it queues work ahead as a training loop does (host-side overhead shows
    only where it exceeds the device time); else the host waits after each
    call, so every call's host-side setup before its first kernel counts."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        if not queued:
            end.synchronize()
        events.append((start, end))
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in events]
    return statistics.median(times)


def make_ops(n, c, o, hw, dtype, groups=1, scope=4, k=3, dev="cuda"):
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen) * scale

    x = rand(n, c, hw, hw)
    w3 = rand(o, c // groups, k, k, scale=0.05)
    ws = rand(o, c // groups, scope, scope, scale=0.05)
    taps = k * k
    local = rand(n, 2 * taps, hw, hw, scale=0.5)
    glob = rand(n, 2 * taps, scale=0.5)
    data_off = rand(n, 2 * taps, hw, hw, scale=0.5)
    mask = torch.rand(n, taps, hw, hw, device=dev, dtype=dtype, generator=gen)
    grad = rand(n, o, hw, hw)
    leaves = {"x": x, "w3": w3, "ws": ws, "local": local, "glob": glob, "off": data_off,
              "mask": mask}

    calls = {
        "conv2d": (lambda t: F.conv2d(t["x"], t["w3"], None, 1, 1, 1, groups), ("x", "w3")),
        "local_dk": (lambda t: ops.deform_kernel2d(t["x"], t["ws"], t["local"], kernel_size=k,
                                                   padding=1, groups=groups, backend="native"),
                     ("x", "ws", "local")),
        "global_dk": (lambda t: ops.deform_kernel2d(t["x"], t["ws"], t["glob"], kernel_size=k,
                                                    padding=1, groups=groups, backend="native"),
                      ("x", "ws", "glob")),
        "dc": (lambda t: ops.deform_conv2d(t["x"], t["off"], t["w3"], None, padding=1,
                                           mask=t["mask"], backend="native"),
               ("x", "off", "w3", "mask")),
        "dk_dc": (lambda t: ops.deform_kernel2d(t["x"], t["ws"], t["local"], kernel_size=k,
                                                padding=1, data_offset=t["off"],
                                                groups=groups, backend="native"),
                  ("x", "ws", "local", "off")),
    }
    try:
        import torchvision  # noqa: F401
        from torchvision.ops import deform_conv2d as tv_deform_conv2d

        calls["torchvision_dc"] = (
            lambda t: tv_deform_conv2d(t["x"], t["off"], t["w3"], None, padding=1, mask=t["mask"]),
            ("x", "off", "w3", "mask"))
    except Exception:
        pass
    return leaves, grad, calls


GLOBAL_FORMS = ("gemm_one_product", "gemm_tap_sums", "grouped_conv")


@contextlib.contextmanager
def forced_global_form(variant):
    """The global DK with one form forced, for comparing them on one device."""
    from erftool.ops import _global_gemm, _global_kernel

    saved = _global_kernel.form, _global_gemm.layout
    if variant == "grouped_conv":  # the CPU's form (before, "size_rule": it or per tap)
        _global_kernel.form = lambda i, w: "conv"
    else:
        _global_kernel.form = lambda i, w: "gemm"
        _global_gemm.layout = lambda i, w, g: variant[len("gemm_"):]
    try:
        yield
    finally:
        _global_kernel.form, _global_gemm.layout = saved


def add_per_image_convolutions(leaves, calls, n, groups):
    """Candidate building blocks for the global DK (--global-forms): cuDNN's
    convolution with per-image 3x3 weights, the batch folded into the groups,
    in NCHW and in channels-last layout (tensors converted beforehand: the
    kernel alone, without the resampling). Timed beside conv2d."""
    x, w3 = leaves["x"], leaves["w3"]
    batch_groups = n * groups
    folded = x.reshape(1, -1, *x.shape[2:])
    weights = w3.repeat(n, 1, 1, 1)  # (N*C_out, C_in/groups, 3, 3): one kernel per image
    for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
        leaves[f"folded_{layout}"] = folded.contiguous(memory_format=fmt)
        leaves[f"weights_{layout}"] = weights.contiguous(memory_format=fmt)
        calls[f"per_image_conv[{layout}]"] = (
            lambda t, a=f"folded_{layout}", b=f"weights_{layout}": F.conv2d(
                t[a], t[b], None, 1, 1, 1, batch_groups).view(n, -1, *t[a].shape[2:]),
            (f"folded_{layout}", f"weights_{layout}"))


def with_global_form(fn, variant):
    def call(tensors):
        with forced_global_form(variant):
            return fn(tensors)
    return call


COLUMN_OPS = ("local_dk", "dc", "dk_dc")


def with_shared_column_build(fn):
    """fn with the CUDA column build's shared-memory path forced (the launcher
    reads ERFTOOL_CUDA_COLUMN_BUILD at every launch)."""
    def call(tensors):
        saved = os.environ.get("ERFTOOL_CUDA_COLUMN_BUILD")
        os.environ["ERFTOOL_CUDA_COLUMN_BUILD"] = "shared"
        try:
            return fn(tensors)
        finally:
            if saved is None:
                del os.environ["ERFTOOL_CUDA_COLUMN_BUILD"]
            else:
                os.environ["ERFTOOL_CUDA_COLUMN_BUILD"] = saved
    return call


def profiled(fn, with_host: bool):
    """The profiler's record of one call of fn (CUDA kernels, and host-side
    operations when with_host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if with_host else [])
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def device_ms(fn) -> float:
    """Milliseconds the device spends in the kernels of one call (profiler
    totals): against the timed wall-clock, it shows how host-bound a call is."""
    try:
        return sum(e.self_device_time_total for e in profiled(fn, False).key_averages()) / 1e3
    except Exception:  # a profiler problem must not cost the timings: NaN in the table
        return float("nan")


def training_step(fn, leaves, used, grad):
    """One forward+backward of fn on copies of the leaves that need gradients
    in `used`, the gradients cleared after each call."""
    train = {key: (val.detach().requires_grad_(key in used) if val.is_floating_point()
                   else val) for key, val in leaves.items()}

    def step():
        out = fn(train)
        out.backward(grad)
        for key in used:
            train[key].grad = None
    return step


def profile_calls(leaves, grad, calls, log):
    """The CUDA kernels of one forward of each op, and of one forward+backward
    of each op not forced into a variant (after a warm-up call each)."""
    for op_name, (fn, used) in calls.items():
        log(f"--- profile: {op_name}")
        try:
            with torch.no_grad():
                fn(leaves)
                prof = profiled(lambda: fn(leaves), True)
            log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
            if "[" not in op_name:
                step = training_step(fn, leaves, used, grad)
                step()
                log(f"--- profile: {op_name} forward+backward")
                log(profiled(step, True).key_averages().table(sort_by="cuda_time_total",
                                                              row_limit=14))
        except Exception as exc:  # e.g. an op without this dtype: keep the benchmark going
            log(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def bench_shape(shape, dtype, args, log, profile=False):
    name, n, c, o, hw, groups = shape
    leaves, grad, calls = make_ops(n, c, o, hw, dtype, groups)
    queued = args.timing == "queued"
    if args.global_forms:
        add_per_image_convolutions(leaves, calls, n, groups)
        base, used = calls["global_dk"]
        for variant in GLOBAL_FORMS:
            calls[f"global_dk[{variant}]"] = (with_global_form(base, variant), used)
    if args.column_paths:
        for op_name in COLUMN_OPS:
            fn, used = calls[op_name]
            calls[f"{op_name}[shared_columns]"] = (with_shared_column_build(fn), used)
    if profile:
        profile_calls(leaves, grad, calls, log)
    row = {"shape": name, "N": n, "C_in": c, "C_out": o, "H": hw, "W": hw, "groups": groups,
           "dtype": str(dtype).replace("torch.", ""), "ms": {}}
    for op_name, (fn, used) in calls.items():
        entry = {}
        try:
            with torch.no_grad():
                entry["fwd"] = timed(lambda: fn(leaves), args.warmup, args.reps, queued)
                entry["fwd_device"] = device_ms(lambda: fn(leaves))
            step = training_step(fn, leaves, used, grad)
            entry["fwd_bwd"] = timed(step, max(1, args.warmup // 2), max(3, args.reps // 2),
                                     queued)
            entry["fwd_bwd_device"] = device_ms(step)
        except Exception as exc:  # keep the other measurements
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        row["ms"][op_name] = entry
        log(f"  {name:>15} {row['dtype']:>9} {op_name:>15}: " + (
            entry.get("error") or f"fwd {entry['fwd']:.3f} ms (device {entry['fwd_device']:.3f}), "
                                  f"fwd+bwd {entry['fwd_bwd']:.3f} ms "
                                  f"(device {entry['fwd_bwd_device']:.3f})"))
        torch.cuda.empty_cache()
    base = row["ms"].get("conv2d", {})
    row["ratio_to_conv2d"] = {}
    for op_name, entry in row["ms"].items():
        if "fwd" in entry and "fwd" in base:
            row["ratio_to_conv2d"][op_name] = {
                "fwd": entry["fwd"] / base["fwd"],
                "fwd_bwd": entry["fwd_bwd"] / base["fwd_bwd"],
            }
    return row


def environment(args) -> dict:
    module = _native.load_native()
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "native_error": _native.native_error(),
        "native_cuda_kernels": bool(module is not None and module.has_cuda_kernels()),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "chunk_mb": os.environ.get("ERFTOOL_CHUNK_MB", "256 (default)"),
        "warmup": args.warmup,
        "reps": args.reps,
        "timing": args.timing,
    }


def markdown(env, rows) -> str:
    lines = ["# erftool GPU benchmark", "",
             f"Device: {env['device']} (sm_{env['capability'][0]}{env['capability'][1]}), "
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}",
             f"TF32: matmul={env['tf32_matmul']}, cudnn={env['tf32_cudnn']}; "
             f"cudnn.benchmark={env['cudnn_benchmark']}; chunk MB={env['chunk_mb']}; "
             f"median of {env['reps']} (fwd) after {env['warmup']} warm-up runs, "
             f"{env['timing']} timing", "",
             "device ms: the kernel time of one call (profiler), without host overhead.", "",
             "| shape | dtype | op | fwd ms | fwd device ms | fwd+bwd ms | fwd+bwd device ms | "
             "fwd / conv2d | fwd+bwd / conv2d |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for op_name, entry in row["ms"].items():
            ratio = row["ratio_to_conv2d"].get(op_name, {})
            if "error" in entry:
                lines.append(f"| {row['shape']} | {row['dtype']} | {op_name} | error: "
                             f"{entry['error'][:80]} | | | | | |")
                continue
            lines.append(
                f"| {row['shape']} | {row['dtype']} | {op_name} | {entry['fwd']:.3f} | "
                f"{entry['fwd_device']:.3f} | {entry['fwd_bwd']:.3f} | "
                f"{entry['fwd_bwd_device']:.3f} | {ratio.get('fwd', float('nan')):.2f}x | "
                f"{ratio.get('fwd_bwd', float('nan')):.2f}x |")
    lines += ["", "## Targets (forward time relative to conv2d)", ""]
    for op_name, target in TARGETS.items():
        for row in rows:
            ratio = row["ratio_to_conv2d"].get(op_name, {}).get("fwd")
            verdict = "n/a" if ratio is None else ("met" if ratio <= target else "MISSED")
            shown = "n/a" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"- {op_name} {row['shape']} {row['dtype']}: {shown} "
                         f"(target <= {target}x): {verdict}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repetitions")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tf32", choices=("off", "on"), default="off")
    parser.add_argument("--timing", choices=("queued", "synced"), default="queued",
                        help="calls back to back (default), or the host waiting after each")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--global-forms", action="store_true",
                        help="also time the global DK with each form forced")
    parser.add_argument("--column-paths", action="store_true",
                        help="also time the column-building ops with the shared-memory path forced")
    parser.add_argument("--profile", action="store_true",
                        help="print the CUDA kernels of each forward (first shape of each dtype)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; nothing to measure", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    args.reps = args.reps if args.reps is not None else (10 if args.quick else 20)

    tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    print(json.dumps(env, indent=1), flush=True)
    if not env["native_cuda_kernels"]:
        print("bench_gpu: the native CUDA kernels are not built; see native_error above",
              file=sys.stderr)
        return 1

    def log(message):
        print(message, flush=True)

    rows = []
    started = time.time()
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name.strip())
        for k, shape in enumerate(QUICK_SHAPES if args.quick else SHAPES):
            rows.append(bench_shape(shape, dtype, args, log, profile=args.profile and not k))
            # Write after every shape: a run stopped at its time limit keeps what it measured.
            (out_dir / "bench_gpu.json").write_text(
                json.dumps({"environment": env, "targets": TARGETS, "results": rows}, indent=1))
            (out_dir / "bench_gpu.md").write_text(markdown(env, rows))
    print(markdown(env, rows))
    print(f"bench_gpu: {time.time() - started:.0f} s; results in {out_dir}/bench_gpu.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
