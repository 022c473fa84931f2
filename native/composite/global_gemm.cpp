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

// Per-axis bilinear weights of every scope cell for every tap's sample. On
// each axis the weight of cell i for a sample at y is the tent
// max(0, 1 - |y - i|): zero for cells outside the scope and for every cell
// when y <= -1 or y >= S. Non-finite offsets are moved outside first. The
// slopes d weight / d y are those of the floor-based corners of the other
// backends: cell floor(y) -1 and cell floor(y) + 1 +1, also at integer y
// (one-sided), and 0 for a sample outside the scope on that axis.
struct Tents {
  at::Tensor wy, wx;  // (N, G, kh, kw, S_h), (N, G, kh, kw, S_w)
  at::Tensor dy, dx;  // slopes, same shapes (only when asked for)
};

// Both axes in the same few operations (each one a kernel launch on a GPU,
// where the host time of such small operations is what this form spends most),
// over max(S_h, S_w) cells.
Tents scope_tents(const at::Tensor& offset, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                  int64_t offset_groups, bool slopes) {
  const int64_t cells = std::max(sh, sw);
  const double far = -2.0 * static_cast<double>(cells + std::max(kh, kw));
  const at::Tensor pos = offset.to(accumulation_dtype(offset.scalar_type()))
                             .reshape({offset.size(0), offset_groups, kh, kw, 2})
                             .nan_to_num(far, far, far);
  const auto opts = pos.options();
  const at::Tensor cell = at::arange(cells, opts);
  // (taps, cells): tap t's centred position t + (S - K)/2 minus cell i.
  auto gaps = [&](int64_t taps, int64_t scope) {
    return at::arange(taps, opts).view({taps, 1}).sub(cell)
        .add_(static_cast<double>(scope - taps) / 2);
  };
  const at::Tensor gap = at::stack({gaps(kh, sh).view({kh, 1, cells}).expand({kh, kw, cells}),
                                    gaps(kw, sw).view({1, kw, cells}).expand({kh, kw, cells})},
                                   2);                  // (kh, kw, 2, cells)
  const at::Tensor d = pos.unsqueeze(-1).add(gap);       // (N, G, kh, kw, 2, cells): y - i
  const at::Tensor w = at::rsub(d.abs(), 1).clamp_min_(0);  // 1 - |y - i|, at least 0
  Tents t;  // each axis keeps its own cells: those past its scope are cut off
  t.wy = w.select(4, 0).narrow(-1, 0, sh);
  t.wx = w.select(4, 1).narrow(-1, 0, sw);
  if (slopes) {
    // Inside the scope on an axis: y > -1 (cell 0) and y < S (cell S - 1).
    const at::Tensor last = sh == sw ? d.select(-1, cells - 1)
                                     : at::stack({d.select(4, 0).select(-1, sh - 1),
                                                  d.select(4, 1).select(-1, sw - 1)}, -1);
    const at::Tensor inside = d.select(-1, 0).gt(-1).logical_and_(last.lt(1));
    const at::Tensor near =
        d.ge(-1).logical_and_(d.lt(1)).logical_and_(inside.unsqueeze(-1));
    // +1 for the cell above y (y - i in [-1, 0)), -1 for the one at or below it.
    const at::Tensor slope = d.ge(0).to(pos.scalar_type()).mul_(-2).add_(1).mul_(near);
    t.dy = slope.select(4, 0).narrow(-1, 0, sh);
    t.dx = slope.select(4, 1).narrow(-1, 0, sw);
  }
  return t;
}

// (N, G, K, S_h*S_w): the bilinear weight of every scope cell for every tap.
at::Tensor coefficients(const Tents& t) {
  const auto s = t.wy.sizes();
  return t.wy.unsqueeze(-1).mul(t.wx.unsqueeze(-2))
      .reshape({s[0], s[1], s[2] * s[3], s[4] * t.wx.size(-1)});
}

// Offset gradient (N, 2*G*K) from that of the coefficients (N, G, K, S).
at::Tensor offset_gradient(const Tents& t, const at::Tensor& grad_coef) {
  const at::Tensor g = grad_coef.view({t.wy.size(0), t.wy.size(1), t.wy.size(2), t.wy.size(3),
                                       t.wy.size(4), t.wx.size(4)});
  const at::Tensor rows = g.mul(t.wx.unsqueeze(-2)).sum(-1).mul_(t.dy).sum(-1);
  const at::Tensor cols = g.mul(t.wy.unsqueeze(-1)).sum(-2).mul_(t.dx).sum(-1);
  return at::stack({rows, cols}, -1).reshape({t.wy.size(0), -1});
}

