// Host launchers of erftool's CUDA kernels (column form of the unified
// deform op: DK, DC and DK+DC).
//
// Plain pointers, sizes and a cudaStream_t only: no torch headers, so that
// native/cuda/deform_kernels.cu compiles with `nvcc -c` against the CUDA
// runtime alone (native/cuda/check_compile.sh). The torch glue lives in
// native/cuda/deform_cuda.cpp.
//
// Every tensor is dense row-major (NCHW) and every pointer already points at
// the first image of the chunk being processed. Launchers return the CUDA
// error of the launch (cudaSuccess when fine); they never synchronise.
//
// Column buffer layout (forward `columns` and backward `grad_columns`):
//   buf[(c * S2 + s) * cols + col],   col = n_local * Ho * Wo + y * Wo + x,
// i.e. (C_in * S_h * S_w) rows by (nb * Ho * Wo) columns; the rows of weight
// group gw are the contiguous block [gw * C_in/groups * S2, (gw+1) * ...).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <erftool/deform_math.h>

namespace erftool {
namespace cuda {

// Accumulation type: float for float / __half / __nv_bfloat16, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

struct DeformShape {
  int64_t nb = 0;  // images in this chunk
  int64_t C = 0;   // input channels
  int64_t H = 0, W = 0;
  int64_t Ho = 0, Wo = 0;
  int kh = 1, kw = 1;            // sampled kernel
  int scope_h = 1, scope_w = 1;  // scope (the weight's spatial shape)
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
  int dil_h = 1, dil_w = 1;
  // Kernel-offset groups (1 when kernel_offset is null) and data-offset
  // groups (1 when both data_offset and mask are null).
  int G = 1, DG = 1;
};

inline int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Channel segments of the fused backward pass: C_in is cut into
// lcm(G, DG) contiguous segments, each inside one kernel-offset group and one
// data-offset group (both G and DG divide C_in, so their lcm does too). The
// per-segment partial sums of the offset / mask gradients are then summed per
// group by launch_reduce_segments (deterministic, no atomics).
inline int64_t num_segments(int64_t G, int64_t DG) { return G / gcd64(G, DG) * DG; }

// The kernels keep per-(position, tap) coefficients of a 32-position tile in
// shared memory (44 bytes per tap in fp32, 64 in fp64), opting in to more than
// 48 KiB when needed. A launcher returns cudaErrorInvalidValue when K_h * K_w
// is too large for the device (about 150 taps in fp32 on sm_80 / sm_90), or
// when a size does not fit the kernels' index types (H * W >= 2^31,
// S_h * S_w >= 2^15, grid too large).

// (a) Column build: columns[c*S2+s, col] = sum_k coef[g(c), col, k, s] * X[c, col, k]
// with X the (masked, possibly deformed) input tap. Fully overwrites `columns`.
template <typename scalar_t>
cudaError_t launch_build_columns(const DeformShape& shape, const scalar_t* input,
                                 const scalar_t* kernel_offset, const scalar_t* data_offset,
                                 const scalar_t* mask, scalar_t* columns, cudaStream_t stream);

// (a') Depthwise layers (C_in/groups = 1, C_out = multiplier * C_in): the
// forward without columns, out[n, o] = sum_k X[c, k] * W~[o, k] with
// c = o / multiplier, written straight into out (nb, C_out, Ho, Wo); bias not
// added. Same coefficients, offsets and mask conventions as the column build.
template <typename scalar_t>
cudaError_t launch_depthwise_forward(const DeformShape& shape, int64_t multiplier,
                                     const scalar_t* input, const scalar_t* weight,
                                     const scalar_t* kernel_offset, const scalar_t* data_offset,
                                     const scalar_t* mask, scalar_t* out, cudaStream_t stream);

// Channel segments V of the fused backward pass for this shape: a multiple of
// num_segments(G, DG) that divides C_in, larger than it only when the grid
// would otherwise leave multiprocessors idle (few positions, many channels).
int64_t fused_backward_segments(const DeformShape& shape);

// (b1) Fused backward pass over grad_columns = W^T grad_out. `segments` (V)
// cuts C_in into V contiguous segments (V from fused_backward_segments, or
// any multiple of num_segments(G, DG) dividing C_in). For every segment it
// writes, when the pointer is not null:
//   part_kernel_offset (nb, V*2*K, Ho, Wo): d/d(kernel offsets), summed over the segment;
//   part_data_offset   (nb, V*2*K, Ho, Wo): d/d(data offsets);
//   part_mask          (nb, V*K,   Ho, Wo): d/d(mask);
// launch_reduce_segments (U = V) then sums the segments of each group.
// and, only when data_offset is not null, scatters d/d(input) into
// grad_input_acc (nb, C, H, W), which must be zeroed first, with atomicAdd in
// acc_t (fp32 for float / half / bf16, fp64 for double: never half-precision
// atomics; the summation order, hence the last bits, is not deterministic).
// With a rigid data grid use launch_grad_input_rigid instead.
template <typename scalar_t>
cudaError_t launch_backward_fused(const DeformShape& shape, int64_t segments,
                                  const scalar_t* grad_columns, const scalar_t* input, const scalar_t* kernel_offset,
                                  const scalar_t* data_offset, const scalar_t* mask,
                                  acc_t<scalar_t>* part_kernel_offset,
                                  acc_t<scalar_t>* part_data_offset, acc_t<scalar_t>* part_mask,
                                  acc_t<scalar_t>* grad_input_acc, cudaStream_t stream);

// (b2) Rigid data grid: gather-form grad_input (one thread per input element
// looping over the taps that read it; deterministic, no atomics). Fully
// overwrites grad_input (nb, C, H, W).
template <typename scalar_t>
cudaError_t launch_grad_input_rigid(const DeformShape& shape, const scalar_t* grad_columns,
                                    const scalar_t* kernel_offset, const scalar_t* mask,
                                    scalar_t* grad_input, cudaStream_t stream);

// (c1) out[n, g*J + j, p] = sum_{r < U/G} part[n, (g*(U/G) + r)*J + j, p]
// for n < nb, g < G, j < J, p < P (out has G*J channels, part U*J).
template <typename scalar_t>
cudaError_t launch_reduce_segments(int64_t nb, int64_t U, int64_t G, int64_t J, int64_t P,
                                   const acc_t<scalar_t>* part, scalar_t* out,
                                   cudaStream_t stream);

// (d) A global Deformable Kernel's per-image kernels (math::GlobalKernelShape:
// channel-major (N, C_out, C_in/groups, K) or tap-major (K, N, C_out,
// C_in/groups)), one thread per kernel entry (image, o, c); weight (C_out, C_in/groups, S_h, S_w)
// and offset (N, 2*G*K) dense.
template <typename scalar_t>
cudaError_t launch_global_kernels(const math::GlobalKernelShape& shape, bool tap_major,
                                  const scalar_t* weight, const scalar_t* offset, scalar_t* out,
                                  cudaStream_t stream);

// (d') Its gradients from grad (same layout as out): grad_weight (C_out,
// C_in/groups, S_h, S_w) and grad_offset (N, 2*G*K), each skipped when null;
// one thread per kernel entry (o, c), one block per sample.
template <typename scalar_t>
cudaError_t launch_global_kernels_backward(const math::GlobalKernelShape& shape, bool tap_major,
                                           const scalar_t* grad, const scalar_t* weight,
                                           const scalar_t* offset, scalar_t* grad_weight,
                                           scalar_t* grad_offset, cudaStream_t stream);

// (c2) dst[i] = scalar_t(src[i]) for i < n.
template <typename scalar_t>
cudaError_t launch_cast(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace erftool
