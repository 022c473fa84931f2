// CPU kernel of erftool_native::global_kernels: a global Deformable Kernel's
// per-image kernels. Every value is the bilinear sample of its scope plane at
// math::global_kernel_corners, the corners the CUDA kernel
// (native/cuda/deform_kernels.cu) computes per thread; here they are computed
// once per (image, offset group, tap) and each sample is summed over a run of
// channels at once (one fused pass over four cell-major scope rows), since a
// per-value loop spent its time on index arithmetic (10-15 ms against 2-3.5 ms
// for 8 images of 256 -> 256 channels, 2-core EPYC).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include <erftool/deform_math.h>
#include <erftool/global_kernels_op.h>

#include "deform_cpu_kernels.h"  // corner_rows, corner_sum
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

// Per-thread buffers of one output channel o.
template <typename acc>
struct ChannelScratch {
  std::vector<acc> plane, cells, row;  // (cg, S), (S, cg), (K, cg)
  explicit ChannelScratch(const math::GlobalKernelShape& s)
      : plane(s.cg * s.scope_h * s.scope_w),
        cells(plane.size()),
        row(s.cg * s.kh * s.kw) {}

  // o's scope planes, cell-major: each cell one contiguous run over c.
  template <typename scalar_t>
  void load_cells(const math::GlobalKernelShape& s, const scalar_t* weight, int64_t o) {
    const int64_t size = static_cast<int64_t>(plane.size());
    for (int64_t i = 0; i < size; ++i) plane[i] = static_cast<acc>(weight[o * size + i]);
    transpose_block(plane.data(), s.scope_h * s.scope_w, cells.data(), s.cg, 0, s.cg, 0,
                    s.scope_h * s.scope_w);
  }
};

// Image n's kernel row of o, (K, cg), to or from either layout.
template <typename acc, typename scalar_t>
void store_row(const math::GlobalKernelShape& shape, bool tap_major, int64_t n, int64_t o,
               const acc* row, scalar_t* out) {
  const int64_t taps = shape.kh * shape.kw, step = tap_major ? 1 : taps;
  for (int64_t k = 0; k < taps; ++k) {
    scalar_t* dst = out + math::global_kernel_index(shape, tap_major, n, o, 0, k);
    for (int64_t c = 0; c < shape.cg; ++c)
      dst[c * step] = static_cast<scalar_t>(row[k * shape.cg + c]);
  }
}

template <typename acc, typename scalar_t>
void load_row(const math::GlobalKernelShape& shape, bool tap_major, int64_t n, int64_t o,
              const scalar_t* in, acc* row) {
  const int64_t taps = shape.kh * shape.kw, step = tap_major ? 1 : taps;
  for (int64_t k = 0; k < taps; ++k) {
    const scalar_t* src = in + math::global_kernel_index(shape, tap_major, n, o, 0, k);
    for (int64_t c = 0; c < shape.cg; ++c) row[k * shape.cg + c] = static_cast<acc>(src[c * step]);
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
  // One task item per output channel o: its scope planes turned cell-major
  // once, then every image's kernel row of o drawn from them.
  const int64_t grain = std::max<int64_t>(1, 4096 / (cg * shape.scope_h * shape.scope_w));
  at::parallel_for(0, shape.c_out, grain, [&](int64_t begin, int64_t end) {
    ChannelScratch<acc> scratch(shape);
    for (int64_t o = begin; o < end; ++o) {
      scratch.load_cells(shape, weight, o);
      for (int64_t n = 0; n < shape.n; ++n) {
        for (const ChannelRun& run : runs[o / (shape.c_out / shape.groups)]) {
          const auto* mine = corners.data() + (n * shape.offset_groups + run.group) * taps;
          for (int64_t k = 0; k < taps; ++k)
            corner_sum<false>(run.c1 - run.c0, acc(1),
                              corner_rows(mine[k], scratch.cells.data() + run.c0, cg,
                                          zeros.data()),
                              scratch.row.data() + k * cg + run.c0);
        }
        store_row(shape, tap_major, n, o, scratch.row.data(), out);
      }
    }
  });
}

// Output channels per task of the backward: fixed, so that the offset
// gradient's partial sums (one set per task, added in task order) do not
// depend on the thread count.
constexpr int64_t kChannelsPerTask = 8;

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
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ChannelScratch<acc> scratch(shape);
    std::vector<acc> grad_cells(grad_weight ? cells * cg : 0);  // (S, cg)
    for (int64_t task = begin; task < end; ++task) {
      acc* sums = grad_offset ? partial.data() + task * samples * 2 : nullptr;
      for (int64_t o = task * kChannelsPerTask;
           o < std::min(shape.c_out, (task + 1) * kChannelsPerTask); ++o) {
        if (grad_offset) scratch.load_cells(shape, weight, o);
        std::fill(grad_cells.begin(), grad_cells.end(), acc(0));
        for (int64_t n = 0; n < shape.n; ++n) {
          load_row(shape, tap_major, n, o, grad, scratch.row.data());
          for (const ChannelRun& run : runs[o / (shape.c_out / shape.groups)]) {
            const int64_t first = (n * shape.offset_groups + run.group) * taps;
            for (int64_t k = 0; k < taps; ++k) {
              const math::BilinearCorners<acc>& cn = corners[first + k];
              const acc* g = scratch.row.data() + k * cg + run.c0;
              const int64_t len = run.c1 - run.c0;
              for (int i = 0; i < 4; ++i) {
                if (cn.index[i] < 0) continue;
                const int64_t at = cn.index[i] * cg + run.c0;
                if (grad_weight) axpy(len, cn.weight[i], g, grad_cells.data() + at);
                if (grad_offset) {
                  const acc d = dot(len, g, scratch.cells.data() + at);
                  sums[(first + k) * 2] += d * cn.d_dy[i];
                  sums[(first + k) * 2 + 1] += d * cn.d_dx[i];
                }
              }
            }
          }
        }
        if (grad_weight) {  // (S, cg) back to o's (cg, S) planes
          transpose_block(grad_cells.data(), cg, scratch.plane.data(), cells, 0, cells, 0, cg);
          for (int64_t i = 0; i < cg * cells; ++i)
            grad_weight[o * cg * cells + i] = static_cast<scalar_t>(scratch.plane[i]);
        }
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
