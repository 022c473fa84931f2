// CPU kernel of erftool_native::global_kernels: a global Deformable Kernel's
// per-image kernels through math::global_kernel_corners / global_kernel_value,
// the arithmetic the CUDA kernel runs (native/cuda/deform_kernels.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include <erftool/deform_math.h>
#include <erftool/global_kernels_op.h>

namespace erftool {
namespace cpu {
namespace {

at::Tensor global_kernels_cpu(const at::Tensor& weight, const at::Tensor& offset,
                              at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
                              bool tap_major) {
  const math::GlobalKernelShape shape =
      global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  const at::Tensor w = weight.contiguous(), off = offset.contiguous();
  at::Tensor out = empty_global_kernels(weight, shape, tap_major);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "global_kernels_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* op = off.const_data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const auto load_weight = [wp](int64_t i) { return static_cast<acc>(wp[i]); };
    const auto load_offset = [op](int64_t i) { return static_cast<acc>(op[i]); };
    // The corners of every (image, group, tap) once, then every entry of the
    // group reads them: a sample costs more than the four products it feeds.
    const int64_t taps = shape.kh * shape.kw, samples = shape.n * shape.offset_groups * taps;
    std::vector<math::BilinearCorners<acc>> corners(static_cast<size_t>(samples));
    for (int64_t i = 0; i < samples; ++i)
      corners[i] = math::global_kernel_corners<acc>(shape, i / (shape.offset_groups * taps),
                                                    i / taps % shape.offset_groups, i % taps,
                                                    load_offset);
    // One task item per kernel entry (image, o, c), all of its taps.
    const int64_t entries = shape.n * shape.c_out * shape.cg;
    at::parallel_for(0, entries, 256, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t c = e % shape.cg, o = e / shape.cg % shape.c_out;
        const int64_t n = e / (shape.cg * shape.c_out);
        const int64_t g = math::global_kernel_group(shape, o, c);
        const auto* mine = corners.data() + (n * shape.offset_groups + g) * taps;
        for (int64_t k = 0; k < taps; ++k)
          out_p[math::global_kernel_index(shape, tap_major, n, o, c, k)] =
              static_cast<scalar_t>(math::global_kernel_value(shape, mine[k], o, c, load_weight));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CPU, m) {
  m.impl("global_kernels", &erftool::cpu::global_kernels_cpu);
}
