// erftool_native::global_gemm_forward / global_gemm_backward: the global
// Deformable Kernel as batched matrix products, composed of ATen operations
// and erftool_native::global_kernels (the per-image kernels, a CPU and a
// CUDA kernel) so that one implementation serves every device
// (erftool/ops/_global_gemm.py describes the two layouts and picks one).
// Both passes live here rather than in Python because on a GPU their small
// operations, issued from Python, took about twice the host time that the
// device spent on them: at N 32, C 64, 56 x 56 on an H100 the forward took
// 1.23 ms from Python and 0.88 ms from here (0.47 ms of kernels).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <erftool/global_kernels_op.h>

#include <algorithm>
#include <array>
#include <tuple>

namespace erftool {
namespace {

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// Per-image kernels of `offset`'s images (erftool_native::global_kernels:
// one kernel per device, where the composition of small ATen operations it
// replaced spent most of this form's host time on a GPU), channel-major
// (n, C_out, C_in/groups, K) or tap-major (K, n, C_out, C_in/groups).
at::Tensor per_image_kernels(const at::Tensor& weight, const at::Tensor& offset,
                             at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
                             bool tap_major) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("erftool_native::global_kernels", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               at::IntArrayRef, int64_t, int64_t, bool)>();
  return op.call(weight, offset, kernel_size, groups, offset_groups, tap_major);
}

// Gradients (weight, offset) of per_image_kernels from that of its
// channel-major output (erftool_native::global_kernels_backward).
std::tuple<at::Tensor, at::Tensor> per_image_kernel_grads(
    const at::Tensor& grad_kernels, const at::Tensor& weight, const at::Tensor& offset,
    at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
    std::array<bool, 2> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("erftool_native::global_kernels_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t,
              int64_t, bool, std::array<bool, 2>)>();
  return op.call(grad_kernels, weight, offset, kernel_size, groups, offset_groups, false,
                 output_mask);
}

struct Geometry {
  int64_t kh, kw, scope_h, scope_w, stride_h, stride_w, ph, pw, dh, dw, groups, ho, wo;
};

Geometry geometry(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef kernel_size,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups) {
  Geometry g{kernel_size[0], kernel_size[1], weight.size(2), weight.size(3), stride[0],
             stride[1], padding[0], padding[1], dilation[0], dilation[1], groups, 0, 0};
  g.ho = (input.size(2) + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.stride_h + 1;
  g.wo = (input.size(3) + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.stride_w + 1;
  return g;
}

// Every tap's window of the padded input, tap-major, in one strided copy:
// (K, n, groups, C/groups, L).
at::Tensor tap_major_columns(const at::Tensor& input, const Geometry& g) {
  const at::Tensor xp = at::constant_pad_nd(input, {g.pw, g.pw, g.ph, g.ph}).contiguous();
  const int64_t n = xp.size(0), c = xp.size(1), cg = c / g.groups;
  const auto s = xp.strides();
  return xp.as_strided({g.kh, g.kw, n, g.groups, cg, g.ho, g.wo},
                       {g.dh * s[2], g.dw * s[3], s[0], cg * s[1], s[1], g.stride_h * s[2],
                        g.stride_w * s[3]},
                       xp.storage_offset())
      .reshape({g.kh * g.kw, n, g.groups, cg, -1});
}

// im2col's columns (n, C*K, L), channel-major and tap-minor, as
// (n*groups, C/groups*K, L) matrices.
at::Tensor im2col_columns(const at::Tensor& input, const Geometry& g) {
  return at::im2col(input, {g.kh, g.kw}, {g.dh, g.dw}, {g.ph, g.pw}, {g.stride_h, g.stride_w})
      .view({input.size(0) * g.groups, -1, g.ho * g.wo});
}

at::Tensor global_gemm_forward(const at::Tensor& input, const at::Tensor& weight,
                               const at::Tensor& offset, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups,
                               int64_t offset_groups, c10::string_view layout,
                               int64_t images_per_chunk) {
  TORCH_CHECK(layout == "one_product" || layout == "tap_sums",
              "global_gemm_forward: unknown layout ", layout);
  TORCH_CHECK(images_per_chunk > 0, "global_gemm_forward: images_per_chunk must be positive");
  const int64_t n = input.size(0), o = weight.size(0);
  const Geometry g = geometry(input, weight, kernel_size, stride, padding, dilation, groups);
  const int64_t taps = g.kh * g.kw, positions = g.ho * g.wo, og = o / groups;
  const bool tap_sums = layout == "tap_sums";
  at::Tensor out = at::empty({n, o, g.ho, g.wo}, input.options());
  for (int64_t first = 0; first < n; first += images_per_chunk) {
    const int64_t m = std::min(images_per_chunk, n - first);
    const at::Tensor images = input.narrow(0, first, m);
    at::Tensor part = out.narrow(0, first, m);
    const at::Tensor kernels = per_image_kernels(weight, offset.narrow(0, first, m),
                                                 kernel_size, groups, offset_groups, tap_sums);
    if (tap_sums) {
      const at::Tensor cols = tap_major_columns(images, g);
      const at::Tensor parts = at::bmm(kernels.view({m * taps * groups, og, -1}),
                                       cols.view({m * taps * groups, -1, positions}));
      part.copy_(parts.view({taps, m, o, g.ho, g.wo})
                     .sum(0, false, accumulation_dtype(input.scalar_type())));
    } else {  // one_product: one product per image and group over C_in/groups * K
      at::Tensor target = part.view({m * groups, og, positions});
      at::bmm_out(target, kernels.view({m * groups, og, -1}), im2col_columns(images, g));
    }
  }
  return out;
}

// Gradients (input, weight, offset) of global_gemm_forward, each undefined
// unless asked for: per chunk, the input-column gradient (kernels^T @
// grad_out, summed back into the image by col2im) and the kernel gradient
// (grad_out @ columns^T), from which global_kernels_backward draws the
// scope-weight and offset gradients (half types in float32: the weight
// gradient is a sum over chunks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_gemm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t offset_groups,
    int64_t images_per_chunk, std::array<bool, 3> output_mask) {
  TORCH_CHECK(images_per_chunk > 0, "global_gemm_backward: images_per_chunk must be positive");
  const auto [need_input, need_weight, need_offset] = output_mask;
  const int64_t n = input.size(0), c = input.size(1), o = weight.size(0);
  const Geometry g = geometry(input, weight, kernel_size, stride, padding, dilation, groups);
  const int64_t taps = g.kh * g.kw, positions = g.ho * g.wo, og = o / groups, cg = c / groups;
  const auto acc = accumulation_dtype(input.scalar_type());
  at::Tensor grad_input, grad_weight, grad_offset;
  if (need_input) grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (need_weight) grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc));
  if (need_offset) grad_offset = at::empty_like(offset, at::MemoryFormat::Contiguous);
  // Only the weight and offset gradients need the scope in float32 (an ERF
  // asks for the input gradient alone).
  const at::Tensor scope = (need_weight || need_offset) ? weight.to(acc) : at::Tensor();
  for (int64_t first = 0; first < n; first += images_per_chunk) {
    const int64_t m = std::min(images_per_chunk, n - first);
    const at::Tensor offsets = offset.narrow(0, first, m);
    const at::Tensor grads = grad_output.narrow(0, first, m).reshape({m * groups, og, positions});
    if (need_input) {  // needs the kernels, not the columns; col2im adds the windows back
      const at::Tensor kernels =
          per_image_kernels(weight, offsets, kernel_size, groups, offset_groups, false);
      const at::Tensor grad_cols =
          at::bmm(kernels.view({m * groups, og, cg * taps}).transpose(1, 2), grads);
      grad_input.narrow(0, first, m).copy_(at::col2im(
          grad_cols.view({m, c * taps, positions}), {input.size(2), input.size(3)},
          {g.kh, g.kw}, {g.dh, g.dw}, {g.ph, g.pw}, {g.stride_h, g.stride_w}));
    }
    if (need_weight || need_offset) {  // needs the columns, not the kernels
      const at::Tensor cols = im2col_columns(input.narrow(0, first, m), g);
      const at::Tensor grad_kernels =
          at::bmm(grads, cols.transpose(1, 2)).view({m, o, weight.size(1), taps}).to(acc);
      const auto [part_weight, part_offset] =
          per_image_kernel_grads(grad_kernels, scope, offsets.to(acc), kernel_size, groups,
                                 offset_groups, {need_weight, need_offset});
      if (need_weight) grad_weight.add_(part_weight);
      if (need_offset) grad_offset.narrow(0, first, m).copy_(part_offset);
    }
  }
  if (need_weight) grad_weight = grad_weight.to(weight.scalar_type());
  return {grad_input, grad_weight, grad_offset};
}

