// CUDA implementations of torch.ops.erftool_native.deform_forward /
// deform_backward (schemas in native/binding.cpp).
//
// Column form, per chunk of `nb` images (chunk_bytes bounds the column
// buffers) and per weight group gw:
//   forward   columns = build(input, offsets, mask)            (C_in*S2) x (nb*Ho*Wo)
//             out_g   = W_g @ columns_g, per image into NCHW     cuBLAS (at::bmm)
//             (depthwise layers: one direct kernel, no columns)
//   backward  gcols_g = W_g^T @ grad_out_g                       cuBLAS, all groups
//             grad_W_g += grad_out_g @ columns_g^T               in one at::bmm (columns rebuilt)
//             offsets / mask grads: fused pass over gcols (block reductions),
//             grad_input: gather (rigid grid) or fp32/fp64 atomics (data offsets).
// Kernels: native/cuda/deform_kernels.cu (no torch headers). Everything runs
// on the current CUDA stream of the input's device. Also global_kernels, the
// global Deformable Kernel's per-image kernels (one elementwise kernel).
//
// Compiled only when torch has CUDA, with -DERFTOOL_WITH_CUDA for the whole
// extension (native/binding.cpp reports it through has_cuda_kernels()).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include <erftool/global_kernels_op.h>

#include "deform_kernels.cuh"

namespace {

namespace ek = erftool::cuda;

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int64_t kDefaultChunkBytes = int64_t(256) << 20;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "erftool CUDA kernel ", what, " failed: ",
              cudaGetErrorString(err),
              err == cudaErrorInvalidValue
                  ? " (unsupported size: kernel_size too large for shared memory, H*W >= 2^31 "
                    "or S_h*S_w >= 2^15)"
                  : "");
}

// Validated, contiguous operands and the geometry shared by both passes.
struct Problem {
  at::Tensor input, weight, kernel_offset, data_offset, mask;
  bool has_ko = false, has_do = false, has_mask = false;
  int64_t N = 0, C = 0, H = 0, W = 0, C_out = 0, groups = 1;
  int64_t kh = 1, kw = 1, S_h = 1, S_w = 1, Ho = 0, Wo = 0;
  int64_t G = 1, DG = 1;
  int64_t K() const { return kh * kw; }
  int64_t S2() const { return S_h * S_w; }
  int64_t P() const { return Ho * Wo; }
  int64_t Rg() const { return C / groups * S2(); }  // column rows per weight group
  int64_t Og() const { return C_out / groups; }

  ek::DeformShape shape(int64_t nb, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation) const {
    ek::DeformShape s;
    s.nb = nb;
    s.C = C;
    s.H = H;
    s.W = W;
    s.Ho = Ho;
    s.Wo = Wo;
    s.kh = static_cast<int>(kh);
    s.kw = static_cast<int>(kw);
    s.scope_h = static_cast<int>(S_h);
    s.scope_w = static_cast<int>(S_w);
    s.stride_h = static_cast<int>(stride[0]);
    s.stride_w = static_cast<int>(stride[1]);
    s.pad_h = static_cast<int>(padding[0]);
    s.pad_w = static_cast<int>(padding[1]);
    s.dil_h = static_cast<int>(dilation[0]);
    s.dil_w = static_cast<int>(dilation[1]);
    s.G = static_cast<int>(G);
    s.DG = static_cast<int>(DG);
    return s;
  }
};

void check_optional(const at::Tensor& t, const at::Tensor& input, const char* name,
                    std::array<int64_t, 4> sizes) {
  TORCH_CHECK(t.device() == input.device(), "erftool: ", name, " must be on ", input.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "erftool: ", name, " must have dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == sizes[0] && t.size(1) == sizes[1] &&
                  t.size(2) == sizes[2] && t.size(3) == sizes[3],
              "erftool: ", name, " must have shape (", sizes[0], ", ", sizes[1], ", ", sizes[2],
              ", ", sizes[3], "), got ", t.sizes());
}

