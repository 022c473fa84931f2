// The fused backward pass of a local Deformable Kernel on a rigid data grid
// (kernel offsets; no data offsets, no mask): the kernel-offset gradients and
// the input gradient from the column gradient G, for runs of positions along
// an output row.
//
// backward_rows (deform_cpu_kernels.h) serves every layout: per position and
// tap it samples the scope corners, then takes one dot product per corner
// (x . G[cell], a horizontal sum each) and a pass for the input gradient.
// Here the corners of a run's taps are computed lane-parallel, as in
// dense_rows_cpu.h, and each tap makes one pass over the channels that reads
// its input pixel and its four G cells and accumulates, in registers,
//   grad_input[pixel] += sum_i w_i G_i
//   d/d(row offset)   += x * sum_i dw_i/drow G_i   (and the column offset),
// with two horizontal sums per tap and offset group at the end. (The offset
// gradient is sum_i dw_i/drow (x . G_i) regrouped: the same value up to
// rounding.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "deform_cpu_kernels.h"
#include "vector_cpu.h"

namespace erftool {
namespace cpu {

// The layouts this pass serves. It does not build column rows: callers
// build them apart.
inline bool rigid_grid_backward_applies(const Geometry& g) {
  return g.has_koff && !g.has_doff && !g.has_mask && !g.depthwise;
}

// Scope corners of every tap and kernel-offset group for a run of R
// positions, lane last: those of math::bilinear_corners (same order and
// arithmetic), absent corners at cell 0 with weight and slopes 0.
template <typename T>
struct CornerRun {
  static constexpr int R = RegisterVector<T>::kLanes;
  using V = typename RegisterVector<T>::type;
  using I = typename RegisterVector<T>::int_type;
  std::vector<T> weight, d_dy, d_dx;                               // (G, K, 4, R)
  std::vector<typename RegisterVector<T>::int_lane> cell;          // (G, K, 4, R)

  explicit CornerRun(const Geometry& g)
      : weight(g.G * g.K * 4 * R), d_dy(weight.size()), d_dx(weight.size()),
        cell(weight.size()) {}