// Shape-only kernels, for tracing and fake tensors: the passes above call
// global_kernels through the dispatcher, which a traced composite cannot.
at::Tensor global_gemm_forward_meta(const at::Tensor& input, const at::Tensor& weight,
                                    const at::Tensor&, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, int64_t,
                                    c10::string_view, int64_t) {
  const Geometry g = geometry(input, weight, kernel_size, stride, padding, dilation, groups);
  return at::empty({input.size(0), weight.size(0), g.ho, g.wo}, input.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_gemm_backward_meta(
    const at::Tensor&, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t, int64_t, int64_t,
    std::array<bool, 3> output_mask) {
  auto like = [](const at::Tensor& t, bool needed) {
    return needed ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::Tensor();
  };
  return {like(input, output_mask[0]), like(weight, output_mask[1]),
          like(offset, output_mask[2])};
}

// global_kernels' kernels live in native/cpu and native/cuda.
at::Tensor global_kernels_meta(const at::Tensor& weight, const at::Tensor& offset,
                               at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
                               bool tap_major) {
  return empty_global_kernels(
      weight, global_kernel_shape(weight, offset, kernel_size, groups, offset_groups), tap_major);
}

std::tuple<at::Tensor, at::Tensor> global_kernels_backward_meta(
    const at::Tensor& grad_kernels, const at::Tensor& weight, const at::Tensor& offset,
    at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups, bool tap_major,
    std::array<bool, 2> output_mask) {
  check_grad_kernels(grad_kernels, weight,
                     global_kernel_shape(weight, offset, kernel_size, groups, offset_groups),
                     tap_major);
  return {output_mask[0] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::Tensor(),
          output_mask[1] ? at::empty_like(offset, at::MemoryFormat::Contiguous) : at::Tensor()};
}

}  // namespace
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CompositeExplicitAutograd, m) {
  m.impl("global_gemm_forward", &erftool::global_gemm_forward);
  m.impl("global_gemm_backward", &erftool::global_gemm_backward);
}

TORCH_LIBRARY_IMPL(erftool_native, Meta, m) {
  m.impl("global_gemm_forward", &erftool::global_gemm_forward_meta);
  m.impl("global_gemm_backward", &erftool::global_gemm_backward_meta);
  m.impl("global_kernels", &erftool::global_kernels_meta);
  m.impl("global_kernels_backward", &erftool::global_kernels_backward_meta);
}
