"""`erftool figures`: every figure the README shows, from bundled checkpoints and seeded
data, deterministically; and `erftool bench`, which runs the operator benchmark."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from erftool import plotting
from erftool.commands.common import Console, staged_output, user_message
from erftool.commands.models import require

REPO = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = REPO / "benchmarks" / "bench_ops.py"
BENCH_RESULTS = REPO / "benchmarks" / "results"

FIGURES = ("erf_comparison", "kernel_sampling", "erf_vs_scale", "erf_growth", "op_speed")
GROWTH_DEPTHS = (1, 2, 4, 8, 16, 32)
GROWTH_DRAWS = 64   # random-weight draws averaged per depth


# ---------------------------------------------------------------- (4) growth

def _stack(n: int, weights):
    """n depthwise 3x3 convs; `weights` (D, 3, 3) per layer: D independent 1-channel
    stacks side by side (groups=D), so D weight draws cost one backward pass."""
    import torch
    from torch import nn
    layers = []
    for w in weights:
        d = w.shape[0]
        conv = nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False).float()
        with torch.no_grad():
            conv.weight.copy_(w.view(d, 1, 3, 3))
        layers.append(conv)
    return nn.Sequential(*layers).eval()


def growth_data(depths=None, draws: int | None = None, seed: int = 0):
    """Measured per-axis ERF sigma (mean of sigma_y, sigma_x) of n-layer 3x3 linear stacks:
    uniform weights (signed ERF) and random +-1 weights (the sum of g^2 over `draws`
    independent stacks: its expectation is the uniform ERF, Luo et al.)."""
    import torch
    erf = require("erftool.erf")
    depths = tuple(depths or GROWTH_DEPTHS)
    draws = int(draws or GROWTH_DRAWS)
    size = 2 * max(depths) + 9  # the whole theoretical RF fits, with a margin
    gen = torch.Generator().manual_seed(seed)
    uniform, random = [], []
    for n in depths:
        ones = torch.full((1, 3, 3), 1 / 9, dtype=torch.float32)
        x1 = torch.zeros(1, 1, size, size, dtype=torch.float32)  # linear: input irrelevant
        res = erf.compute_erf(_stack(n, [ones] * n), x1, rule="signed", rf=False, layer="",
                              metrics=False)
        uniform.append(float(np.mean(erf.metrics.axis_std(res.map))))
        # Random signs (mean 0, variance 1): E[g^2] is the same ones-map as for Gaussian
        # weights, but products of n Gaussians are heavy-tailed and a few draws would
        # dominate the estimate at depth 32.
        ws = [torch.randint(0, 2, (draws, 3, 3), generator=gen).float() * 2 - 1
              for _ in range(n)]
        xd = torch.zeros(1, draws, size, size, dtype=torch.float32)
        # rule "square" sums g_c^2 over input channels = over the independent draws.
        acc = erf.compute_erf(_stack(n, ws), xd, rule="square", rf=False, metrics=False,
                               layer="").map
        random.append(float(np.mean(erf.metrics.axis_std(acc))))
    return list(depths), {"uniform weights": uniform,
                          f"random ±1 weights (E[g²], {draws} draws)": random}


def figure_growth(seed: int):
    depths, measured = growth_data(seed=seed)
    return plotting.growth_figure(
        depths, measured, kernel_size=3,
        title="ERF growth with depth: linear 3x3 stacks, stride 1, one channel, centre unit")


# ---------------------------------------------------------------- (5) speed

def default_bench_json() -> Path | None:
    if not BENCH_RESULTS.is_dir():
        return None
    files = sorted(BENCH_RESULTS.glob("*.json"))
    cpu = [f for f in files if f.stem == "cpu"]
    return (cpu or files or [None])[0]


PASS_TITLES = {"fwd": "forward", "fwd_bwd": "forward + backward"}
# Flat rows (bench_ops.py): time keys per pass, and the paired ratios (median of
# per-repeat ratios to conv2d).
ROW_KEYS = {"fwd": "fwd_ms", "fwd_bwd": "fwdbwd_ms"}
PAIRED_KEYS = {"fwd": "paired_ratio_fwd", "fwd_bwd": "paired_ratio_fwdbwd"}


def _nested_rows(data, keep):
    """bench_gpu.py layout: {"shape", "dtype", "ms": {op: {"fwd", "fwd_bwd"} | {"error"}}}."""
    for r in data:
        if r.get("dtype") != keep or not isinstance(r.get("ms"), dict):
            continue
        for op, entry in r["ms"].items():
            if isinstance(entry, dict) and "error" not in entry:
                yield str(r.get("shape", "?")), op, {k: entry.get(k) for k in PASS_TITLES}


def _flat_rows(data, keys=ROW_KEYS):
    """bench_ops.py layout: {"shape", "op", "backend", "fwd_ms", "fwdbwd_ms", ...} per row.
    The pure-PyTorch reference rows are left out: the figure compares what runs."""
    for r in data:
        if not isinstance(r, dict) or r.get("backend") == "reference" or "op" not in r:
            continue
        yield str(r.get("shape", "?")), str(r["op"]), {k: r.get(v) for k, v in keys.items()}


def _panels(rows) -> dict:
    """(case, op, {pass: value}) rows -> {pass title: {case: {op: value}}}, numbers only."""
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for case, op, values in rows:
        for key, title in PASS_TITLES.items():
            if isinstance(values.get(key), (int, float)):
                panels.setdefault(title, {}).setdefault(case, {})[op] = float(values[key])
    return panels


def speed_panels(data) -> tuple[dict, str]:
    """Benchmark JSON -> ({pass title: {case: {op: ms}}}, device text).

    Reads both layouts the benchmarks write: bench_ops.py's {"meta", "rows": [flat rows]}
    and bench_gpu.py's {"environment", "results": [nested rows]}. Failed ops are left
    out; when several dtypes were measured, float32 is shown."""
    env = {}
    if isinstance(data, dict):
        env = data.get("environment") or data.get("meta") or {}
        data = data.get("results", data.get("rows", []))
    if not isinstance(data, list):
        raise ValueError("benchmark results: expected a 'results' or 'rows' list")
    data = [r for r in data if isinstance(r, dict)]
    dtypes = [r.get("dtype") for r in data if r.get("dtype")]
    keep = "float32" if "float32" in dtypes else (dtypes[0] if dtypes else env.get("dtype"))
    rows = _nested_rows(data, keep) if any("ms" in r for r in data) else _flat_rows(data)
    panels = _panels(rows)
    if not panels:
        raise ValueError("the benchmark results hold no timings")
    device = env.get("device") or env.get("cpu") or ""
    if env.get("threads"):
        device = f"{device}, {env['threads']} threads"
    if keep:
        device = f"{device}, {keep}" if device else str(keep)
    if (env.get("processes") or 1) > 1:  # bench_ops.py --processes
        device = f"{device}, median of {env['processes']} processes"
    return panels, str(device)


def paired_ratio_panels(data) -> dict:
    """bench_ops.py JSON -> {pass title: {case: {op: paired ratio}}} (empty for other layouts)."""
    rows = data.get("rows", []) if isinstance(data, dict) else []
    return _panels(_flat_rows(rows, PAIRED_KEYS))


def figure_speed(bench_json):
    path = Path(bench_json) if bench_json else default_bench_json()
    if path is None or not path.exists():
        raise FileNotFoundError(2, "No benchmark results (run `erftool bench` first)",
                                str(path or BENCH_RESULTS / "cpu.json"))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"benchmark results {path} are not valid JSON: {err}") from None
    panels, device = speed_panels(data)
    where = f" ({device})" if device else ""
    return plotting.speed_figure(panels, baseline=_baseline(panels),
                                 ratios=paired_ratio_panels(data),
                                 title=f"erftool operators vs conv2d{where}, from {path.name}")


def _baseline(panels) -> str:
    ops = {op for cases in panels.values() for c in cases.values() for op in c}
    for cand in ("conv2d", "conv3x3", "F.conv2d", "torch.conv2d"):
        if cand in ops:
            return cand
    return sorted(ops)[0]


# ---------------------------------------------------------------- driver

def _builders():
    from erftool.commands import paper as paper
    return {
        "erf_comparison": lambda ctx: paper.figure_comparison(ctx["seed"]),
        "kernel_sampling": lambda ctx: paper.figure_sampling(ctx["seed"]),
        "erf_vs_scale": lambda ctx: paper.figure_scaling(ctx["seed"]),
        "erf_growth": lambda ctx: figure_growth(ctx["seed"]),
        "op_speed": lambda ctx: figure_speed(ctx["bench_json"]),
    }


def run_figures(*, out, fmt, only, bench_json, seed, console: Console,
                skip_missing: bool = False) -> list[Path]:
    """Build the figures in `only` into `out`. With skip_missing (every figure asked
    for implicitly), a figure whose inputs are absent -- no benchmark results yet -- is
    skipped with a warning and the rest are still written; named figures must succeed."""
    builders = _builders()
    ctx = {"seed": seed, "bench_json": bench_json}
    written = []
    with staged_output(out) as tmp:
        with console.progress(list(only), "figures") as bar:
            for name in bar:
                try:
                    fig = builders[name](ctx)
                except FileNotFoundError as err:
                    if not skip_missing:
                        raise
                    import click
                    click.echo(f"warning: {name} skipped: {user_message(err)}", err=True)
                    continue
                plotting.save(fig, tmp / name, fmt)
                written.append(Path(out) / f"{name}.{fmt}")
    return written


def run_bench(args: list[str]) -> int:
    """Run benchmarks/bench_ops.py; results go to benchmarks/results/cpu.json (where
    `erftool figures` reads them) unless --json is given."""
    if not BENCH_SCRIPT.exists():
        raise FileNotFoundError(2, "No benchmark script", str(BENCH_SCRIPT))
    if "--json" not in args and not any(a.startswith("--json=") for a in args) \
            and "-h" not in args and "--help" not in args:
        BENCH_RESULTS.mkdir(parents=True, exist_ok=True)
        args = [*args, "--json", str(BENCH_RESULTS / "cpu.json")]
    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *args], cwd=str(REPO))
