// CPU kernels of erftool_native::global_kernels and global_kernels_backward:
// a global Deformable Kernel's per-image kernels and their scope-weight and
// offset gradients. Every value is the bilinear sample of its scope plane at
// math::global_kernel_corners, the corners the CUDA kernels
// (native/cuda/deform_kernels.cu) compute per thread; here they are computed
// once per (image, offset group, tap), and each sample is summed over a run
// of channels at once from cell-major scope rows (a per-value loop spent its
// time on index arithmetic: 10-15 ms against 2-3.5 ms for 8 images of
// 256 -> 256 channels, 2-core EPYC). The backward's weight gradient adds each
// kernel-gradient run into its corner cells' rows, its offset gradient takes
// the dot products of that run with the corner cells (times the slopes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include <erftool/deform_math.h>
#include <erftool/global_kernels_op.h>

#include "deform_cpu_kernels.h"  // corner_rows, corner_sum(_stream), axpy
#include "layout_cpu.h"          // transpose_block

namespace erftool {
namespace cpu {
namespace {

// Runs of channels of one weight group that share an offset group.
struct ChannelRun {
  int64_t c0, c1, group;
};

std::vector<std::vector<ChannelRun>> channel_runs(const math::GlobalKernelShape& shape) {
  const int64_t per_group = shape.c_out / shape.groups;
  std::vector<std::vector<ChannelRun>> runs(static_cast<size_t>(shape.groups));
  for (int64_t wg = 0; wg < shape.groups; ++wg)
    for (int64_t c = 0; c < shape.cg; ++c) {
      const int64_t g = math::global_kernel_group(shape, wg * per_group, c);
      if (runs[wg].empty() || runs[wg].back().group != g) runs[wg].push_back({c, c, g});
      runs[wg].back().c1 = c + 1;
    }
  return runs;
}

// The corners of every (image, offset group, tap), in that order: the
// offset's layout, two entries per sample.
template <typename acc, typename scalar_t>
std::vector<math::BilinearCorners<acc>> corner_table(const math::GlobalKernelShape& shape,
                                                     const scalar_t* offset) {
  const auto load_offset = [offset](int64_t i) { return static_cast<acc>(offset[i]); };
  const int64_t taps = shape.kh * shape.kw;
  std::vector<math::BilinearCorners<acc>> corners(
      static_cast<size_t>(shape.n * shape.offset_groups * taps));
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t g = 0; g < shape.offset_groups; ++g)
      for (int64_t k = 0; k < taps; ++k)
        corners[(n * shape.offset_groups + g) * taps + k] =
            math::global_kernel_corners<acc>(shape, n, g, k, load_offset);
  return corners;
}

// Output channels per task of both passes: a task turns its channels' scope
// planes cell-major once, then visits every image, so that consecutive
// channels' kernels (contiguous in both layouts) are read or written in
// turn, not one channel's kernels across every image (72 streams 2 MB
// apart for 8 images and 9 taps, which the prefetchers could not follow).
// Fixed, not per thread, so that the offset gradient's partial sums (one set
// per task, added in task order) do not depend on the thread count.
constexpr int64_t kChannelsPerTask = 8;

// Per-thread buffers of one task's channels [o0, o0 + count).
template <typename acc>
struct TaskScratch {
  int64_t plane_size;
  std::vector<acc> plane, cells, row, block;  // (cg, S), per channel (S, cg), (K, cg), (cg, K)
  explicit TaskScratch(const math::GlobalKernelShape& s)
      : plane_size(s.cg * s.scope_h * s.scope_w),
        plane(plane_size),
        cells(kChannelsPerTask * plane_size),
        row(s.cg * s.kh * s.kw),
        block(row.size()) {}

