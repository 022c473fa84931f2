// Operator schemas of the native module and its Python entry point.
//
// The kernels register themselves per backend (cpu/deform_cpu.cpp for CPU,
// cuda/deform_cuda.cpp for CUDA; composite/ for compositions of ATen
// operations that serve every device). Python (erftool/ops) wraps these native ops
// in the public custom operators erftool::deform_kernel2d and
// erftool::deform_conv2d, which carry the fake kernels and the autograd.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(erftool_native, m) {
  // One column-form implementation serves every operator:
  //   kernel_offset: None (centred scope resample) or local
  //                  (N, 2*G*Kh*Kw, Ho, Wo), G = offset_groups;
  //   data_offset:   None (rigid data grid) or (N, 2*DG*Kh*Kw, Ho, Wo);
  //   mask:          None or (N, DG*Kh*Kw, Ho, Wo) (DCNv2 modulation).
  // The scope (S_h, S_w) is the weight's spatial shape. Bias is added by the
  // caller. chunk_bytes bounds the column buffer.
  m.def(
      "deform_forward(Tensor input, Tensor weight, Tensor? kernel_offset, "
      "Tensor? data_offset, Tensor? mask, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int offset_groups, "
      "int data_offset_groups, int chunk_bytes) -> Tensor");
  // Returns (grad_input, grad_weight, grad_kernel_offset, grad_data_offset,
  // grad_mask); an entry is an undefined tensor (None in Python) when
  // output_mask says it is not needed or its input was None.
  m.def(
      "deform_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor? kernel_offset, Tensor? data_offset, Tensor? mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int offset_groups, int data_offset_groups, int chunk_bytes, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Global Deformable Kernel: each image's kernels, the scope weight
  // resampled at the image's offsets (N, 2*G*Kh*Kw); channel-major
  // (N, C_out, C_in/groups, Kh*Kw) or tap-major (Kh*Kw, N, C_out, C_in/groups)
  // (math::global_kernel_corners / global_kernel_value in
  // native/include/erftool/deform_math.h).
  m.def(
      "global_kernels(Tensor weight, Tensor offset, int[2] kernel_size, int groups, "
      "int offset_groups, bool tap_major) -> Tensor");
  // Its gradients (weight, offset) from that of the kernels (same layout);
  // undefined where output_mask is false.
  m.def(
      "global_kernels_backward(Tensor grad_kernels, Tensor weight, Tensor offset, "
      "int[2] kernel_size, int groups, int offset_groups, bool tap_major, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // Global Deformable Kernel forward as batched matrix products, any device
  // (composite/global_gemm.cpp); layout "one_product" or "tap_sums". Bias is
  // added by the caller.
  m.def(
      "global_gemm_forward(Tensor input, Tensor weight, Tensor offset, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int offset_groups, "
      "str layout, int images_per_chunk) -> Tensor");
  // Its gradients (input, weight, offset); undefined where output_mask is
  // false.
  m.def(
      "global_gemm_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor offset, "
      "int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int offset_groups, int images_per_chunk, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

namespace {

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool has_cuda_kernels() {
#ifdef ERFTOOL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "erftool native operators (registered under torch.ops.erftool_native)";
  m.def("has_openmp", &has_openmp, "Whether the CPU kernels were built with OpenMP");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP's thread count");
  m.def("has_cuda_kernels", &has_cuda_kernels, "Whether the CUDA kernels were built in");
}
