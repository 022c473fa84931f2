"""The benchmark scripts. bench_ops.py: a quick run writes its results and runs
under the allocator setting it records (the steady setting re-runs the script
with glibc's tunables set, which glibc reads only at start-up), and its summary
bounds the native/reference speed-up. bench_host.py: a quick run writes every
op. bench_gpu.py: its table and training step, on CPU.
bench_global_kernels.py: a row per shape and layout, each pass against the copy."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erftool.ops import _native

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ops.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("bench_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STEADY = _script_module().STEADY_MALLOC


@pytest.mark.skipif(_native.load_native() is None, reason="native module unavailable")
@pytest.mark.parametrize("allocator", ["steady", "system"])
def test_quick_run_records_its_allocator(tmp_path, allocator):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in STEADY}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--warmup", "0",
         "--no-reference", "--allocator", allocator, "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["allocator"] == allocator
    expected = STEADY if allocator == "steady" else {k: None for k in STEADY}
    assert data["meta"]["malloc_env"] == expected
    assert data["meta"]["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    ops = {(r["op"], r["backend"]) for r in data["rows"]}
    assert {("conv3x3", "onednn"), ("dk_s4", "native"), ("dc", "native")} <= ops


def test_process_medians_take_each_field_over_the_processes():
    bench = _script_module()
    runs = [[{"shape": "s", "op": "dk_s4", "fwd_ms": t, "paired_ratio_fwdbwd": r}]
            for t, r in ((10.0, 3.2), (30.0, 2.8), (20.0, 2.9))]
    runs[1][0]["fwdbwd_error"] = "x"
    (row,) = bench.median_rows(runs)
    assert (row["shape"], row["op"], row["fwd_ms"], row["paired_ratio_fwdbwd"]) == (
        "s", "dk_s4", 20.0, 2.9)
    assert bench._without_option(["--quick", "--json", "a", "--json=b", "-x"], "--json") == [
        "--quick", "-x"]


def test_reference_ops_are_timed_after_a_warm_up_call(monkeypatch, capsys):
    """A cold first call of the reference would inflate the native/reference
    speed-up: it is untimed by default (--ref-warmup 1)."""
    bench = _script_module()
    calls = []

    def fake_measure(ops, name, p, backend, repeats, warmup, anchors=None):
        calls.append((name, backend, repeats, warmup))
        return {"fwd_ms": 1.0, "fwd_min_ms": 1.0, "fwdbwd_ms": 2.0, "fwdbwd_min_ms": 2.0}

    monkeypatch.setattr(bench, "measure", fake_measure)
    for argv, ref_warmup in ((["--quick", "--ref-repeats", "2"], 1),
                             (["--quick", "--ref-repeats", "2", "--ref-warmup", "0"], 0)):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["bench_ops.py", *argv, "--allocator", "system"])
        bench.main()
        refs = [c for c in calls if c[1] == "reference"]
        assert refs and all(c[2:] == (2, ref_warmup) for c in refs), refs
        assert all(c[3] == 1 for c in calls if c[1] != "reference")
    capsys.readouterr()


def test_the_ceiling_is_the_reference_over_its_products_at_the_gemm_rate(monkeypatch, capsys):
    """Beside each native/reference speed-up the summary prints the most any
    column-form op could reach: the reference's time over its three products'
    FLOPs at the best torch.mm rate."""
    bench = _script_module()
    assert 0 < bench.gemm_gflops(64, 2) < 1e5
    # 56x56_c64, scope 4: 3 products of 8*56*56 x 64 x 64*16 multiply-adds
    gflop = 3 * 2 * 8 * 56 * 56 * 64 * 64 * 16 / 1e9
    assert bench.product_gflop_fwdbwd("dk_s4", 8, 64, 64, 56, 1) == pytest.approx(gflop)
    assert bench.product_gflop_fwdbwd("dc", 8, 64, 64, 56, 1) == pytest.approx(gflop * 9 / 16)
    assert bench.product_gflop_fwdbwd("dc", 8, 256, 256, 56, 256) == pytest.approx(
        3 * 2 * 8 * 56 * 56 * 256 * 9 / 1e9)

    def fake_measure(ops, name, p, backend, repeats, warmup, anchors=None):
        ms = 200 * gflop if backend == "reference" else 2.0  # 20x its products at 100 GFLOP/s
        return {"fwd_ms": 1.0, "fwd_min_ms": 1.0, "fwdbwd_ms": ms, "fwdbwd_min_ms": ms}

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "gemm_gflops", lambda size, repeats: 100.0)
    monkeypatch.setattr(sys, "argv", ["bench_ops.py", "--quick", "--allocator", "system"])
    bench.main()
    out = capsys.readouterr().out
    assert f"dk_s4    ceiling  20.0x (its products alone, {gflop:.1f} GFLOP at 100 GFLOP/s)" \
        in out
    assert "dc       ceiling  35.6x" in out  # 9 cells: 16/9 of dk_s4's


@pytest.mark.skipif(_native.load_native() is None, reason="native module unavailable")
def test_run_in_two_processes_writes_their_medians(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--warmup", "0",
         "--no-reference", "--processes", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("process ") == 2 and "median over 2 processes" in res.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["processes"] == 2
    assert {r["op"] for r in data["rows"]} >= {"conv3x3", "dk_s4", "dc"}


@pytest.mark.skipif(_native.load_native() is None, reason="native module unavailable")
def test_host_overhead_benchmark_writes_every_op(tmp_path):
    script = SCRIPT.with_name("bench_host.py")
    out = tmp_path / "host.json"
    res = subprocess.run([sys.executable, str(script), "--repeats", "1", "--calls", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"conv2d", "local_dk", "global_dk", "dk_dc", "dc"}
    assert rows["conv2d"]["fwd_ratio"] == 1.0
    assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows.values())
    assert not list(tmp_path.glob("*.partial"))


def _gpu_script():
    spec = importlib.util.spec_from_file_location(
        "bench_gpu", SCRIPT.with_name("bench_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_table_and_training_step_without_a_gpu():
    # bench_gpu.py runs only where a GPU is lent: its table and its
    # forward+backward step are checked here on CPU tensors.
    bench = _gpu_script()
    x = torch.randn(2, 3, requires_grad=True)
    leaves = {"x": x, "index": torch.arange(2)}
    step = bench.training_step(lambda t: t["x"] * 2, leaves, ("x",), torch.ones(2, 3))
    step()  # runs, and clears the gradient it made
    env = dict(device="D", capability=[9, 0], torch="t", cuda="c", cudnn=1, tf32_matmul=False,
               tf32_cudnn=False, cudnn_benchmark=True, chunk_mb="256", reps=3, warmup=1,
               timing="queued")
    entry = dict(fwd=2.0, fwd_device=1.5, fwd_bwd=6.0, fwd_bwd_device=5.0)
    rows = [dict(shape="s", dtype="float32", ms={"conv2d": entry, "local_dk": entry,
                                                  "dc": {"error": "boom"}},
                 ratio_to_conv2d={"conv2d": {"fwd": 1.0, "fwd_bwd": 1.0},
                                  "local_dk": {"fwd": 3.0, "fwd_bwd": 2.0}})]
    table = bench.markdown(env, rows)
    assert "| s | float32 | local_dk | 2.000 | 1.500 | 6.000 | 5.000 | 3.00x | 2.00x |" in table
    assert "| s | float32 | dc | error: boom | | | | | |" in table
    assert "- local_dk s float32: 3.00x (target <= 2.5x): MISSED" in table


def test_global_kernels_bench_prints_every_shape_and_layout():
    assert _native.load_native() is not None, _native.native_error()
    script = SCRIPT.parent / "bench_global_kernels.py"
    res = subprocess.run([sys.executable, str(script), "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "copy" in line and "MB" in line]
    assert len(rows) == 10, res.stdout
    for line in rows:
        for name in ("forward", "backward", "weight grad", "offset grad"):
            assert f"{name} " in line and "x)" in line, line
