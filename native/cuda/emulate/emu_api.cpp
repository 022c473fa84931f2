// C entry points of the emulated launchers (ctypes, see emulate.py) and stubs
// of the CUDA runtime calls they make: one device with 2 multiprocessors
// (ERFTOOL_EMU_SMS overrides) and 227 KiB of opt-in shared memory per block.
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include "deform_kernels.cuh"
using namespace erftool::cuda;
extern "C" {
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  if (a == cudaDevAttrMultiProcessorCount) {
    const char* sms = std::getenv("ERFTOOL_EMU_SMS");  // more SMs: more channel splits
    *v = sms ? std::atoi(sms) : 2;
  }
  else if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = 227 * 1024;
  else *v = 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
}
static DeformShape mk(const long* p) {
  DeformShape s;
  s.nb = p[0]; s.C = p[1]; s.H = p[2]; s.W = p[3]; s.Ho = p[4]; s.Wo = p[5];
  s.kh = p[6]; s.kw = p[7]; s.scope_h = p[8]; s.scope_w = p[9];
  s.stride_h = p[10]; s.stride_w = p[11]; s.pad_h = p[12]; s.pad_w = p[13];
  s.dil_h = p[14]; s.dil_w = p[15]; s.G = p[16]; s.DG = p[17];
  return s;
}
#define API(T, S)                                                                              \
  extern "C" int build_##S(const long* p, const T* in, const T* ko, const T* dof, const T* m, \
                           T* cols) {                                                          \
    return launch_build_columns<T>(mk(p), in, ko, dof, m, cols, nullptr);                      \
  }                                                                                            \
  extern "C" int depthwise_##S(const long* p, long multiplier, const T* in, const T* w,      \
                               const T* ko, const T* dof, const T* m, T* out) {                \
    return launch_depthwise_forward<T>(mk(p), multiplier, in, w, ko, dof, m, out, nullptr);    \
  }                                                                                            \
  extern "C" long segments_##S(const long* p) { return fused_backward_segments(mk(p)); }      \
  extern "C" int fused_##S(const long* p, long V, const T* gc, const T* in, const T* ko, const T* dof, \
                           const T* m, acc_t<T>* pko, acc_t<T>* pdo, acc_t<T>* pm,             \
                           acc_t<T>* gin) {                                                    \
    return launch_backward_fused<T>(mk(p), V, gc, in, ko, dof, m, pko, pdo, pm, gin, nullptr);    \
  }                                                                                            \
  extern "C" int rigid_##S(const long* p, const T* gc, const T* ko, const T* m, T* gin) {     \
    return launch_grad_input_rigid<T>(mk(p), gc, ko, m, gin, nullptr);                         \
  }                                                                                            \
  extern "C" int kernels_##S(const long* p, int tap_major, const T* w, const T* off, T* out) { \
    const erftool::math::GlobalKernelShape s{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],   \
                                             p[8]};                                             \
    return launch_global_kernels<T>(s, tap_major != 0, w, off, out, nullptr);                  \
  }                                                                                            \
  extern "C" int kernels_backward_##S(const long* p, int tap_major, const T* grad, const T* w, \
                                      const T* off, T* gw, T* goff) {                          \
    const erftool::math::GlobalKernelShape s{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],   \
                                             p[8]};                                             \
    return launch_global_kernels_backward<T>(s, tap_major != 0, grad, w, off, gw, goff,        \
                                             nullptr);                                          \
  }                                                                                            \
  extern "C" int reduce_##S(long nb, long U, long G, long J, long P, const acc_t<T>* part,     \
                            T* out) {                                                          \
    return launch_reduce_segments<T>(nb, U, G, J, P, part, out, nullptr);                      \
  }                                                                                            \
  extern "C" int cast_##S(const acc_t<T>* src, T* dst, long n) {                               \
    return launch_cast<T>(src, dst, n, nullptr);                                               \
  }
API(double, f64)
API(float, f32)
API(__half, f16)
API(__nv_bfloat16, bf16)