Problem make_problem(const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& kernel_offset,
                     const std::optional<at::Tensor>& data_offset,
                     const std::optional<at::Tensor>& mask, at::IntArrayRef kernel_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     int64_t groups, int64_t offset_groups, int64_t data_offset_groups) {
  TORCH_CHECK(input.is_cuda(), "erftool: CUDA kernel called with a non-CUDA input");
  TORCH_CHECK(input.dim() == 4, "erftool: input must be (N, C_in, H, W), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "erftool: weight must be (C_out, C_in/groups, S_h, S_w), got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == input.device() && weight.scalar_type() == input.scalar_type(),
              "erftool: weight must match the input's device and dtype");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "erftool: kernel_size, stride, padding and dilation take two values");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "erftool: stride and dilation must be positive, padding non-negative");

  Problem pb;
  pb.N = input.size(0);
  pb.C = input.size(1);
  pb.H = input.size(2);
  pb.W = input.size(3);
  pb.C_out = weight.size(0);
  pb.groups = groups;
  pb.kh = kernel_size[0];
  pb.kw = kernel_size[1];
  pb.S_h = weight.size(2);
  pb.S_w = weight.size(3);
  TORCH_CHECK(groups > 0 && pb.C % groups == 0 && pb.C_out % groups == 0 &&
                  weight.size(1) * groups == pb.C,
              "erftool: groups=", groups, " does not fit C_in=", pb.C, ", C_out=", pb.C_out,
              ", weight ", weight.sizes());
  TORCH_CHECK(pb.kh > 0 && pb.kw > 0 && pb.kh <= pb.S_h && pb.kw <= pb.S_w,
              "erftool: kernel_size ", kernel_size, " must be positive and fit the scope (",
              pb.S_h, ", ", pb.S_w, ")");
  pb.Ho = (pb.H + 2 * padding[0] - dilation[0] * (pb.kh - 1) - 1) / stride[0] + 1;
  pb.Wo = (pb.W + 2 * padding[1] - dilation[1] * (pb.kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(pb.Ho > 0 && pb.Wo > 0, "erftool: empty output (", pb.Ho, " x ", pb.Wo, ")");

  pb.input = input.contiguous();
  pb.weight = weight.contiguous();
  const int64_t K = pb.K();
  if (kernel_offset.has_value() && kernel_offset->defined()) {
    TORCH_CHECK(offset_groups > 0 && pb.C % offset_groups == 0, "erftool: offset_groups=",
                offset_groups, " must divide C_in=", pb.C);
    check_optional(*kernel_offset, input, "kernel_offset",
                   {pb.N, 2 * offset_groups * K, pb.Ho, pb.Wo});
    pb.kernel_offset = kernel_offset->contiguous();
    pb.has_ko = true;
    pb.G = offset_groups;
  }
  const bool has_do = data_offset.has_value() && data_offset->defined();
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_do || has_mask) {
    TORCH_CHECK(data_offset_groups > 0 && pb.C % data_offset_groups == 0,
                "erftool: data_offset_groups=", data_offset_groups, " must divide C_in=", pb.C);
    pb.DG = data_offset_groups;
  }
  if (has_do) {
    check_optional(*data_offset, input, "data_offset", {pb.N, 2 * pb.DG * K, pb.Ho, pb.Wo});
    pb.data_offset = data_offset->contiguous();
    pb.has_do = true;
  }
  if (has_mask) {
    check_optional(*mask, input, "mask", {pb.N, pb.DG * K, pb.Ho, pb.Wo});
    pb.mask = mask->contiguous();
    pb.has_mask = true;
  }
  return pb;
}

// Images per chunk so that `buffers` column buffers of (C_in*S2) x (nb*Ho*Wo)
// elements stay within chunk_bytes (at least one image).
int64_t images_per_chunk(const Problem& pb, int64_t chunk_bytes, int64_t buffers) {
  if (chunk_bytes <= 0) chunk_bytes = kDefaultChunkBytes;
  const int64_t per_image =
      std::max<int64_t>(1, pb.C * pb.S2() * pb.P() * pb.input.element_size() * buffers);
  return std::max<int64_t>(1, std::min<int64_t>(pb.N, chunk_bytes / per_image));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t, bool present, int64_t offset) {
  return present ? reinterpret_cast<const T*>(t.const_data_ptr()) + offset : nullptr;
}

