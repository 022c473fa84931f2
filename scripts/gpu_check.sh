#!/usr/bin/env bash
# One-shot GPU check of erftool's CUDA kernels, for a machine with a CUDA
# build of torch, nvcc and ninja (no network needed):
#   1. (COMPILE_CHECK=1 only) nvcc compile check of native/cuda/*.cu (sm_80 + sm_90);
#   2. builds the native extension with its CUDA kernels (erftool/ops/_native.py);
#   3. runs tests/test_ops_cuda.py (CUDA vs reference / CPU, half types, gradcheck);
#   4. runs benchmarks/bench_gpu.py (local DK, global DK, DC, DK+DC vs cuDNN conv2d;
#      with --global-forms, --column-paths and --profile), then three float32 diagnostics
#      appended to bench.log: --timing synced, ERFTOOL_CHUNK_MB=1024 (one chunk of columns)
#      and ERFTOOL_CHUNK_MB=32 (chunks that stay in the H100's 50 MB L2 cache); then
#      benchmarks/bench_global_kernels.py --device cuda (the global DK's kernel pair).
# Everything is written under $OUT (default ./gpu-results), at most 8 files:
#   summary.txt env.txt compile.log build.log tests.log bench.log bench_gpu.json bench_gpu.md
# Exit status: 0 when the build and the tests passed (benchmark problems are
# reported in summary.txt but do not fail the check), 1 otherwise.
#
# Usage: scripts/gpu_check.sh [--quick]     (--quick: shorter benchmark)
# Env:   PYTHON (default python3), OUT, BENCH_ARGS (extra bench_gpu.py arguments),
#        PYTEST_ARGS (extra pytest arguments), SKIP_BENCH=1, SKIP_TESTS=1,
#        COMPILE_CHECK=1, SKIP_DIAGNOSTICS=1,
#        TEST_TIMEOUT / BENCH_TIMEOUT (seconds, default 240 / 180),
#        BUDGET (seconds for the whole script, default 420: a lent GPU has 15 minutes
#        of device time in all, its start included; each step's timeout is cut to
#        what is left, and a step with under 20 s left is skipped and says so).
# On an H100 it took 95-160 s (build 32-41 s, tests 35-53 s, benchmark 12-20 s), before the
# column-path rows, the forward+backward profiles and the 32 MB diagnostic were added.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
out="${OUT:-$repo/gpu-results}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
quick=""
if [[ "${1:-}" == "--quick" ]]; then quick="--quick"; fi

# Make the interpreter's own bin (ninja from pip, ...) and CUDA visible.
pybin="$(dirname "$(command -v "$python")")"
export PATH="$pybin:$PATH:/usr/local/cuda/bin"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A private build cache inside the output's sibling, so that nothing stale is reused.
export ERFTOOL_BUILD_DIR="${ERFTOOL_BUILD_DIR:-$repo/build/erftool-native}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export ERFTOOL_BUILD_VERBOSE="${ERFTOOL_BUILD_VERBOSE:-1}"

summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
status=0
started=$(date +%s)

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u)"
  echo "host: $(uname -a)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader
  echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "ninja: $(command -v ninja) $(ninja --version 2>/dev/null)"
  "$python" - <<'EOF'
import platform, torch
print("python", platform.python_version(), platform.python_implementation())
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
from torch.utils.cpp_extension import CUDA_HOME
print("CUDA_HOME", CUDA_HOME)
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "FAIL: torch sees no CUDA device; nothing to check"
  exit 1
fi
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
  export TORCH_CUDA_ARCH_LIST
fi
note "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST  build dir: $ERFTOOL_BUILD_DIR"

# ---------------------------------------------------------------- 1. nvcc check
if [[ -n "${COMPILE_CHECK:-}" ]]; then
  if bash native/cuda/check_compile.sh >"$out/compile.log" 2>&1; then
    note "PASS: nvcc compile check (native/cuda/check_compile.sh)"
  else
    note "FAIL: nvcc compile check, see compile.log"
    tail -n 30 "$out/compile.log"
    status=1
  fi
fi
with_timeout() {  # with_timeout SECONDS command...
  local limit="$1"
  shift
  if command -v timeout >/dev/null; then timeout "$limit" "$@"; else "$@"; fi
}
budget="${BUDGET:-420}"
# limit_for DEFAULT: a step's timeout, DEFAULT cut to what is left of the budget
limit_for() {
  local left=$(( budget - ($(date +%s) - started) ))
  echo $(( left < $1 ? (left > 0 ? left : 0) : $1 ))
}
# fits LIMIT NAME: whether a step with this limit is worth starting (else says so)
fits() {
  if (( $1 >= 20 )); then return 0; fi
  note "SKIPPED: $2 (budget of ${budget} s spent)"
  return 1
}

