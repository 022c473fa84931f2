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

// Image n's kernel row of o, (taps, cg), into either layout.
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

template <typename scalar_t>
void fill_global_kernels(const math::GlobalKernelShape& shape, const scalar_t* weight,
                         const scalar_t* offset, bool tap_major, scalar_t* out) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t taps = shape.kh * shape.kw, cells = shape.scope_h * shape.scope_w;
  const int64_t cg = shape.cg, per_group = shape.c_out / shape.groups;
  const auto load_offset = [offset](int64_t i) { return static_cast<acc>(offset[i]); };
  std::vector<math::BilinearCorners<acc>> corners(
      static_cast<size_t>(shape.n * shape.offset_groups * taps));
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t g = 0; g < shape.offset_groups; ++g)
      for (int64_t k = 0; k < taps; ++k)
        corners[(n * shape.offset_groups + g) * taps + k] =
            math::global_kernel_corners<acc>(shape, n, g, k, load_offset);
  const std::vector<std::vector<ChannelRun>> runs = channel_runs(shape);
  const std::vector<acc> zeros(static_cast<size_t>(cg), acc(0));

  // One task item per output channel o: its scope planes turned cell-major
  // once (cells x cg), then every image's kernel row of o drawn from them.
  at::parallel_for(0, shape.c_out, std::max<int64_t>(1, 4096 / (cg * cells)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc> plane(static_cast<size_t>(cg * cells)), cell_major(plane.size());
    std::vector<acc> row(static_cast<size_t>(taps * cg));  // (taps, cg) of one image
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t i = 0; i < cg * cells; ++i)
        plane[i] = static_cast<acc>(weight[o * cg * cells + i]);
      transpose_block(plane.data(), cells, cell_major.data(), cg, 0, cg, 0, cells);
      for (int64_t n = 0; n < shape.n; ++n) {
        for (const ChannelRun& run : runs[o / per_group]) {
          const auto* mine = corners.data() + (n * shape.offset_groups + run.group) * taps;
          for (int64_t k = 0; k < taps; ++k)
            corner_sum<false>(run.c1 - run.c0, acc(1),
                              corner_rows(mine[k], cell_major.data() + run.c0, cg, zeros.data()),
                              row.data() + k * cg + run.c0);
        }
        store_row(shape, tap_major, n, o, row.data(), out);
      }
    }
  });
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

}  // namespace
}  // namespace cpu
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CPU, m) {
  m.impl("global_kernels", &erftool::cpu::global_kernels_cpu);
}