at::Tensor deform_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& kernel_offset,
                               const std::optional<at::Tensor>& data_offset,
                               const std::optional<at::Tensor>& mask,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               int64_t offset_groups, int64_t data_offset_groups,
                               int64_t chunk_bytes) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Problem pb = make_problem(input, weight, kernel_offset, data_offset, mask, kernel_size,
                                  stride, padding, dilation, groups, offset_groups,
                                  data_offset_groups);
  at::Tensor out = at::empty({pb.N, pb.C_out, pb.Ho, pb.Wo}, pb.input.options());
  if (pb.N == 0 || pb.C_out == 0) return out;
  if (pb.C == 0) return out.zero_();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = pb.K(), P = pb.P();
  if (pb.groups == pb.C) {  // depthwise: one kernel for the batch, no columns, no products
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, pb.input.scalar_type(), "erftool_depthwise_forward_cuda", [&] {
          using cu_t = typename CudaType<scalar_t>::type;
          check_launch(ek::launch_depthwise_forward<cu_t>(
                           pb.shape(pb.N, stride, padding, dilation), pb.C_out / pb.C,
                           ptr_or_null<cu_t>(pb.input, true, 0),
                           ptr_or_null<cu_t>(pb.weight, true, 0),
                           ptr_or_null<cu_t>(pb.kernel_offset, pb.has_ko, 0),
                           ptr_or_null<cu_t>(pb.data_offset, pb.has_do, 0),
                           ptr_or_null<cu_t>(pb.mask, pb.has_mask, 0),
                           reinterpret_cast<cu_t*>(out.data_ptr()), stream),
                       "depthwise_forward");
        });
    return out;
  }

  const int64_t nb = images_per_chunk(pb, chunk_bytes, 1);
  const int64_t R = pb.C * pb.S2(), Rg = pb.Rg(), Og = pb.Og();
  const int64_t CHW = pb.C * pb.H * pb.W;
  at::Tensor buffer = at::empty({R * nb * P}, pb.input.options());
  const at::Tensor w2 = pb.weight.view({pb.C_out, Rg});

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pb.input.scalar_type(), "erftool_deform_forward_cuda", [&] {
        using cu_t = typename CudaType<scalar_t>::type;
        for (int64_t n0 = 0; n0 < pb.N; n0 += nb) {
          const int64_t cur = std::min(nb, pb.N - n0);
          const int64_t cols = cur * P;
          at::Tensor columns = buffer.narrow(0, 0, R * cols).view({R, cols});
          check_launch(
              ek::launch_build_columns<cu_t>(
                  pb.shape(cur, stride, padding, dilation),
                  ptr_or_null<cu_t>(pb.input, true, n0 * CHW),
                  ptr_or_null<cu_t>(pb.kernel_offset, pb.has_ko, n0 * 2 * pb.G * K * P),
                  ptr_or_null<cu_t>(pb.data_offset, pb.has_do, n0 * 2 * pb.DG * K * P),
                  ptr_or_null<cu_t>(pb.mask, pb.has_mask, n0 * pb.DG * K * P),
                  reinterpret_cast<cu_t*>(columns.data_ptr()), stream),
              "build_columns");
          // One product per image, (Og, Rg) @ that image's columns (Rg, P), read
          // in place (leading dimension cur*P) and written straight into the
          // NCHW output: no (Og, cur*P) result to re-lay.
          for (int64_t gw = 0; gw < pb.groups; ++gw) {
            at::Tensor dst = out.narrow(0, n0, cur).narrow(1, gw * Og, Og).view({cur, Og, P});
            at::bmm_out(dst, w2.narrow(0, gw * Og, Og).expand({cur, Og, Rg}),
                        columns.narrow(0, gw * Rg, Rg).view({Rg, cur, P}).transpose(0, 1));
          }
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& kernel_offset, const std::optional<at::Tensor>& data_offset,
    const std::optional<at::Tensor>& mask, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t offset_groups,
    int64_t data_offset_groups, int64_t chunk_bytes, std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Problem pb = make_problem(input, weight, kernel_offset, data_offset, mask, kernel_size,
                                  stride, padding, dilation, groups, offset_groups,
                                  data_offset_groups);
  TORCH_CHECK(grad_output.device() == input.device() &&
                  grad_output.scalar_type() == input.scalar_type(),
              "erftool: grad_output must match the input's device and dtype");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == pb.N &&
                  grad_output.size(1) == pb.C_out && grad_output.size(2) == pb.Ho &&
                  grad_output.size(3) == pb.Wo,
              "erftool: grad_output must have shape (", pb.N, ", ", pb.C_out, ", ", pb.Ho, ", ",
              pb.Wo, "), got ", grad_output.sizes());
  const at::Tensor go = grad_output.contiguous();

  const bool need_input = output_mask[0];
  const bool need_weight = output_mask[1];
  const bool need_ko = output_mask[2] && pb.has_ko;
  const bool need_do = output_mask[3] && pb.has_do;
  const bool need_mask = output_mask[4] && pb.has_mask;
  const bool need_gcols = need_input || need_ko || need_do || need_mask;
  const bool half_type = pb.input.scalar_type() == at::kHalf ||
                         pb.input.scalar_type() == at::kBFloat16;
  const auto opts = pb.input.options();
  const auto acc_opts =
      opts.dtype(pb.input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);

  at::Tensor grad_input, grad_weight, grad_ko, grad_do, grad_mask;
  at::Tensor gin_acc;  // atomics target (data offsets only)
  at::Tensor gw_acc;   // grad_weight accumulator (fp32 for the half types)
  if (need_input) {
    if (pb.has_do) {
      // Scattered with atomics: the summation order, hence the last bits,
      // varies between runs. Raises under torch.use_deterministic_algorithms.
      at::globalContext().alertNotDeterministic(
          "erftool_native::deform_backward (CUDA) input gradient with data offsets");
      if (half_type) {
        gin_acc = at::zeros(pb.input.sizes(), acc_opts);
        grad_input = at::empty(pb.input.sizes(), opts);
      } else {
        grad_input = at::zeros(pb.input.sizes(), opts);
        gin_acc = grad_input;
      }
    } else {
      grad_input = at::empty(pb.input.sizes(), opts);
    }
  }
  if (need_weight) gw_acc = at::zeros({pb.C_out, pb.Rg()}, half_type ? acc_opts : opts);
  if (need_ko) grad_ko = at::empty(pb.kernel_offset.sizes(), opts);
  if (need_do) grad_do = at::empty(pb.data_offset.sizes(), opts);
  if (need_mask) grad_mask = at::empty(pb.mask.sizes(), opts);

  const bool empty = pb.N == 0 || pb.C == 0 || pb.C_out == 0;
  if (empty) {
    if (grad_input.defined()) grad_input.zero_();
    if (grad_ko.defined()) grad_ko.zero_();
    if (grad_do.defined()) grad_do.zero_();
    if (grad_mask.defined()) grad_mask.zero_();
  }
  const bool fused = need_ko || need_do || need_mask || (need_input && pb.has_do);
  if (!empty && (need_gcols || need_weight)) {
    const int64_t nb =
        images_per_chunk(pb, chunk_bytes, int64_t(need_weight) + int64_t(need_gcols));
    const int64_t P = pb.P(), K = pb.K(), R = pb.C * pb.S2(), Rg = pb.Rg(), Og = pb.Og();
    const int64_t CHW = pb.C * pb.H * pb.W;
    // Channel segments of the fused pass (>= lcm(G, DG); more when positions are few).
    const int64_t U = fused ? ek::fused_backward_segments(pb.shape(nb, stride, padding, dilation))
                            : ek::num_segments(pb.G, pb.DG);
    at::Tensor cols_buf = need_weight ? at::empty({R * nb * P}, opts) : at::Tensor();
    at::Tensor gcols_buf = need_gcols ? at::empty({R * nb * P}, opts) : at::Tensor();
    at::Tensor part_ko = need_ko ? at::empty({nb * U * 2 * K * P}, acc_opts) : at::Tensor();
    at::Tensor part_do = need_do ? at::empty({nb * U * 2 * K * P}, acc_opts) : at::Tensor();
    at::Tensor part_mask = need_mask ? at::empty({nb * U * K * P}, acc_opts) : at::Tensor();
    const at::Tensor w2 = pb.weight.view({pb.C_out, Rg});
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, pb.input.scalar_type(), "erftool_deform_backward_cuda", [&] {
          using cu_t = typename CudaType<scalar_t>::type;
          using acc_cu = ek::acc_t<cu_t>;
          for (int64_t n0 = 0; n0 < pb.N; n0 += nb) {
            const int64_t cur = std::min(nb, pb.N - n0);
            const int64_t cols = cur * P;
            const ek::DeformShape shape = pb.shape(cur, stride, padding, dilation);
            const cu_t* in_p = ptr_or_null<cu_t>(pb.input, true, n0 * CHW);
            const cu_t* ko_p = ptr_or_null<cu_t>(pb.kernel_offset, pb.has_ko, n0 * 2 * pb.G * K * P);
            const cu_t* do_p = ptr_or_null<cu_t>(pb.data_offset, pb.has_do, n0 * 2 * pb.DG * K * P);
            const cu_t* m_p = ptr_or_null<cu_t>(pb.mask, pb.has_mask, n0 * pb.DG * K * P);

            at::Tensor columns, gcols;
            if (need_weight) {
              columns = cols_buf.narrow(0, 0, R * cols).view({R, cols});
              check_launch(ek::launch_build_columns<cu_t>(shape, in_p, ko_p, do_p, m_p,
                                                          reinterpret_cast<cu_t*>(columns.data_ptr()),
                                                          stream),
                           "build_columns");
            }
            if (need_gcols) gcols = gcols_buf.narrow(0, 0, R * cols).view({R, cols});

            // Every weight group's two products in one batched call each (the
            // groups in the batch: one launch, not one per group, which for a
            // depthwise layer is one per channel), grad_out re-laid once as
            // (groups, C_out/groups, cur*P).
            const at::Tensor go_chunk = go.narrow(0, n0, cur);
            const at::Tensor go_g =
                go_chunk.transpose(0, 1).reshape({pb.groups, Og, cols});  // a view when cur == 1
            if (need_gcols) {
              at::Tensor dst = gcols.view({pb.groups, Rg, cols});
              at::bmm_out(dst, w2.view({pb.groups, Og, Rg}).transpose(1, 2), go_g);
            }
            if (need_weight) {
              at::Tensor acc = gw_acc.view({pb.groups, Og, Rg});
              const at::Tensor cols_t = columns.view({pb.groups, Rg, cols}).transpose(1, 2);
              if (half_type) {
                acc.add_(at::bmm(go_g, cols_t));
              } else {
                acc.baddbmm_(go_g, cols_t);
              }
            }

            const cu_t* gc_p = need_gcols ? reinterpret_cast<const cu_t*>(gcols.const_data_ptr())
                                          : nullptr;
            if (fused) {
              acc_cu* gin_p = (need_input && pb.has_do)
                                  ? reinterpret_cast<acc_cu*>(gin_acc.data_ptr()) + n0 * CHW
                                  : nullptr;
              check_launch(
                  ek::launch_backward_fused<cu_t>(
                      shape, U, gc_p, in_p, ko_p, do_p, m_p,
                      need_ko ? reinterpret_cast<acc_cu*>(part_ko.data_ptr()) : nullptr,
                      need_do ? reinterpret_cast<acc_cu*>(part_do.data_ptr()) : nullptr,
                      need_mask ? reinterpret_cast<acc_cu*>(part_mask.data_ptr()) : nullptr,
                      gin_p, stream),
                  "backward_fused");
            }
            if (need_input && !pb.has_do) {
              check_launch(ek::launch_grad_input_rigid<cu_t>(
                               shape, gc_p, ko_p, m_p,
                               reinterpret_cast<cu_t*>(grad_input.data_ptr()) + n0 * CHW, stream),
                           "grad_input_rigid");
            }
            if (need_ko) {
              check_launch(ek::launch_reduce_segments<cu_t>(
                               cur, U, pb.G, 2 * K, P,
                               reinterpret_cast<const acc_cu*>(part_ko.const_data_ptr()),
                               reinterpret_cast<cu_t*>(grad_ko.data_ptr()) + n0 * 2 * pb.G * K * P,
                               stream),
                           "reduce_segments");
            }
            if (need_do) {
              check_launch(ek::launch_reduce_segments<cu_t>(
                               cur, U, pb.DG, 2 * K, P,
                               reinterpret_cast<const acc_cu*>(part_do.const_data_ptr()),
                               reinterpret_cast<cu_t*>(grad_do.data_ptr()) + n0 * 2 * pb.DG * K * P,
                               stream),
                           "reduce_segments");
            }
            if (need_mask) {
              check_launch(ek::launch_reduce_segments<cu_t>(
                               cur, U, pb.DG, K, P,
                               reinterpret_cast<const acc_cu*>(part_mask.const_data_ptr()),
                               reinterpret_cast<cu_t*>(grad_mask.data_ptr()) + n0 * pb.DG * K * P,
                               stream),
                           "reduce_segments");
            }
          }
          if (need_input && pb.has_do && half_type) {
            check_launch(ek::launch_cast<cu_t>(reinterpret_cast<const acc_cu*>(gin_acc.const_data_ptr()),
                                               reinterpret_cast<cu_t*>(grad_input.data_ptr()),
                                               gin_acc.numel(), stream),
                         "cast");
          }
        });
  }
  if (need_weight) grad_weight = gw_acc.to(pb.input.scalar_type()).view(pb.weight.sizes());
  return std::make_tuple(grad_input, grad_weight, grad_ko, grad_do, grad_mask);
}