  // Corners of tap (a, b), group kg, at positions (n, y, x + l), l < run.
  ERFTOOL_ALWAYS_INLINE void sample(const Ctx<T>& c, int64_t n, int64_t y, int64_t x,
                                    int64_t run, int64_t a, int64_t b, int64_t kg) {
    const Geometry& g = *c.g;
    const int64_t P = g.plane(), t = a * g.Kw + b;
    const T* dr = c.koff + (n * 2 * g.G * g.K + kg * 2 * g.K + 2 * t) * P + y * g.Wo + x;
    V u{}, v{};
    if (run == R) {
      u = load_vector<V>(dr);
      v = load_vector<V>(dr + P);
    } else {
      for (int64_t l = 0; l < run; ++l) u[l] = dr[l], v[l] = dr[P + l];
    }
    u = math::scope_coordinate<T>(a, g.Kh, g.Sh, T(0)) + u;
    v = math::scope_coordinate<T>(b, g.Kw, g.Sw, T(0)) + v;
    const T Sh = T(g.Sh), Sw = T(g.Sw);
    const I inside = (u > T(-1)) & (u < Sh) & (v > T(-1)) & (v < Sw);  // NaN fails
    const V uy = inside ? u : V{}, ux = inside ? v : V{};
    const V y0 = floor_lanes<V, I>(uy), x0 = floor_lanes<V, I>(ux);
    const V ly = uy - y0, lx = ux - x0;
    const V hy = T(1) - ly, hx = T(1) - lx;
    const V ys[4] = {y0, y0, y0 + T(1), y0 + T(1)};
    const V xs[4] = {x0, x0 + T(1), x0, x0 + T(1)};
    const V w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
    const V wy[4] = {-hx, -lx, hx, lx};
    const V wx[4] = {-hy, hy, -ly, ly};
    const int64_t at = (kg * g.K + t) * 4 * R;
    for (int i = 0; i < 4; ++i) {
      const I on = inside & (ys[i] >= T(0)) & (ys[i] < Sh) & (xs[i] >= T(0)) & (xs[i] < Sw);
      store_vector(weight.data() + at + i * R, on ? w[i] : V{});
      store_vector(d_dy.data() + at + i * R, on ? wy[i] : V{});
      store_vector(d_dx.data() + at + i * R, on ? wx[i] : V{});
      store_vector(cell.data() + at + i * R,
                   on ? __builtin_convertvector(ys[i] * Sw + xs[i], I) : I{});
    }
  }
};

// One tap of one segment at one position, channels [ch, ch + width of V):
// the input gradient (gin non-null) and the two offset sums.
template <typename V, typename T>
ERFTOOL_ALWAYS_INLINE void tap_channels(int64_t ch, const T* x, const T* const* rows,
                                        const T* w, const T* dy, const T* dx, T* gin,
                                        bool slopes, V& sum_y, V& sum_x) {
  const V g0 = load_vector<V>(rows[0] + ch), g1 = load_vector<V>(rows[1] + ch);
  const V g2 = load_vector<V>(rows[2] + ch), g3 = load_vector<V>(rows[3] + ch);
  if (gin) {
    const V grad = w[0] * g0 + w[1] * g1 + w[2] * g2 + w[3] * g3;
    store_vector(gin + ch, load_vector<V>(gin + ch) + grad);
  }
  if (slopes) {
    const V xv = load_vector<V>(x + ch);
    sum_y += xv * (dy[0] * g0 + dy[1] * g1 + dy[2] * g2 + dy[3] * g3);
    sum_x += xv * (dx[0] * g0 + dx[1] * g1 + dx[2] * g2 + dx[3] * g3);
  }
}

// Positions [p0, p1) of the chunk: po.offsets.koff and po.gin (either may be
// null), as backward_rows writes them.
template <typename T>
void rigid_grid_backward_rows(const Ctx<T>& c, const DenseGrad<T>& gr, const PassOutputs<T>& po,
                              int64_t p0, int64_t p1) {
  using V = typename CornerRun<T>::V;
  constexpr int R = CornerRun<T>::R;
  const Geometry& g = *c.g;
  T* const koff = po.offsets.koff;
  const int64_t P = g.plane(), ss = g.sstride();
  CornerRun<T> corners(g);
  std::vector<T> sums(2 * g.G);
  for (int64_t p = p0; p < p1;) {
    int64_t n, y, x;
    decode(c, p, &n, &y, &x);
    const int64_t run = std::min<int64_t>({R, p1 - p, g.Wo - x});
    for (int64_t a = 0; a < g.Kh; ++a)
      for (int64_t b = 0; b < g.Kw; ++b)
        for (int64_t kg = 0; kg < g.G; ++kg) corners.sample(c, n, y, x, run, a, b, kg);
    const T* img = c.image(n);
    for (int64_t l = 0; l < run; ++l) {
      const int64_t q = y * g.Wo + x + l;
      const T* grow = gr.g + (p + l) * gr.row_len;
      for (int64_t t = 0; t < g.K; ++t) {
        std::fill(sums.begin(), sums.end(), T(0));
        const int64_t iy = y * g.sh - g.ph + (t / g.Kw) * g.dh;
        const int64_t ix = (x + l) * g.sw - g.pw + (t % g.Kw) * g.dw;
        if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {  // else it read zeros
          const int64_t pixel = (iy * g.W + ix) * g.C;
          T* gin = po.gin ? po.gin + n * g.H * g.W * g.C + pixel : nullptr;
          for (int64_t si = 0; si < c.nsegs; ++si) {
            const Segment& sg = c.segs[si];
            const int64_t at = (sg.kg * g.K + t) * 4 * R + l;
            T w[4], dy[4], dx[4];
            const T* rows[4];
            for (int i = 0; i < 4; ++i) {
              w[i] = corners.weight[at + i * R];
              dy[i] = corners.d_dy[at + i * R];
              dx[i] = corners.d_dx[at + i * R];
              // indexed by channel: row + (ch - c0) is cell s, channel ch
              rows[i] = grow + sg.colbase + corners.cell[at + i * R] * ss - sg.c0;
            }
            V vy{}, vx{};
            T y1 = T(0), x1 = T(0);
            int64_t ch = sg.c0;
            for (; ch + R <= sg.c1; ch += R)
              tap_channels<V>(ch, img + pixel, rows, w, dy, dx, gin, koff != nullptr, vy, vx);
            for (; ch < sg.c1; ++ch)
              tap_channels<T>(ch, img + pixel, rows, w, dy, dx, gin, koff != nullptr, y1, x1);
            sums[2 * sg.kg] += sum_lanes(vy) + y1;
            sums[2 * sg.kg + 1] += sum_lanes(vx) + x1;
          }
        }
        if (koff)
          for (int64_t kg = 0; kg < g.G; ++kg) {
            T* o = koff + (n * 2 * g.G * g.K + kg * 2 * g.K + 2 * t) * P + q;
            o[0] = sums[2 * kg];
            o[P] = sums[2 * kg + 1];
          }
      }
    }
    p += run;
  }
}

}  // namespace cpu
}  // namespace erftool