# ---------------------------------------------------------------- 2. build
t0=$(date +%s)
"$python" - >"$out/build.log" 2>&1 <<'EOF'
import sys, traceback
try:
    from erftool.ops import _native
    module = _native.load_native()
    print("module:", module)
    print("error:", _native.native_error())
    print("build dir:", _native.build_dir())
    if module is None:
        sys.exit(1)
    print("has_cuda_kernels:", module.has_cuda_kernels())
    print("has_openmp:", module.has_openmp())
    import torch
    x = torch.randn(1, 2, 5, 5, device="cuda")
    w = torch.randn(3, 2, 4, 4, device="cuda")
    out = torch.ops.erftool_native.deform_forward(
        x, w, None, None, None, [3, 3], [1, 1], [1, 1], [1, 1], 1, 1, 1, 1 << 20)
    torch.cuda.synchronize()
    print("smoke forward:", tuple(out.shape), float(out.abs().sum()))
    sys.exit(0 if module.has_cuda_kernels() else 2)
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.exit(3)
EOF
build_rc=$?
note "build: $(( $(date +%s) - t0 )) s"
if [[ $build_rc -eq 0 ]]; then
  note "PASS: native extension built with CUDA kernels; smoke forward ran"
else
  note "FAIL: native build / smoke test (rc=$build_rc), see build.log"
  tail -n 40 "$out/build.log"
  status=1
fi

# ---------------------------------------------------------------- 3. tests
if [[ -z "${SKIP_TESTS:-}" ]]; then
  limit=$(limit_for "${TEST_TIMEOUT:-240}")
  if fits "$limit" tests/test_ops_cuda.py; then
    t0=$(date +%s)
    # shellcheck disable=SC2086
    with_timeout "$limit" "$python" -m pytest -q -rfEs -p no:cacheprovider \
      tests/test_ops_cuda.py ${PYTEST_ARGS:-} >"$out/tests.log" 2>&1
    test_rc=$?
    note "tests: $(( $(date +%s) - t0 )) s; $(tail -n 1 "$out/tests.log")"
    if [[ $test_rc -eq 0 ]]; then
      note "PASS: tests/test_ops_cuda.py"
    else
      note "FAIL: tests/test_ops_cuda.py (rc=$test_rc), see tests.log"
      grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 40 | tee -a "$summary"
      status=1
    fi
  else
    status=1  # untested is not a pass
  fi
fi

# ---------------------------------------------------------------- 4. benchmarks
limit=$(limit_for "${BENCH_TIMEOUT:-180}")
if [[ -z "${SKIP_BENCH:-}" && $build_rc -eq 0 ]] && fits "$limit" benchmarks/bench_gpu.py; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  with_timeout "$limit" "$python" benchmarks/bench_gpu.py --out "$out" $quick \
    --global-forms --column-paths --profile ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
  bench_rc=$?
  note "bench: $(( $(date +%s) - t0 )) s (rc=$bench_rc)"
  if [[ -f "$out/bench_gpu.md" ]]; then
    sed -n '/^## Targets/,$p' "$out/bench_gpu.md" | tee -a "$summary"
  else
    note "bench: no results, see bench.log"
    tail -n 30 "$out/bench.log"
  fi
  if [[ -z "${SKIP_DIAGNOSTICS:-}" ]]; then
    scratch="$(mktemp -d)"
    diagnostic() {  # diagnostic LABEL COMMAND...: its float32 table appended to bench.log
      local limit
      limit=$(limit_for 90)
      fits "$limit" "diagnostic $1" || return 0
      echo "=== diagnostic: $1" >>"$out/bench.log"
      shift
      with_timeout "$limit" "$@" --dtypes float32 --out "$scratch" >/dev/null 2>&1
      cat "$scratch/bench_gpu.md" >>"$out/bench.log" 2>/dev/null
      rm -f "$scratch/bench_gpu.md" "$scratch/bench_gpu.json"
    }
    # shellcheck disable=SC2086
    diagnostic "--timing synced" "$python" benchmarks/bench_gpu.py $quick --timing synced
    # shellcheck disable=SC2086
    diagnostic chunk1024 env ERFTOOL_CHUNK_MB=1024 "$python" benchmarks/bench_gpu.py $quick
    # shellcheck disable=SC2086
    diagnostic chunk32 env ERFTOOL_CHUNK_MB=32 "$python" benchmarks/bench_gpu.py $quick
    rmdir "$scratch"
    limit=$(limit_for 60)
    if fits "$limit" "diagnostic global_kernels pair"; then
      echo "=== diagnostic: global_kernels pair (benchmarks/bench_global_kernels.py)" \
        >>"$out/bench.log"
      with_timeout "$limit" "$python" benchmarks/bench_global_kernels.py --device cuda \
        >>"$out/bench.log" 2>&1
    fi
    note "diagnostics (synced timing, 1 GB and 32 MB chunks, global_kernels pair):" \
      "appended to bench.log"
  fi
fi

note "total: $(( $(date +%s) - started )) s; status: $([[ $status -eq 0 ]] && echo PASS || echo FAIL)"
exit $status