  // Channel o0 + j's scope planes, cell-major: each cell one run over c.
  template <typename scalar_t>
  void load_cells(const math::GlobalKernelShape& s, const scalar_t* weight, int64_t o0,
                  int64_t count) {
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* src = weight + (o0 + j) * plane_size;
      for (int64_t i = 0; i < plane_size; ++i) plane[i] = static_cast<acc>(src[i]);
      transpose_block(plane.data(), s.scope_h * s.scope_w, channel_cells(j), s.cg, 0, s.cg, 0,
                      s.scope_h * s.scope_w);
    }
  }
  acc* channel_cells(int64_t j) { return cells.data() + j * plane_size; }
};

// Image n's kernel row of o, (K, cg), to either layout. Channel-major, the
// (n, o) block is contiguous: transposed in `block`, then streamed out whole
// (8 x 256 -> 256 channels: 1.2-1.6 ms; element by element with plain stores
// 2.8 ms; the tap-major kernels, streamed in place, 0.65-0.9 ms).
template <typename acc, typename scalar_t>
void store_row(const math::GlobalKernelShape& shape, bool tap_major, int64_t n, int64_t o,
               const acc* row, acc* block, scalar_t* out) {
  const int64_t taps = shape.kh * shape.kw;
  if (!tap_major) {
    transpose_block(row, shape.cg, block, taps, 0, taps, 0, shape.cg);
    stream_copy(shape.cg * taps, block, out + math::global_kernel_index(shape, false, n, o, 0, 0));
    return;
  }
  for (int64_t k = 0; k < taps; ++k) {
    scalar_t* dst = out + math::global_kernel_index(shape, tap_major, n, o, 0, k);
    for (int64_t c = 0; c < shape.cg; ++c)
      dst[c] = static_cast<scalar_t>(row[k * shape.cg + c]);
  }
}

// Channels [c, ...) of image n's kernel of o at tap k, in place: tap-major
// kernels of the accumulation type are contiguous over c, so both passes work
// on them directly; null otherwise (a row buffer and store_row / load_row).
// scalar_t may be const (the backward's gradient).
template <typename acc, typename scalar_t>
auto in_place_run(const math::GlobalKernelShape& shape, bool tap_major, scalar_t* kernels,
                  int64_t n, int64_t o, int64_t c, int64_t k) {
  using Run = std::conditional_t<std::is_const_v<scalar_t>, const acc*, acc*>;
  if constexpr (std::is_same_v<acc, std::remove_const_t<scalar_t>>) {
    if (tap_major) return Run(kernels + math::global_kernel_index(shape, true, n, o, c, k));
  }
  return Run(nullptr);
}

// The inverse of store_row: channel-major blocks of the accumulation type are
// transposed whole (element by element, 4.4 ms for the backward of 8 x 256 ->
// 256 channels).
template <typename acc, typename scalar_t>
void load_row(const math::GlobalKernelShape& shape, bool tap_major, int64_t n, int64_t o,
              const scalar_t* in, acc* row) {
  const int64_t taps = shape.kh * shape.kw, step = tap_major ? 1 : taps;
  if constexpr (std::is_same_v<acc, scalar_t>) {
    if (!tap_major) {
      transpose_block(in + math::global_kernel_index(shape, false, n, o, 0, 0), taps, row,
                      shape.cg, 0, shape.cg, 0, taps);
      return;
    }
  }
  for (int64_t k = 0; k < taps; ++k) {
    const scalar_t* src = in + math::global_kernel_index(shape, tap_major, n, o, 0, k);
    for (int64_t c = 0; c < shape.cg; ++c)
      row[k * shape.cg + c] = static_cast<acc>(src[c * step]);
  }
}

template <typename scalar_t>
void fill_global_kernels(const math::GlobalKernelShape& shape, const scalar_t* weight,
                         const scalar_t* offset, bool tap_major, scalar_t* out) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t taps = shape.kh * shape.kw, cg = shape.cg;
  const auto corners = corner_table<acc>(shape, offset);
  const auto runs = channel_runs(shape);
  const std::vector<acc> zeros(static_cast<size_t>(cg), acc(0));
  const int64_t tasks = (shape.c_out + kChannelsPerTask - 1) / kChannelsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    TaskScratch<acc> scratch(shape);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = task * kChannelsPerTask;
      const int64_t count = std::min(shape.c_out, o0 + kChannelsPerTask) - o0;
      scratch.load_cells(shape, weight, o0, count);
      for (int64_t n = 0; n < shape.n; ++n)
        for (int64_t j = 0; j < count; ++j) {
          const int64_t o = o0 + j;
          for (const ChannelRun& run : runs[o / (shape.c_out / shape.groups)]) {
            const auto* mine = corners.data() + (n * shape.offset_groups + run.group) * taps;
            for (int64_t k = 0; k < taps; ++k) {
              const CornerRows<acc> rows = corner_rows(
                  mine[k], scratch.channel_cells(j) + run.c0, cg, zeros.data());
              if (acc* dst = in_place_run<acc>(shape, tap_major, out, n, o, run.c0, k))
                corner_sum_stream(run.c1 - run.c0, rows, dst);
              else
                corner_sum<false>(run.c1 - run.c0, acc(1), rows,
                                  scratch.row.data() + k * cg + run.c0);
            }
          }
          if (!in_place_run<acc>(shape, tap_major, out, n, o, 0, 0))
            store_row(shape, tap_major, n, o, scratch.row.data(), scratch.block.data(), out);
        }
    }
    stream_fence();
  });
}

