"""scripts/gpu_check.sh runs only where a GPU is lent, so its control flow is
checked here with a stand-in interpreter: every step runs, the benchmark and
its four diagnostics get their arguments, and everything stays within the 8
files that come back from the device machine."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"

# Answers every call the script makes: the CUDA probe and the build / test
# steps succeed; bench_gpu.py writes its two result files, naming its
# arguments and ERFTOOL_CHUNK_MB in them.
STAND_IN = """#!/usr/bin/env bash
if [[ "$*" == *bench_global_kernels.py* ]]; then
  echo "stand-in kernel pair: $*"
  exit 0
fi
if [[ "$*" == *bench_gpu.py* ]]; then
  out=""; prev=""
  for a in "$@"; do [[ "$prev" == "--out" ]] && out="$a"; prev="$a"; done
  mkdir -p "$out"
  printf '# args: %s | chunk=%s\\n## Targets\\n- stand-in\\n' "$*" "${ERFTOOL_CHUNK_MB:-default}" \\
    > "$out/bench_gpu.md"
  echo '{}' > "$out/bench_gpu.json"
  exit 0
fi
[[ -t 0 ]] || cat > /dev/null
exit 0
"""


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python3"
    path.write_text(STAND_IN)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_gpu_check_runs_every_step_within_eight_files(tmp_path, stand_in):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stand_in), "OUT": str(out),
           "ERFTOOL_BUILD_DIR": str(tmp_path / "build")}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.txt", "bench.log", "bench_gpu.md", "tests.log"} <= set(files)
    summary = (out / "summary.txt").read_text()
    for line in ("PASS: native extension built", "PASS: tests/test_ops_cuda.py",
                 "diagnostics (synced timing, 1 GB and 32 MB chunks, global_kernels pair)",
                 "status: PASS"):
        assert line in summary, summary
    main = (out / "bench_gpu.md").read_text()
    assert "--global-forms --column-paths --profile" in main and "chunk=default" in main
    log = (out / "bench.log").read_text()
    synced = log.index("=== diagnostic: --timing synced")
    chunked = log.index("=== diagnostic: chunk1024")
    assert "--timing synced --dtypes float32" in log[synced:chunked]
    small = log.index("=== diagnostic: chunk32")
    assert "chunk=1024" in log[chunked:small] and "--dtypes float32" in log[chunked:small]
    pair = log.index("=== diagnostic: global_kernels pair")
    assert "chunk=32" in log[small:pair] and "--dtypes float32" in log[small:pair]
    assert "stand-in kernel pair: benchmarks/bench_global_kernels.py --device cuda" in log[pair:]


def test_gpu_check_skips_what_its_budget_cannot_hold(tmp_path, stand_in):
    """With no budget left after the build, the tests and benchmarks are
    skipped and say so, and an untested build is not a pass."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stand_in), "OUT": str(out), "BUDGET": "0",
           "ERFTOOL_BUILD_DIR": str(tmp_path / "build")}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text()
    for line in ("PASS: native extension built", "SKIPPED: tests/test_ops_cuda.py",
                 "SKIPPED: benchmarks/bench_gpu.py", "status: FAIL"):
        assert line in summary, summary
    assert not (out / "tests.log").exists() and not (out / "bench_gpu.md").exists()
