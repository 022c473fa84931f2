// Arguments of erftool_native::global_kernels (schema in native/binding.cpp),
// checked once for its CPU and CUDA implementations. Torch side only: the
// .cu kernels include deform_math.h alone.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include <erftool/deform_math.h>

namespace erftool {

inline math::GlobalKernelShape global_kernel_shape(const at::Tensor& weight,
                                                   const at::Tensor& offset,
                                                   at::IntArrayRef kernel_size, int64_t groups,
                                                   int64_t offset_groups) {
  TORCH_CHECK(weight.dim() == 4, "global_kernels: weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(kernel_size.size() == 2, "global_kernels: kernel_size must have 2 entries");
  TORCH_CHECK(groups > 0 && offset_groups > 0 && weight.size(0) % groups == 0,
              "global_kernels: groups ", groups, " must divide C_out ", weight.size(0));
  const int64_t c_in = groups * weight.size(1);
  TORCH_CHECK(c_in % offset_groups == 0, "global_kernels: offset_groups ", offset_groups,
              " must divide the ", c_in, " input channels");
  const int64_t taps = kernel_size[0] * kernel_size[1];
  TORCH_CHECK(offset.dim() == 2 && offset.size(1) == 2 * offset_groups * taps,
              "global_kernels: offset must be (N, ", 2 * offset_groups * taps, "), got ",
              offset.sizes());
  TORCH_CHECK(offset.scalar_type() == weight.scalar_type() && offset.device() == weight.device(),
              "global_kernels: offset and weight must share dtype and device");
  return math::GlobalKernelShape{offset.size(0),   weight.size(0), weight.size(1),
                                 groups,           offset_groups,  kernel_size[0],
                                 kernel_size[1],   weight.size(2), weight.size(3)};
}

// (N, C_out, C_in/groups, K) or, tap-major, (K, N, C_out, C_in/groups).
inline std::vector<int64_t> global_kernels_sizes(const math::GlobalKernelShape& s,
                                                 bool tap_major) {
  const int64_t taps = s.kh * s.kw;
  return tap_major ? std::vector<int64_t>{taps, s.n, s.c_out, s.cg}
                   : std::vector<int64_t>{s.n, s.c_out, s.cg, taps};
}

inline at::Tensor empty_global_kernels(const at::Tensor& weight, const math::GlobalKernelShape& s,
                                       bool tap_major) {
  return at::empty(global_kernels_sizes(s, tap_major), weight.options());
}

// The gradient of global_kernels' output: its shape, dtype and device.
inline void check_grad_kernels(const at::Tensor& grad_kernels, const at::Tensor& weight,
                               const math::GlobalKernelShape& s, bool tap_major) {
  const std::vector<int64_t> sizes = global_kernels_sizes(s, tap_major);
  TORCH_CHECK(grad_kernels.sizes() == at::IntArrayRef(sizes),
              "global_kernels_backward: grad_kernels must be ", at::IntArrayRef(sizes), ", got ",
              grad_kernels.sizes());
  TORCH_CHECK(grad_kernels.scalar_type() == weight.scalar_type() &&
                  grad_kernels.device() == weight.device(),
              "global_kernels_backward: grad_kernels and weight must share dtype and device");
}

}  // namespace erftool
