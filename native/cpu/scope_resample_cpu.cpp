// CPU kernels of erftool_native::scope_resample / scope_resample_backward:
// the global Deformable Kernel's per-image kernels. Each row is one bilinear
// sample of the scope, a weighted sum of (at most) four scope cells:
//
//   out[b, m] = sum_i corner_weight[b, i] * weight[m, corner_index[b, i]]
//
// with weight the scope weight as (M, S), M = C_out*C_in/groups, S = S_h*S_w.
// The dense equivalent, a (B, S) @ (S, M) product, does S/4 times the
// multiply-adds and, with few rows and a short inner dimension, runs far
// below GEMM speed (MKL: 3.9-11 ms for 72 x 16 x 65536 in fp32 on 2 EPYC
// cores, against 1.3-3.0 ms here). Both passes go by blocks of m: a block of the
// weight is transposed into a cell-major scratch (each cell one contiguous
// row, S x block, in L1/L2) and every sample row is served from it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "deform_cpu_kernels.h"  // corner_sum, axpy
#include "isa_dispatch.h"
#include "layout_cpu.h"

namespace erftool {
namespace cpu {
namespace {

constexpr int kCorners = 4;
// Blocks of m (columns of the output): the parallel work units. Fixed, not
// per thread, so that the dot products of the backward are summed in the same
// order whatever the thread count. The backward reads 72 gradient rows per
// block (8 images of 9 taps): 2048 columns, 8 KB runs of each row, took
// 3.0-3.9 ms against 3.7-4.3 ms with 512 (72 x 65536, fp32, alternating
// builds); the forward kept 512 (1.0-1.1 ms, 1.0-1.4 ms with 2048).
constexpr int64_t kBlock = 512;
constexpr int64_t kBackwardBlock = 2048;

// Per-thread scratch, allocated by the calling thread: buffers malloc'ed and
// freed inside the worker threads come from per-thread arenas, which the
// allocator trims and page-faults back in on every call.
template <typename T>
T* scratch_space(int64_t per_thread) {
  thread_local std::vector<T> space;
  const size_t needed = static_cast<size_t>(per_thread * at::get_num_threads());
  if (space.size() < needed) space.resize(needed);
  return space.data();
}

// Rows [m0, m0 + width) of weight (M, cells) into scratch, cell-major (cells, ld).
template <typename T>
void to_cells(const T* weight, int64_t cells, int64_t m0, int64_t width, T* scratch,
              int64_t ld) {
  transpose_block(weight + m0 * cells, cells, scratch, ld, 0, width, 0, cells);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ERFTOOL_HAVE_STREAM_STORES 1
// The kernels (19 MB for 8 images of 256 -> 256 channels) are read back only
// after the whole pass, by the batched products: streaming stores write them
// without first reading every line into the cache. Whole aligned vectors only.
inline bool stream_stores_ok(const float* dst, int64_t width) {
  static const bool avx = __builtin_cpu_supports("avx");
  return avx && reinterpret_cast<uintptr_t>(dst) % 32 == 0 && width % 8 == 0;
}

__attribute__((target("avx"))) inline void corner_sum_stream(
    const float* r0, const float* r1, const float* r2, const float* r3, float w0, float w1,
    float w2, float w3, float* dst, int64_t width) {
  const __m256 c0 = _mm256_set1_ps(w0), c1 = _mm256_set1_ps(w1);
  const __m256 c2 = _mm256_set1_ps(w2), c3 = _mm256_set1_ps(w3);
  for (int64_t j = 0; j < width; j += 8) {
    __m256 v = _mm256_mul_ps(c0, _mm256_loadu_ps(r0 + j));
    v = _mm256_add_ps(v, _mm256_mul_ps(c1, _mm256_loadu_ps(r1 + j)));
    v = _mm256_add_ps(v, _mm256_mul_ps(c2, _mm256_loadu_ps(r2 + j)));
    v = _mm256_add_ps(v, _mm256_mul_ps(c3, _mm256_loadu_ps(r3 + j)));
    _mm256_stream_ps(dst + j, v);
  }
}
#endif

template <typename T>
void resample_rows(const T* weight, const int64_t* index, const T* corner_weight, T* out,
                   int64_t rows, int64_t m, int64_t cells) {
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  T* const scratch_base = scratch_space<T>(cells * kBlock);
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    T* const scratch = scratch_base + at::get_thread_num() * cells * kBlock;
    for (int64_t block = lo; block < hi; ++block) {
      const int64_t m0 = block * kBlock, width = std::min(m, m0 + kBlock) - m0;
      to_cells(weight, cells, m0, width, scratch, kBlock);
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t* ix = index + b * kCorners;
        const T* wt = corner_weight + b * kCorners;
        const T *r0 = scratch + ix[0] * kBlock, *r1 = scratch + ix[1] * kBlock;
        const T *r2 = scratch + ix[2] * kBlock, *r3 = scratch + ix[3] * kBlock;
        const T w0 = wt[0], w1 = wt[1], w2 = wt[2], w3 = wt[3];
        T* dst = out + b * m + m0;
#ifdef ERFTOOL_HAVE_STREAM_STORES
        if constexpr (std::is_same_v<T, float>) {
          if (stream_stores_ok(dst, width)) {
            corner_sum_stream(r0, r1, r2, r3, w0, w1, w2, w3, dst, width);
            continue;
          }
        }
#endif
        corner_sum<false>(width, T(1), CornerRows<T>{{r0, r1, r2, r3}, {w0, w1, w2, w3}}, dst);
      }
    }
#ifdef ERFTOOL_HAVE_STREAM_STORES
    _mm_sfence();  // the streamed rows are visible before the caller reads them
#endif
  });
}

// A row's four corners over its gradient g: the dot products with the corner
// cells' weight (into dots) and the weighted gradient added into the corner
// cells' sums, where wanted. The four dot products share one pass over g as
// independent sums (a single-sum loop per corner waited on its adds); the
// adds stay one loop per corner, since two corners may name the same cell
// (a clamped zero-weight corner).
template <typename T>
ERFTOOL_ALWAYS_INLINE void corners_backward(int64_t width, const T* __restrict g,
                                            const T* const v[4], T* const s[4], const T* cw,
                                            T* dots) {
  const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  if (v0 != nullptr) {
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t j = 0; j < width; ++j) {
      d0 += g[j] * v0[j], d1 += g[j] * v1[j];
      d2 += g[j] * v2[j], d3 += g[j] * v3[j];
    }
    dots[0] = d0, dots[1] = d1, dots[2] = d2, dots[3] = d3;
  }
  if (s[0] != nullptr)
    for (int i = 0; i < kCorners; ++i) axpy(width, cw[i], g, s[i]);
}