// Per-image kernels of `offset`'s images (erftool_native::global_kernels:
// one kernel per device, where the composition of small ATen operations it
// replaced spent most of this form's host time on a GPU), channel-major
// (n, C_out, C_in/groups, K) or tap-major (n, K, C_out, C_in/groups).
at::Tensor per_image_kernels(const at::Tensor& weight, const at::Tensor& offset,
                             at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
                             bool tap_major) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("erftool_native::global_kernels", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               at::IntArrayRef, int64_t, int64_t, bool)>();
  return op.call(weight, offset, kernel_size, groups, offset_groups, tap_major);
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
// (n, K, groups, C/groups, L).
at::Tensor tap_major_columns(const at::Tensor& input, const Geometry& g) {
  const at::Tensor xp = at::constant_pad_nd(input, {g.pw, g.pw, g.ph, g.ph}).contiguous();
  const int64_t n = xp.size(0), c = xp.size(1), cg = c / g.groups;
  const auto s = xp.strides();
  return xp.as_strided({n, g.kh, g.kw, g.groups, cg, g.ho, g.wo},
                       {s[0], g.dh * s[2], g.dw * s[3], cg * s[1], s[1], g.stride_h * s[2],
                        g.stride_w * s[3]},
                       xp.storage_offset())
      .reshape({n, g.kh * g.kw, g.groups, cg, -1});
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
      part.copy_(parts.view({m, taps, o, g.ho, g.wo})
                     .sum(1, false, accumulation_dtype(input.scalar_type())));
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
// (grad_out @ columns^T), from which the scope-weight gradient (one product
// with the coefficients) and the coefficient gradient (one product with the
// scope weight, masked to each row's offset group) follow; the offset
// gradient then comes from the tents' slopes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_gemm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& offset, const c10::optional<at::Tensor>& row_groups,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t offset_groups, int64_t images_per_chunk,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(images_per_chunk > 0, "global_gemm_backward: images_per_chunk must be positive");
  const auto [need_input, need_weight, need_offset] = output_mask;
  const int64_t n = input.size(0), c = input.size(1), o = weight.size(0);
  const Geometry g = geometry(input, weight, kernel_size, stride, padding, dilation, groups);
  const int64_t taps = g.kh * g.kw, positions = g.ho * g.wo, og = o / groups, cg = c / groups;
  const int64_t cells = g.scope_h * g.scope_w, rows = o * weight.size(1);
  const auto acc = accumulation_dtype(input.scalar_type());
  // The coefficients (and their slopes) serve the weight and offset gradients
  // only: an input gradient alone (an ERF) skips them.
  Tents tents;
  at::Tensor coef, group_scope;  // (N, G, K, S) and the scope seen by each group, acc
  if (need_weight || need_offset) {
    tents = scope_tents(offset, g.kh, g.kw, g.scope_h, g.scope_w, offset_groups, need_offset);
    coef = coefficients(tents);
    group_scope = weight.to(acc).reshape({rows, cells});
    if (row_groups.has_value()) {  // row m is seen by its own group only
      const at::Tensor member =
          row_groups->view({rows, 1}).eq(at::arange(offset_groups, row_groups->options()));
      group_scope =
          group_scope.unsqueeze(1).mul(member.unsqueeze(-1).to(acc)).reshape({rows, -1});
    }
  }
  at::Tensor grad_input, grad_scope, grad_coef;
  if (need_input) grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (need_weight) grad_scope = at::zeros({rows, offset_groups * cells}, coef.options());
  if (need_offset) grad_coef = at::empty_like(coef);
  for (int64_t first = 0; first < n; first += images_per_chunk) {
    const int64_t m = std::min(images_per_chunk, n - first);
    const at::Tensor grads = grad_output.narrow(0, first, m).reshape({m * groups, og, positions});
    if (need_input) {  // needs the kernels, not the columns; col2im adds the windows back
      const at::Tensor kernels = per_image_kernels(weight, offset.narrow(0, first, m),
                                                   kernel_size, groups, offset_groups, false);
      const at::Tensor grad_cols =
          at::bmm(kernels.view({m * groups, og, cg * taps}).transpose(1, 2), grads);
      grad_input.narrow(0, first, m).copy_(at::col2im(
          grad_cols.view({m, c * taps, positions}), {input.size(2), input.size(3)},
          {g.kh, g.kw}, {g.dh, g.dw}, {g.ph, g.pw}, {g.stride_h, g.stride_w}));
    }
    if (need_weight || need_offset) {  // needs the columns, not the kernels
      const at::Tensor cols = im2col_columns(input.narrow(0, first, m), g);
      const at::Tensor grad_kernels = at::bmm(grads, cols.transpose(1, 2))
                                          .view({m, groups, og, cg, taps})
                                          .permute({0, 4, 1, 2, 3})
                                          .reshape({m * taps, rows})
                                          .to(acc);
      if (need_weight) {  // sum over (image, tap) of grad_kernel x coefficient, every group
        grad_scope.addmm_(grad_kernels.t(),
                          coef.narrow(0, first, m).transpose(1, 2).reshape({m * taps, -1}));
      }
      if (need_offset) {
        grad_coef.narrow(0, first, m).copy_(grad_kernels.mm(group_scope)
                                                .view({m, taps, offset_groups, cells})
                                                .transpose(1, 2));
      }
    }
  }
  at::Tensor grad_weight, grad_offset;
  if (need_weight) {
    at::Tensor own = grad_scope.view({rows, offset_groups, cells});
    own = row_groups.has_value()
              ? own.gather(1, row_groups->view({rows, 1, 1}).expand({rows, 1, cells}))
              : own.narrow(1, 0, 1);
    grad_weight = own.reshape(weight.sizes()).to(weight.scalar_type());
  }
  if (need_offset) grad_offset = offset_gradient(tents, grad_coef).to(offset.scalar_type());
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
    const at::Tensor& offset, const c10::optional<at::Tensor>&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, int64_t,
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
