#!/usr/bin/env bash
# Compile-only check of erftool's CUDA translation units (no torch needed).
#
# Compiles every native/cuda/*.cu with `nvcc -c` for sm_80 and sm_90
# (-std=c++17, -I native/include) and exits non-zero on the first failure.
# CI runs it whenever nvcc is present. Usage (from anywhere):
#   native/cuda/check_compile.sh            # NVCC=/path/to/nvcc to override
#   ERFTOOL_CUDA_ARCHS="80 90" native/cuda/check_compile.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
  echo "check_compile.sh: nvcc not found" >&2
  exit 2
fi

archs="${ERFTOOL_CUDA_ARCHS:-80 90}"
gencode=()
for a in $archs; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
sources=("$here"/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_compile.sh: no .cu files under $here" >&2
  exit 1
fi

"$nvcc" --version | tail -n 1
status=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  echo "nvcc -c $name.cu (sm: $archs)"
  if ! "$nvcc" -c "$src" -o "$tmp/$name.o" -std=c++17 -O3 "${gencode[@]}" \
      -I "$root/native/include" -I "$here"; then
    echo "check_compile.sh: FAILED: $src" >&2
    status=1
  fi
  # The flags torch.utils.cpp_extension adds (C++20, no implicit half
  # conversions), for the last architecture only.
  last="${archs##* }"
  echo "nvcc -c $name.cu (torch-style flags, sm_$last)"
  if ! "$nvcc" -c "$src" -o "$tmp/$name.torchflags.o" -std=c++20 -O3 \
      "-gencode=arch=compute_${last},code=sm_${last}" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      --expt-relaxed-constexpr -I "$root/native/include" -I "$here"; then
    echo "check_compile.sh: FAILED (torch-style flags): $src" >&2
    status=1
  fi
done
if [[ $status -eq 0 ]]; then echo "check_compile.sh: all CUDA sources compiled"; fi
exit $status
