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

// One axis of a zero-padded bilinear sample: coordinate u on an S-cell axis
// reads cell `lo` with weight 1 - frac and cell lo + 1 with weight frac
// (either may lie outside [0, S) and then counts as zero). `inside` is false,
// and the whole sample zero, for u <= -1, u >= S or a NaN u.
template <typename T>
struct AxisSample {
  bool inside;
  int64_t lo;
  T frac;
};

template <typename T>
ERFTOOL_HD AxisSample<T> axis_sample(T u, int64_t S) {
  // Written so that NaN fails the comparison.
  if (!(u > T(-1) && u < T(S))) return AxisSample<T>{false, 0, T(0)};
  const T f = floor(u);
  return AxisSample<T>{true, static_cast<int64_t>(f), u - f};
}

// The weights of cells 0 .. N-1 of that axis (N a compile-time bound; cells
// at or beyond S weigh 0): a dense row whose outer product with the other
// axis's row holds the bilinear_corners weights (below) of the sample, for
// kernels that keep a small scope in registers.
template <int N, typename T>
ERFTOOL_HD void axis_weights(const AxisSample<T>& a, int64_t S, T* w) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool lo = a.inside && i == a.lo, hi = a.inside && i == a.lo + 1;
    w[i] = i >= S ? T(0) : (lo ? T(1) - a.frac : (hi ? a.frac : T(0)));
  }
}

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
  const AxisSample<T> sy = axis_sample(y, H), sx = axis_sample(x, W);
  if (!(sy.inside && sx.inside)) return c;

  const int64_t y0 = sy.lo, x0 = sx.lo;
  const T ly = sy.frac, lx = sx.frac;
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

// A global Deformable Kernel's per-image kernels: the scope weight
// (C_out, C_in/groups, S_h, S_w) resampled at each image's offsets
// (N, 2*G*K_h*K_w), one bilinear sample per (image, output channel, input
// channel, tap), laid out in one of two ways (global_kernel_index):
//   * channel-major (N, C_out, C_in/groups, K): per image and group an
//     (C_out/groups) x (C_in/groups * K) matrix, im2col's column order, and
//     the weight of a convolution with the batch folded into the groups;
//   * tap-major (K, N, C_out, C_in/groups): per tap one contiguous batch of
//     every image's matrices.
struct GlobalKernelShape {
  int64_t n, c_out, cg, groups, offset_groups;
  int64_t kh, kw, scope_h, scope_w;
};

// Offset group of kernel entry (o, c): that of its input channel.
ERFTOOL_HD int64_t global_kernel_group(const GlobalKernelShape& s, int64_t o, int64_t c) {
  const int64_t channel = (o / (s.c_out / s.groups)) * s.cg + c;
  return channel / (s.groups * s.cg / s.offset_groups);
}

// The scope sample that tap k of offset group g reads in image n: `offset(i)`
// loads flat element i of the offsets (N, 2*G*K) as T. Shared by every
// kernel entry of the group.
template <typename T, typename LoadOffset>
ERFTOOL_HD BilinearCorners<T> global_kernel_corners(const GlobalKernelShape& s, int64_t n,
                                                    int64_t g, int64_t k, LoadOffset offset) {
  const int64_t at = ((n * s.offset_groups + g) * s.kh * s.kw + k) * 2;
  return bilinear_corners<T>(scope_coordinate<T>(k / s.kw, s.kh, s.scope_h, offset(at)),
                             scope_coordinate<T>(k % s.kw, s.kw, s.scope_w, offset(at + 1)),
                             s.scope_h, s.scope_w);
}

// The weight of entry (o, c) at those corners: `weight(i)` loads flat element i
// of the scope weight (C_out, C_in/groups, S_h, S_w) as T.
template <typename T, typename LoadWeight>
ERFTOOL_HD T global_kernel_value(const GlobalKernelShape& s, const BilinearCorners<T>& corners,
                                 int64_t o, int64_t c, LoadWeight weight) {
  const int64_t plane = (o * s.cg + c) * s.scope_h * s.scope_w;
  T v = T(0);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (corners.index[i] >= 0) v += corners.weight[i] * weight(plane + corners.index[i]);
  return v;
}

// Flat index of element (n, o, c, k) in either layout.
ERFTOOL_HD int64_t global_kernel_index(const GlobalKernelShape& s, bool tap_major, int64_t n,
                                       int64_t o, int64_t c, int64_t k) {
  const int64_t taps = s.kh * s.kw;
  return tap_major ? ((k * s.n + n) * s.c_out + o) * s.cg + c
                   : ((n * s.c_out + o) * s.cg + c) * taps + k;
}

// d value / d row and d value / d col of entry (o, c)'s sample at those
// corners (the offset's two components move the sample by the same amount).
template <typename T, typename LoadWeight>
ERFTOOL_HD void global_kernel_slopes(const GlobalKernelShape& s,
                                     const BilinearCorners<T>& corners, int64_t o, int64_t c,
                                     LoadWeight weight, T* dy, T* dx) {
  const int64_t plane = (o * s.cg + c) * s.scope_h * s.scope_w;
  T gy = T(0), gx = T(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (corners.index[i] >= 0) {
      const T v = weight(plane + corners.index[i]);
      gy += corners.d_dy[i] * v;
      gx += corners.d_dx[i] * v;
    }
  }
  *dy = gy;
  *dx = gx;
}

}  // namespace math
}  // namespace erftool