// The dot products of g with four rows in one pass, as independent sums (one
// sum per loop waited on its own adds: a fifth of the backward's perf samples).
template <typename T>
ERFTOOL_ALWAYS_INLINE void four_dots(int64_t n, const T* __restrict g, const T* const r[4],
                                     T* dots) {
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t i = 0; i < n; ++i) {
    d0 += g[i] * r0[i], d1 += g[i] * r1[i];
    d2 += g[i] * r2[i], d3 += g[i] * r3[i];
  }
  dots[0] = d0, dots[1] = d1, dots[2] = d2, dots[3] = d3;
}

// Gradients of fill_global_kernels from that of its output (same layout):
// grad_weight (null: not wanted) gets each cell's corner-weighted sum of the
// kernel gradients; grad_offset (null: not wanted) each sample's slopes times
// the dot products of its kernel gradients with the corner cells.
template <typename scalar_t>
void global_kernels_grads(const math::GlobalKernelShape& shape, const scalar_t* grad,
                          const scalar_t* weight, const scalar_t* offset, bool tap_major,
                          scalar_t* grad_weight, scalar_t* grad_offset) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t taps = shape.kh * shape.kw, cg = shape.cg, cells = shape.scope_h * shape.scope_w;
  const auto corners = corner_table<acc>(shape, offset);
  const auto runs = channel_runs(shape);
  const int64_t samples = static_cast<int64_t>(corners.size());
  const int64_t tasks = (shape.c_out + kChannelsPerTask - 1) / kChannelsPerTask;
  std::vector<acc> partial(grad_offset ? tasks * samples * 2 : 0, acc(0));
  const std::vector<acc> zeros(static_cast<size_t>(cg), acc(0));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    TaskScratch<acc> scratch(shape);
    std::vector<acc> grad_cells(grad_weight ? scratch.cells.size() : 0);  // like cells
    for (int64_t task = begin; task < end; ++task) {
      acc* sums = grad_offset ? partial.data() + task * samples * 2 : nullptr;
      const int64_t o0 = task * kChannelsPerTask;
      const int64_t count = std::min(shape.c_out, o0 + kChannelsPerTask) - o0;
      if (grad_offset) scratch.load_cells(shape, weight, o0, count);
      std::fill(grad_cells.begin(), grad_cells.end(), acc(0));
      for (int64_t n = 0; n < shape.n; ++n)
        for (int64_t j = 0; j < count; ++j) {
          const int64_t o = o0 + j;
          const bool in_place = in_place_run<acc>(shape, tap_major, grad, n, o, 0, 0);
          if (!in_place) load_row(shape, tap_major, n, o, grad, scratch.row.data());
          for (const ChannelRun& run : runs[o / (shape.c_out / shape.groups)]) {
            const int64_t first = (n * shape.offset_groups + run.group) * taps;
            const int64_t len = run.c1 - run.c0, at = j * scratch.plane_size + run.c0;
            for (int64_t k = 0; k < taps; ++k) {
              const math::BilinearCorners<acc>& cn = corners[first + k];
              const acc* g = in_place
                                 ? in_place_run<acc>(shape, true, grad, n, o, run.c0, k)
                                 : scratch.row.data() + k * cg + run.c0;
              if (grad_weight)
                for (int i = 0; i < 4; ++i)
                  if (cn.index[i] >= 0)
                    axpy(len, cn.weight[i], g, grad_cells.data() + at + cn.index[i] * cg);
              if (grad_offset) {  // absent corners read zeros (and have zero slopes)
                const acc* rows[4];
                for (int i = 0; i < 4; ++i)
                  rows[i] = cn.index[i] >= 0 ? scratch.cells.data() + at + cn.index[i] * cg
                                             : zeros.data();
                acc d[4];
                four_dots(len, g, rows, d);
                for (int i = 0; i < 4; ++i) {
                  sums[(first + k) * 2] += d[i] * cn.d_dy[i];
                  sums[(first + k) * 2 + 1] += d[i] * cn.d_dx[i];
                }
              }
            }
          }
        }
      if (grad_weight)  // each channel's (S, cg) back to its (cg, S) planes
        for (int64_t j = 0; j < count; ++j) {
          transpose_block(grad_cells.data() + j * scratch.plane_size, cg, scratch.plane.data(),
                          cells, 0, cells, 0, cg);
          for (int64_t i = 0; i < scratch.plane_size; ++i)
            grad_weight[(o0 + j) * scratch.plane_size + i] =
                static_cast<scalar_t>(scratch.plane[i]);
        }
    }
  });
  if (grad_offset)
    for (int64_t i = 0; i < samples * 2; ++i) {
      acc total = acc(0);
      for (int64_t task = 0; task < tasks; ++task) total += partial[task * samples * 2 + i];
      grad_offset[i] = static_cast<scalar_t>(total);
    }
}

