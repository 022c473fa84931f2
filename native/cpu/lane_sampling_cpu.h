// Bilinear corners of runs of positions along an output row, lane-parallel
// (one position per vector lane): the scope corners of every tap's kernel
// offsets, the data corners of its data offsets (or its rigid pixel) and its
// mask, read from the offsets' contiguous rows. The CPU kernels that take a
// run at a time (dense_rows_cpu.h, lane_backward_cpu.h) sample here, and so
// do the depthwise passes, position by position (RunSampler).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "deform_cpu_kernels.h"
#include "vector_cpu.h"

namespace erftool {
namespace cpu {

// Lanes l < run of channel ch of one image's (channels, Ho, Wo) plane at
// output position q (P = Ho * Wo); zero past the run.
template <typename T>
ERFTOOL_ALWAYS_INLINE typename RegisterVector<T>::type plane_lanes(const T* plane, int64_t ch,
                                                                   int64_t P, int64_t q,
                                                                   int64_t run) {
  using V = typename RegisterVector<T>::type;
  const T* p = plane + ch * P + q;
  if (run == RegisterVector<T>::kLanes) return load_vector<V>(p);
  V v{};
  for (int64_t l = 0; l < run; ++l) v[l] = p[l];
  return v;
}

// f(p, n, y, x, run) for the runs of positions [p0, p1) splits into: at
// most R (one vector's lanes) positions along one output row each.
template <typename T, typename F>
ERFTOOL_ALWAYS_INLINE void for_each_run(const Ctx<T>& c, int64_t p0, int64_t p1, const F& f) {
  for (int64_t p = p0; p < p1;) {
    int64_t n, y, x;
    decode(c, p, &n, &y, &x);
    const int64_t run = std::min<int64_t>({RegisterVector<T>::kLanes, p1 - p, c.g->Wo - x});
    f(p, n, y, x, run);
    p += run;
  }
}

// The four corners of R samples on an H x W grid, corner-major, lane last:
// those of math::bilinear_corners (same order and arithmetic), absent ones
// at index 0 with weight and slopes 0 and present[] false.
template <typename T>
struct LaneCorners {
  static constexpr int R = RegisterVector<T>::kLanes;
  using Lane = typename RegisterVector<T>::int_lane;
  T weight[4 * R], d_dy[4 * R], d_dx[4 * R];
  int64_t index[4 * R];  // y * W + x in 64 bits, whatever T's width
  Lane present[4 * R];   // -1 / 0

  ERFTOOL_ALWAYS_INLINE void sample(typename RegisterVector<T>::type y,
                                    typename RegisterVector<T>::type x, int64_t H, int64_t W) {
    using V = typename RegisterVector<T>::type;
    using I = typename RegisterVector<T>::int_type;
    const Lane h = static_cast<Lane>(H), w_ = static_cast<Lane>(W);
    const I inside = (y > T(-1)) & (y < T(H)) & (x > T(-1)) & (x < T(W));  // NaN fails
    const V uy = inside ? y : V{}, ux = inside ? x : V{};
    const V y0 = floor_lanes<V, I>(uy), x0 = floor_lanes<V, I>(ux);
    const V ly = uy - y0, lx = ux - x0;
    const V hy = T(1) - ly, hx = T(1) - lx;
    const I iy0 = __builtin_convertvector(y0, I), ix0 = __builtin_convertvector(x0, I);
    const I ys[4] = {iy0, iy0, iy0 + 1, iy0 + 1}, xs[4] = {ix0, ix0 + 1, ix0, ix0 + 1};
    const V w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
    const V wy[4] = {-hx, -lx, hx, lx};
    const V wx[4] = {-hy, hy, -ly, ly};
    for (int i = 0; i < 4; ++i) {
      const I on = inside & (ys[i] >= 0) & (ys[i] < h) & (xs[i] >= 0) & (xs[i] < w_);
      store_vector(weight + i * R, on ? w[i] : V{});
      store_vector(d_dy + i * R, on ? wy[i] : V{});
      store_vector(d_dx + i * R, on ? wx[i] : V{});
      store_vector(present + i * R, on);
      for (int l = 0; l < R; ++l)
        index[i * R + l] = on[l] ? static_cast<int64_t>(ys[i][l]) * W + xs[i][l] : 0;
    }
  }

  // Lane l's corners as math::bilinear_corners gives them.
  BilinearCorners<T> corners(int64_t l) const {
    BilinearCorners<T> c;
    for (int i = 0; i < 4; ++i) {
      c.index[i] = present[i * R + l] ? index[i * R + l] : -1;
      c.weight[i] = weight[i * R + l];
      c.d_dy[i] = d_dy[i * R + l];
      c.d_dx[i] = d_dx[i * R + l];
    }
    return c;
  }
};

// Corners, pixels and mask of every tap and group for a run of R positions.
template <typename T>
struct LaneRun {
  static constexpr int R = RegisterVector<T>::kLanes;
  std::vector<LaneCorners<T>> scope;  // (G, K), with kernel offsets (when asked for)
  std::vector<LaneCorners<T>> data;   // (DG, K), with data offsets
  std::vector<int64_t> pixel;         // (K, R) on a rigid grid: y * W + x, or -1
  std::vector<T> mask;                // (DG, K, R)
  bool scope_corners;

  LaneRun(const Geometry& g, bool with_scope_corners)
      : scope(g.has_koff && with_scope_corners ? g.G * g.K : 0),
        data(g.has_doff ? g.DG * g.K : 0), pixel(g.has_doff ? 0 : g.K * R),
        mask(g.has_mask ? g.DG * g.K * R : 0), scope_corners(!scope.empty()) {}