at::Tensor global_kernels_cuda(const at::Tensor& weight, const at::Tensor& offset,
                               at::IntArrayRef kernel_size, int64_t groups,
                               int64_t offset_groups, bool tap_major) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const erftool::math::GlobalKernelShape shape =
      erftool::global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  const at::Tensor w = weight.contiguous(), off = offset.contiguous();
  at::Tensor out = erftool::empty_global_kernels(weight, shape, tap_major);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "erftool_global_kernels_cuda", [&] {
        using cu_t = typename CudaType<scalar_t>::type;
        check_launch(ek::launch_global_kernels<cu_t>(
                         shape, tap_major, reinterpret_cast<const cu_t*>(w.const_data_ptr()),
                         reinterpret_cast<const cu_t*>(off.const_data_ptr()),
                         reinterpret_cast<cu_t*>(out.data_ptr()), stream),
                     "global_kernels");
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> global_kernels_backward_cuda(
    const at::Tensor& grad_kernels, const at::Tensor& weight, const at::Tensor& offset,
    at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups, bool tap_major,
    std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const erftool::math::GlobalKernelShape shape =
      erftool::global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  erftool::check_grad_kernels(grad_kernels, weight, shape, tap_major);
  const at::Tensor g = grad_kernels.contiguous(), w = weight.contiguous();
  const at::Tensor off = offset.contiguous();
  at::Tensor grad_weight, grad_offset;
  if (output_mask[0]) grad_weight = at::empty_like(w);
  if (output_mask[1]) grad_offset = at::empty_like(off);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "erftool_global_kernels_backward_cuda",
      [&] {
        using cu_t = typename CudaType<scalar_t>::type;
        auto out = [](at::Tensor& t) {
          return t.defined() ? reinterpret_cast<cu_t*>(t.data_ptr()) : nullptr;
        };
        check_launch(ek::launch_global_kernels_backward<cu_t>(
                         shape, tap_major, reinterpret_cast<const cu_t*>(g.const_data_ptr()),
                         reinterpret_cast<const cu_t*>(w.const_data_ptr()),
                         reinterpret_cast<const cu_t*>(off.const_data_ptr()), out(grad_weight),
                         out(grad_offset), stream),
                     "global_kernels_backward");
      });
  return {grad_weight, grad_offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(erftool_native, CUDA, m) {
  m.impl("deform_forward", &deform_forward_cuda);
  m.impl("deform_backward", &deform_backward_cuda);
  m.impl("global_kernels", &global_kernels_cuda);
  m.impl("global_kernels_backward", &global_kernels_backward_cuda);
}
