// Per-element arithmetic shared by the CPU and CUDA kernels of erftool.
//
// Everything here is a pure function of scalars so that it compiles for the
// host (the CPU kernels, exercised by the CPU test-suite) and for the device
// (the CUDA kernels). No torch headers: the CUDA translation units must
// compile against the CUDA runtime alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ERFTOOL_HD __host__ __device__ __forceinline__
#else
#define ERFTOOL_HD inline
#endif

namespace erftool {
namespace math {

// The four grid corners around a real-valued sample (y, x) on an H x W grid
// whose cells outside the grid count as zero (DCN's convention, also used for
// the kernel scope of a Deformable Kernel):
//   * a sample with y <= -1, x <= -1, y >= H or x >= W is exactly zero;
//   * otherwise each of the four corners contributes when it lies inside.
// NaN or infinite coordinates fail the range test and give zero, so no kernel
// can read out of bounds whatever the offsets hold.
//
// `index[i]` is the flat index y * W + x of corner i, or -1 when the corner
// lies outside; `weight[i]` its interpolation weight; `d_dy[i]` / `d_dx[i]`
// the derivative of weight[i] with respect to y / x (one-sided at integers:
// the floor is taken as locally constant, as every DCN implementation does).
template <typename T>
struct BilinearCorners {
  int64_t index[4];
  T weight[4];
  T d_dy[4];
  T d_dx[4];
};

template <typename T>
ERFTOOL_HD BilinearCorners<T> bilinear_corners(T y, T x, int64_t H, int64_t W) {
  BilinearCorners<T> c;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    c.index[i] = -1;
    c.weight[i] = T(0);
    c.d_dy[i] = T(0);
    c.d_dx[i] = T(0);
  }
  // Written so that NaN fails every comparison and lands here.
  if (!(y > T(-1) && x > T(-1) && y < T(H) && x < T(W))) return c;

  const T y0f = floor(y);
  const T x0f = floor(x);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const T ly = y - y0f, lx = x - x0f;
  const T hy = T(1) - ly, hx = T(1) - lx;

  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const T wy[4] = {-hx, -lx, hx, lx};
  const T wx[4] = {-hy, hy, -ly, ly};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (ys[i] >= 0 && ys[i] < H && xs[i] >= 0 && xs[i] < W) {
      c.index[i] = ys[i] * W + xs[i];
      c.weight[i] = w[i];
      c.d_dy[i] = wy[i];
      c.d_dx[i] = wx[i];
    }
  }
  return c;
}

// Value of a zero-padded bilinear sample of `plane` (H x W, row-major).
template <typename T, typename Acc = T>
ERFTOOL_HD Acc bilinear_sample(const T* plane, const BilinearCorners<Acc>& c) {
  Acc v = Acc(0);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (c.index[i] >= 0) v += c.weight[i] * static_cast<Acc>(plane[c.index[i]]);
  return v;
}

// d(sample)/dy and d(sample)/dx of the same sample.
template <typename T, typename Acc = T>
ERFTOOL_HD void bilinear_sample_grad(const T* plane, const BilinearCorners<Acc>& c,
                                     Acc* dy, Acc* dx) {
  Acc gy = Acc(0), gx = Acc(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (c.index[i] >= 0) {
      const Acc v = static_cast<Acc>(plane[c.index[i]]);
      gy += c.d_dy[i] * v;
      gx += c.d_dx[i] * v;
    }
  }
  *dy = gy;
  *dx = gx;
}

// Scope position sampled by kernel tap `a` (along one axis) of a K-tap kernel
// resampled from an S-cell scope: the kernel sits centred in the scope, so
// with zero offset tap a reads scope coordinate a + (S - K) / 2 (a half-integer
// when S - K is odd: the tap then averages neighbouring scope cells).
template <typename T>
ERFTOOL_HD T scope_coordinate(int64_t a, int64_t K, int64_t S, T delta) {
  return static_cast<T>(a) + static_cast<T>(S - K) * T(0.5) + delta;
}

// Tap-to-scope scatter: column[s * stride] += weight_s * value for the (up to
// four) scope cells s a kernel tap's sample touches. This is the inner step of
// the column form of a local Deformable Kernel,
//   T[c, s, j] = sum_k a[j, k, s] * I[c, j + k].
template <typename T, typename Acc>
ERFTOOL_HD void scatter_to_scope(const BilinearCorners<Acc>& c, Acc value, T* column,
                                 int64_t stride) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (c.index[i] >= 0)
      column[c.index[i] * stride] += static_cast<T>(c.weight[i] * value);
}

// The transpose of scatter_to_scope: sum_s weight_s * column[s * stride].
template <typename T, typename Acc>
ERFTOOL_HD Acc gather_from_scope(const BilinearCorners<Acc>& c, const T* column,
                                 int64_t stride) {
  Acc v = Acc(0);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (c.index[i] >= 0) v += c.weight[i] * static_cast<Acc>(column[c.index[i] * stride]);
  return v;
}

// d/d(delta_y), d/d(delta_x) of gather_from_scope: the derivative of the
// sampled kernel value with respect to the tap's offset.
template <typename T, typename Acc>
ERFTOOL_HD void gather_from_scope_grad(const BilinearCorners<Acc>& c, const T* column,
                                       int64_t stride, Acc* dy, Acc* dx) {
  Acc gy = Acc(0), gx = Acc(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (c.index[i] >= 0) {
      const Acc v = static_cast<Acc>(column[c.index[i] * stride]);
      gy += c.d_dy[i] * v;
      gx += c.d_dx[i] * v;
    }
  }
  *dy = gy;
  *dx = gx;
}

}  // namespace math
}  // namespace erftool