  // Lane l's data corners of tap t, data group dg (the rigid pixel as one
  // corner without data offsets), and its mask.
  BilinearCorners<T> tap_corners(const Geometry& g, int64_t dg, int64_t t, int64_t l) const {
    if (g.has_doff) return data[dg * g.K + t].corners(l);
    const int64_t px = pixel[t * R + l];
    return pixel_corner<T>(px >= 0 ? px / g.W : -1, px >= 0 ? px % g.W : 0, g.H, g.W);  // -1: none
  }
  T tap_mask(const Geometry& g, int64_t dg, int64_t t, int64_t l) const {
    return g.has_mask ? mask[(dg * g.K + t) * R + l] : T(1);
  }

  // Positions (n, y, x + l), l < run.
  void sample(const Ctx<T>& c, int64_t n, int64_t y, int64_t x, int64_t run) {
    using V = typename RegisterVector<T>::type;
    const Geometry& g = *c.g;
    const int64_t P = g.plane(), q = y * g.Wo + x;
    auto lanes = [&](const T* plane, int64_t ch) { return plane_lanes(plane, ch, P, q, run); };
    V lane_index{};
    for (int l = 0; l < R; ++l) lane_index[l] = T(l);
    for (int64_t a = 0; a < g.Kh; ++a)
      for (int64_t b = 0; b < g.Kw; ++b) {
        const int64_t t = a * g.Kw + b;
        for (int64_t kg = 0; kg < (scope_corners ? g.G : 0); ++kg) {
          const T* off = c.koff + n * 2 * g.G * g.K * P;
          scope[kg * g.K + t].sample(
              math::scope_coordinate<T>(a, g.Kh, g.Sh, T(0)) + lanes(off, kg * 2 * g.K + 2 * t),
              math::scope_coordinate<T>(b, g.Kw, g.Sw, T(0)) + lanes(off, kg * 2 * g.K + 2 * t + 1),
              g.Sh, g.Sw);
        }
        const int64_t iy = y * g.sh - g.ph + a * g.dh, ix = x * g.sw - g.pw + b * g.dw;
        for (int64_t dg = 0; dg < (g.has_doff ? g.DG : 0); ++dg) {
          const T* off = c.doff + n * 2 * g.DG * g.K * P;
          data[dg * g.K + t].sample(
              T(iy) + lanes(off, dg * 2 * g.K + 2 * t),
              (T(ix) + lane_index * T(g.sw)) + lanes(off, dg * 2 * g.K + 2 * t + 1), g.H, g.W);
        }
        if (!g.has_doff)
          for (int64_t l = 0; l < R; ++l) {
            const int64_t px = ix + l * g.sw;
            const bool on = l < run && iy >= 0 && iy < g.H && px >= 0 && px < g.W;
            pixel[t * R + l] = on ? iy * g.W + px : -1;
          }
        for (int64_t dg = 0; dg < (g.has_mask ? g.DG : 0); ++dg)
          store_vector(mask.data() + (dg * g.K + t) * R,
                       lanes(c.mask + n * g.DG * g.K * P, dg * g.K + t));
      }
  }
};

// sample_tap's corners for a per-position kernel (the depthwise passes),
// taken from runs of positions sampled lane-parallel: at(n, y, x) moves to a
// position (sampling the run from there to at most R positions along its
// row when it leaves the current one); tap(a, b, s) then fills s as
// sample_tap(c, n, y, x, a, b, s) does, with the same corners.
template <typename T>
struct RunSampler {
  static constexpr int R = RegisterVector<T>::kLanes;
  const Ctx<T>& c;
  LaneRun<T> run;
  std::vector<BilinearCorners<T>> centred;  // (K): the taps' corners without kernel offsets
  int64_t n = -1, y = -1, x0 = 0, len = 0, lane = 0;

  explicit RunSampler(const Ctx<T>& ctx) : c(ctx), run(*ctx.g, true) {
    const Geometry& g = *c.g;
    if (g.has_koff) return;
    for (int64_t a = 0; a < g.Kh; ++a)
      for (int64_t b = 0; b < g.Kw; ++b)
        centred.push_back(math::bilinear_corners<T>(math::scope_coordinate<T>(a, g.Kh, g.Sh, T(0)),
                                                    math::scope_coordinate<T>(b, g.Kw, g.Sw, T(0)),
                                                    g.Sh, g.Sw));
  }

  ERFTOOL_ALWAYS_INLINE void at(int64_t n_, int64_t y_, int64_t x_) {
    if (n_ != n || y_ != y || x_ < x0 || x_ >= x0 + len) {
      n = n_, y = y_, x0 = x_;
      len = std::min<int64_t>(R, c.g->Wo - x_);
      run.sample(c, n, y, x0, len);
    }
    lane = x_ - x0;
  }

  ERFTOOL_ALWAYS_INLINE void tap(int64_t a, int64_t b, Scratch<T>& s) const {
    const Geometry& g = *c.g;
    const int64_t t = a * g.Kw + b;
    for (int64_t kg = 0; kg < g.G; ++kg)
      s.kc[kg] = g.has_koff ? run.scope[kg * g.K + t].corners(lane) : centred[t];
    for (int64_t dg = 0; dg < g.DG; ++dg) {
      s.dc[dg] = run.tap_corners(g, dg, t, lane);
      s.m[dg] = run.tap_mask(g, dg, t, lane);
    }
  }
};

}  // namespace cpu
}  // namespace erftool