// Every row's corners over one block of m (columns [m0, m0 + width)):
// values / sums are the block's cell-major weight and weight-gradient
// scratch (null when not wanted), dots the block's partial dot products.
template <typename T>
ERFTOOL_ALWAYS_INLINE void block_backward(const T* grad, const int64_t* index,
                                          const T* corner_weight, const T* values, T* sums,
                                          T* dots, int64_t rows, int64_t m, int64_t m0,
                                          int64_t width) {
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t* ix = index + b * kCorners;
    const T* v[kCorners];
    T* s[kCorners];
    for (int i = 0; i < kCorners; ++i) {
      v[i] = values != nullptr ? values + ix[i] * kBackwardBlock : nullptr;
      s[i] = sums != nullptr ? sums + ix[i] * kBackwardBlock : nullptr;
    }
    corners_backward(width, grad + b * m + m0, v, s, corner_weight + b * kCorners,
                     dots != nullptr ? dots + b * kCorners : nullptr);
  }
}

ERFTOOL_ISA_VARIANTS(block_backward)

// One pass over grad (rows, m) by blocks of m: each block owns its rows of
// grad_weight (no two threads write one value), accumulated cell-major in
// scratch and added back once, and writes its partial dot products to
// partial[block]; the caller sums the blocks in order.
template <typename T>
void resample_rows_backward(const T* grad, const T* weight, const int64_t* index,
                            const T* corner_weight, T* grad_weight, T* partial, int64_t rows,
                            int64_t m, int64_t cells) {
  const int64_t blocks = (m + kBackwardBlock - 1) / kBackwardBlock;
  T* const scratch_base = scratch_space<T>(2 * cells * kBackwardBlock);
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    T* const values = scratch_base + at::get_thread_num() * 2 * cells * kBackwardBlock;
    T* const sums = values + cells * kBackwardBlock;
    for (int64_t block = lo; block < hi; ++block) {
      const int64_t m0 = block * kBackwardBlock, width = std::min(m, m0 + kBackwardBlock) - m0;
      if (partial != nullptr) to_cells(weight, cells, m0, width, values, kBackwardBlock);
      if (grad_weight != nullptr) std::fill(sums, sums + cells * kBackwardBlock, T(0));
      block_backward_isa<T>(grad, index, corner_weight,
                            partial != nullptr ? static_cast<const T*>(values) : nullptr,
                            grad_weight != nullptr ? sums : nullptr,
                            partial != nullptr ? partial + block * rows * kCorners : nullptr,
                            rows, m, m0, width);
      if (grad_weight != nullptr) {  // back to (M, cells), through `values`
        transpose_block(sums, kBackwardBlock, values, cells, 0, cells, 0, width);
        T* dst = grad_weight + m0 * cells;
        for (int64_t j = 0; j < width * cells; ++j) dst[j] += values[j];
      }
    }
  });
}

