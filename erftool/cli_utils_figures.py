"""`erftool figures`: every figure the README shows, from bundled checkpoints and seeded
data, deterministically; and `erftool bench`, which runs the operator benchmark."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from erftool import plotting
from erftool.cli_utils import Console, staged_output
from erftool.cli_utils_models import require

REPO = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = REPO / "benchmarks" / "bench_ops.py"
BENCH_RESULTS = REPO / "benchmarks" / "results"

FIGURES = ("erf_comparison", "kernel_sampling", "erf_vs_scale", "erf_growth", "op_speed")
GROWTH_DEPTHS = (1, 2, 4, 8, 16, 32)
GROWTH_DRAWS = 16   # random-weight draws averaged per depth


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


def growth_data(depths=GROWTH_DEPTHS, draws: int = GROWTH_DRAWS, seed: int = 0):
    """Measured per-axis ERF sigma (mean of sigma_y, sigma_x) of n-layer 3x3 linear stacks:
    uniform weights (signed ERF) and random N(0, 1) weights (the sum of g^2 over `draws`
    independent stacks, whose shape Luo et al. show equals the uniform one)."""
    import torch
    erf = require("erftool.erf")
    size = 2 * max(depths) + 9  # the whole theoretical RF fits, with a margin
    gen = torch.Generator().manual_seed(seed)
    uniform, random = [], []
    for n in depths:
        ones = torch.full((1, 3, 3), 1 / 9, dtype=torch.float32)
        x1 = torch.zeros(1, 1, size, size, dtype=torch.float32)  # linear: input irrelevant
        res = erf.compute_erf(_stack(n, [ones] * n), x1, rule="signed", rf=False, layer="",
                              metrics=False)
        uniform.append(float(np.mean(erf.metrics.axis_std(res.map))))
        ws = [torch.randn(draws, 3, 3, generator=gen, dtype=torch.float32) for _ in range(n)]
        xd = torch.zeros(1, draws, size, size, dtype=torch.float32)
        # rule "square" sums g_c^2 over input channels = over the independent draws.
        acc = erf.compute_erf(_stack(n, ws), xd, rule="square", rf=False, metrics=False,
                               layer="").map
        random.append(float(np.mean(erf.metrics.axis_std(acc))))
    return list(depths), {"uniform weights": uniform,
                          f"random weights (E[g²], {draws} draws)": random}


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


def speed_cases(data) -> tuple[dict, str]:
    """Benchmark JSON -> ({case label: {op label: ms}}, device text). Accepts a list of
    records or {"results": [...]}; each record names its op, case and time."""
    meta = {}
    if isinstance(data, dict):
        meta = data.get("meta") or data.get("environment") or {}
        data = data.get("results", data.get("records", data.get("cases", [])))
    cases: dict[str, dict[str, float]] = {}
    for r in data:
        op = str(r.get("op") or r.get("name") or r.get("operator") or "?")
        backend = r.get("backend")
        if backend and op not in ("conv2d", "F.conv2d") and "conv2d" != op:
            op = f"{op} ({backend})"
        case = str(r.get("case") or r.get("shape") or r.get("config") or "")
        if r.get("pass") or r.get("direction") or r.get("mode"):
            case = f"{case} {r.get('pass') or r.get('direction') or r.get('mode')}".strip()
        ms = None
        for key, scale in (("ms", 1.0), ("time_ms", 1.0), ("median_ms", 1.0), ("mean_ms", 1.0),
                           ("seconds", 1e3), ("time_s", 1e3), ("median_s", 1e3), ("us", 1e-3)):
            if r.get(key) is not None:
                ms = float(r[key]) * scale
                break
        if ms is None:
            continue
        cases.setdefault(case, {})[op] = ms
    if not cases:
        raise ValueError("the benchmark results hold no timings")
    device = meta.get("device") or meta.get("cpu") or meta.get("gpu") or ""
    return cases, str(device)


def figure_speed(bench_json):
    path = Path(bench_json) if bench_json else default_bench_json()
    if path is None or not path.exists():
        raise FileNotFoundError(2, "No benchmark results (run `erftool bench` first)",
                                str(path or BENCH_RESULTS / "cpu.json"))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"benchmark results {path} are not valid JSON: {err}") from None
    cases, device = speed_cases(data)
    where = f" on {device}" if device else ""
    return plotting.speed_figure(cases, baseline=_baseline(cases),
                                 title=f"Operator speed{where} ({path.name})")


def _baseline(cases) -> str:
    ops = {op for c in cases.values() for op in c}
    for cand in ("conv2d", "F.conv2d", "torch.conv2d"):
        if cand in ops:
            return cand
    return sorted(ops)[0]


# ---------------------------------------------------------------- driver

def _builders():
    from erftool import cli_utils_paper as paper
    return {
        "erf_comparison": lambda ctx: paper.figure_comparison(ctx["seed"]),
        "kernel_sampling": lambda ctx: paper.figure_sampling(ctx["seed"]),
        "erf_vs_scale": lambda ctx: paper.figure_scaling(ctx["seed"]),
        "erf_growth": lambda ctx: figure_growth(ctx["seed"]),
        "op_speed": lambda ctx: figure_speed(ctx["bench_json"]),
    }


def run_figures(*, out, fmt, only, bench_json, seed, console: Console) -> list[Path]:
    builders = _builders()
    ctx = {"seed": seed, "bench_json": bench_json}
    written = []
    with staged_output(out) as tmp:
        with console.progress(list(only), "figures") as bar:
            for name in bar:
                fig = builders[name](ctx)
                plotting.save(fig, tmp / name, fmt)
                written.append(Path(out) / f"{name}.{fmt}")
    return written


def run_bench(args: list[str]) -> int:
    if not BENCH_SCRIPT.exists():
        raise FileNotFoundError(2, "No benchmark script", str(BENCH_SCRIPT))
    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *args], cwd=str(REPO))