at::Tensor global_kernels_cpu(const at::Tensor& weight, const at::Tensor& offset,
                              at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
                              bool tap_major) {
  const math::GlobalKernelShape shape =
      global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  const at::Tensor w = weight.contiguous(), off = offset.contiguous();
  at::Tensor out = empty_global_kernels(weight, shape, tap_major);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "global_kernels_cpu", [&] {
    fill_global_kernels<scalar_t>(shape, w.const_data_ptr<scalar_t>(),
                                  off.const_data_ptr<scalar_t>(), tap_major,
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> global_kernels_backward_cpu(
    const at::Tensor& grad_kernels, const at::Tensor& weight, const at::Tensor& offset,
    at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups, bool tap_major,
    std::array<bool, 2> output_mask) {
  const math::GlobalKernelShape shape =
      global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  check_grad_kernels(grad_kernels, weight, shape, tap_major);
  const at::Tensor g = grad_kernels.contiguous(), w = weight.contiguous();
  const at::Tensor off = offset.contiguous();
  at::Tensor grad_weight, grad_offset;
  if (output_mask[0]) grad_weight = at::empty_like(w);
  if (output_mask[1]) grad_offset = at::empty_like(off);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "global_kernels_backward_cpu", [&] {
    global_kernels_grads<scalar_t>(
        shape, g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        off.const_data_ptr<scalar_t>(), tap_major,
        output_mask[0] ? grad_weight.data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? grad_offset.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_weight, grad_offset};
}

}  // namespace
}  // namespace cpu
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CPU, m) {
  m.impl("global_kernels", &erftool::cpu::global_kernels_cpu);
  m.impl("global_kernels_backward", &erftool::cpu::global_kernels_backward_cpu);
}