void check_arguments(const at::Tensor& weight, const at::Tensor& index,
                     const at::Tensor& corner_weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(),
              "scope_resample: weight must be a contiguous (M, S) tensor");
  TORCH_CHECK(index.dim() == 2 && index.size(1) == kCorners && index.is_contiguous() &&
                  index.scalar_type() == at::kLong,
              "scope_resample: corner_index must be a contiguous (B, 4) int64 tensor");
  TORCH_CHECK(corner_weight.sizes() == index.sizes() && corner_weight.is_contiguous() &&
                  corner_weight.scalar_type() == weight.scalar_type(),
              "scope_resample: corner_weight must be a contiguous (B, 4) tensor of weight's "
              "dtype");
  if (index.numel() > 0)  // never read outside the scope
    TORCH_CHECK(index.min().item<int64_t>() >= 0 &&
                    index.max().item<int64_t>() < weight.size(1),
                "scope_resample: corner_index out of range [0, ", weight.size(1), ")");
}

// Writes into out, (B, M), allocated by the caller (see the backward's note).
void scope_resample_cpu(const at::Tensor& weight, const at::Tensor& index,
                        const at::Tensor& corner_weight, const at::Tensor& out) {
  check_arguments(weight, index, corner_weight);
  const int64_t rows = index.size(0), m = weight.size(0), cells = weight.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == m && out.is_contiguous() &&
                  out.scalar_type() == weight.scalar_type(),
              "scope_resample: out must be a contiguous (B, M) tensor of weight's dtype");
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "scope_resample_cpu", [&] {
    resample_rows<scalar_t>(weight.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                            corner_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                            m, cells);
  });
}

// Adds the weight gradient into grad_weight (an (M, S) tensor, or an empty one
// when not needed: the caller owns the buffer, allocated before the large
// per-image kernels, so that freeing those never leaves it on top of a heap
// the allocator then trims and page-faults back in on the next call) and
// returns the corner-weight gradient (undefined when not needed).
at::Tensor scope_resample_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                       const at::Tensor& index, const at::Tensor& corner_weight,
                                       const at::Tensor& grad_weight, bool need_corner_weight) {
  check_arguments(weight, index, corner_weight);
  const int64_t rows = index.size(0), m = weight.size(0), cells = weight.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == m &&
                  grad.is_contiguous() && grad.scalar_type() == weight.scalar_type(),
              "scope_resample_backward: grad must be a contiguous (B, M) tensor of weight's "
              "dtype");
  const bool need_weight = grad_weight.numel() > 0;
  TORCH_CHECK(!need_weight || (grad_weight.sizes() == weight.sizes() &&
                               grad_weight.is_contiguous() &&
                               grad_weight.scalar_type() == weight.scalar_type()),
              "scope_resample_backward: grad_weight must be empty or a contiguous tensor "
              "like weight");
  at::Tensor grad_corner_weight, partial;
  if (need_corner_weight) {
    grad_corner_weight = at::zeros_like(corner_weight);
    partial = at::empty({(m + kBackwardBlock - 1) / kBackwardBlock, rows, kCorners},
                        weight.options());
  }
  if (rows == 0 || m == 0 || !(need_weight || need_corner_weight)) return grad_corner_weight;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "scope_resample_backward_cpu", [&] {
    resample_rows_backward<scalar_t>(
        grad.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
        corner_weight.data_ptr<scalar_t>(),
        need_weight ? grad_weight.data_ptr<scalar_t>() : nullptr,
        need_corner_weight ? partial.data_ptr<scalar_t>() : nullptr, rows, m, cells);
    if (need_corner_weight) {  // blocks summed in order, whatever the thread count
      const scalar_t* part = partial.data_ptr<scalar_t>();
      scalar_t* sum = grad_corner_weight.data_ptr<scalar_t>();
      for (int64_t block = 0; block < partial.size(0); ++block)
        for (int64_t k = 0; k < rows * kCorners; ++k) sum[k] += part[block * rows * kCorners + k];
    }
  });
  return grad_corner_weight;
}

}  // namespace
}  // namespace cpu
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CPU, m) {
  m.impl("scope_resample", &erftool::cpu::scope_resample_cpu);
  m.impl("scope_resample_backward", &erftool::cpu::scope_resample_backward_cpu);
}
