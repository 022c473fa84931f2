// Vectors of T in the GCC / Clang vector extension: arithmetic, comparisons
// (lane masks) and `mask ? a : b` work lane by lane. A vector wider than the
// target's registers is split into several (a 64-byte one into two AVX2
// halves), which doubles the registers a kernel holds.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace erftool {
namespace cpu {

template <typename T, int kBytes>
struct SimdVector {
  static constexpr int kLanes = kBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kBytes)));
  // Integers of T's width, for conversions and lane masks.
  using int_lane = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef int_lane int_type __attribute__((vector_size(kBytes)));
};

template <typename T>
using Vector64 = SimdVector<T, 64>;

// One register of the target (this module is built with -march=native).
#if defined(__AVX512F__)
constexpr int kRegisterBytes = 64;
#elif defined(__AVX__)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif

template <typename T>
using RegisterVector = SimdVector<T, kRegisterBytes>;

// Names a vector type (or T itself, for single channels) to a generic lambda.
template <typename V>
struct VectorTag {
  using type = V;
};

// f(ch, VectorTag<V>{}) over channels [c0, c1): whole register vectors, then
// at most one vector of each narrower width down to 16 bytes, then single
// channels (VectorTag<T>). Blocks of 8 or 4 channels (offset groups of a
// 64-channel layer) then stay in vector code: with only whole vectors and
// single channels, offset_groups 8 on 56x56x64 ran the DK forward 2.8x
// slower than offset_groups 1.
template <typename T, typename F>
inline void for_channel_vectors(int64_t c0, int64_t c1, F&& f) {
  constexpr int R = RegisterVector<T>::kLanes;
  int64_t ch = c0;
  for (; ch + R <= c1; ch += R) f(ch, VectorTag<typename RegisterVector<T>::type>{});
  if constexpr (kRegisterBytes > 32) {
    constexpr int L = SimdVector<T, 32>::kLanes;
    if (ch + L <= c1) f(ch, VectorTag<typename SimdVector<T, 32>::type>{}), ch += L;
  }
  if constexpr (kRegisterBytes > 16) {
    constexpr int L = SimdVector<T, 16>::kLanes;
    if (ch + L <= c1) f(ch, VectorTag<typename SimdVector<T, 16>::type>{}), ch += L;
  }
  for (; ch < c1; ++ch) f(ch, VectorTag<T>{});
}

// floor() lane by lane, for lanes whose values fit T's integers (callers
// first replace NaN and out-of-range lanes).
template <typename V, typename I>
inline V floor_lanes(const V& u) {
  const V trunc = __builtin_convertvector(__builtin_convertvector(u, I), V);
  return trunc > u ? trunc - 1 : trunc;
}

// Sum of the lanes.
template <typename V>
inline auto sum_lanes(const V& v) {
  auto s = v[0];
  for (int i = 1; i < static_cast<int>(sizeof(V) / sizeof(s)); ++i) s += v[i];
  return s;
}

// Unaligned load / store of a whole vector.
template <typename V, typename T>
inline V load_vector(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store_vector(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace cpu
}  // namespace erftool
