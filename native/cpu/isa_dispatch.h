// Run-time ISA dispatch of the CPU kernels' hot loops.
//
// The extension is built without -march flags (it must load on any x86-64):
// ERFTOOL_ISA_VARIANTS(f) defines f_isa<T>(args...), which runs f<T> compiled
// for AVX2+FMA where the CPU has them and for the baseline ISA elsewhere. f
// must be ERFTOOL_ALWAYS_INLINE so that its body is compiled into each variant.
#pragma once

namespace erftool {
namespace cpu {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ERFTOOL_AVX2_TARGET __attribute__((target("avx2,fma")))
inline bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
#define ERFTOOL_AVX2_TARGET
inline bool use_avx2() { return false; }
#endif

#define ERFTOOL_ISA_VARIANTS(name)                                              \
  template <typename T, typename... A>                                          \
  ERFTOOL_AVX2_TARGET void name##_avx2(A... a) {                                \
    name<T>(a...);                                                              \
  }                                                                             \
  template <typename T, typename... A>                                          \
  void name##_base(A... a) {                                                    \
    name<T>(a...);                                                              \
  }                                                                             \
  template <typename T, typename... A>                                          \
  void name##_isa(A... a) {                                                     \
    if (use_avx2())                                                             \
      name##_avx2<T>(a...);                                                     \
    else                                                                        \
      name##_base<T>(a...);                                                     \
  }

}  // namespace cpu
}  // namespace erftool
