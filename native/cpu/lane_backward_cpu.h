// The fused backward pass of the column form (DK, DC, DK + DC; not
// depthwise) for runs of positions along an output row: the offset and mask
// gradients and the input gradient from the column gradient G.
//
// The pass it replaced (backward_rows) sampled the scope and data corners
// one position and tap at a time, then takes one dot product per pair of
// corners (x_j . G_i, a horizontal sum each: 16 per tap with data offsets)
// and a pass for the input gradient. Here the corners of a run's taps are
// computed lane-parallel from the contiguous offsets, and each tap makes one
// pass over the channels that reads its data corners X_j and scope cells
// G_i and accumulates in registers, with x = sum_j w_j X_j (the data sample)
// and g = sum_i k_i G_i (the gradient of the tap's value):
//   grad_input[pixel j]  += m w_j g
//   kernel offset (row)  += m x . sum_i dk_i/drow G_i     (and the column)
//   data offset (row)    += m (sum_j dw_j/drow X_j) . g   (and the column)
//   mask                 += x . g
// and two to five horizontal sums per tap and group at the end. These are
// backward_rows' sums regrouped: the same values up to rounding. (That pass
// also rebuilt the column rows from its samples; the backward now builds
// them apart, by runs too, or by the scatter for scopes over 32 cells.
// Scope 5 DK, 56x56x64, fwd+bwd against conv2d in alternating processes:
// 3.81-3.96x with this pass against 3.96-4.44x (once 5.97x) with
// backward_rows.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "deform_cpu_kernels.h"
#include "lane_sampling_cpu.h"
#include "vector_cpu.h"

namespace erftool {
namespace cpu {

// One tap of one segment at one position: the rows it reads (indexed by
// channel), their weights, the input-gradient rows it adds to, and the sums.
template <typename T>
struct TapRefs {
  const T* x[4];  // data corners (one on a rigid grid)
  T dw[4], ddy[4], ddx[4];
  const T* g[4];  // scope cells of G
  T kw[4], kdy[4], kdx[4];
  T* gin[4];  // grad_input rows of the present data corners
  T gin_scale[4];
  int gins;
  bool kernel_slopes, data_slopes, mask;
};

template <typename V>
struct TapSums {
  V ky{}, kx{}, dy{}, dx{}, m{};
};

// kSampled: four data corners (else the rigid pixel); kOneCell: the tap
// reads one scope cell with weight 1 (DC: no kernel offsets, no slopes).
template <bool kSampled, bool kOneCell, typename V, typename T>
ERFTOOL_ALWAYS_INLINE void tap_channels(int64_t ch, const TapRefs<T>& r, TapSums<V>& s) {
  const V g0 = load_vector<V>(r.g[0] + ch);
  V g1{}, g2{}, g3{}, grad = g0;
  if (!kOneCell) {
    g1 = load_vector<V>(r.g[1] + ch);
    g2 = load_vector<V>(r.g[2] + ch);
    g3 = load_vector<V>(r.g[3] + ch);
    grad = r.kw[0] * g0 + r.kw[1] * g1 + r.kw[2] * g2 + r.kw[3] * g3;
  }
  for (int j = 0; j < r.gins; ++j)
    store_vector(r.gin[j] + ch, load_vector<V>(r.gin[j] + ch) + r.gin_scale[j] * grad);
  if (!(r.kernel_slopes || r.data_slopes || r.mask)) return;
  const V x0 = load_vector<V>(r.x[0] + ch);
  V x = x0, x1{}, x2{}, x3{};
  if (kSampled) {
    x1 = load_vector<V>(r.x[1] + ch);
    x2 = load_vector<V>(r.x[2] + ch);
    x3 = load_vector<V>(r.x[3] + ch);
    x = r.dw[0] * x0 + r.dw[1] * x1 + r.dw[2] * x2 + r.dw[3] * x3;
  }
  if (!kOneCell && r.kernel_slopes) {
    s.ky += x * (r.kdy[0] * g0 + r.kdy[1] * g1 + r.kdy[2] * g2 + r.kdy[3] * g3);
    s.kx += x * (r.kdx[0] * g0 + r.kdx[1] * g1 + r.kdx[2] * g2 + r.kdx[3] * g3);
  }
  if (kSampled && r.data_slopes) {
    s.dy += (r.ddy[0] * x0 + r.ddy[1] * x1 + r.ddy[2] * x2 + r.ddy[3] * x3) * grad;
    s.dx += (r.ddx[0] * x0 + r.ddx[1] * x1 + r.ddx[2] * x2 + r.ddx[3] * x3) * grad;
  }
  if (r.mask) s.m += x * grad;
}

// The channels of one segment (for_channel_vectors): whole vectors into vs,
// the narrower vectors and single channels into ts.
template <bool kSampled, bool kOneCell, typename V, typename T>
ERFTOOL_ALWAYS_INLINE void tap_segment(const Segment& sg, const TapRefs<T>& r, TapSums<V>& vs,
                                       TapSums<T>& ts) {
  for_channel_vectors<T>(sg.c0, sg.c1, [&](int64_t ch, auto width) {
    using W = typename decltype(width)::type;
    if constexpr (std::is_same_v<W, V>) {
      tap_channels<kSampled, kOneCell>(ch, r, vs);
    } else if constexpr (std::is_same_v<W, T>) {
      tap_channels<kSampled, kOneCell>(ch, r, ts);
    } else {
      TapSums<W> s;
      tap_channels<kSampled, kOneCell>(ch, r, s);
      ts.ky += sum_lanes(s.ky), ts.kx += sum_lanes(s.kx), ts.dy += sum_lanes(s.dy);
      ts.dx += sum_lanes(s.dx), ts.m += sum_lanes(s.m);
    }
  });
}

// Positions [p0, p1) of the chunk: the offset and mask gradients and po.gin
// (any may be null). Not for depthwise layers (their own pass,
// depthwise_backward_rows).
template <typename T>
void lane_backward_rows(const Ctx<T>& c, const DenseGrad<T>& gr, const PassOutputs<T>& po,
                        int64_t p0, int64_t p1) {
  using V = typename RegisterVector<T>::type;
  constexpr int R = LaneRun<T>::R;
  const Geometry& g = *c.g;
  const OffsetGrads<T>& out = po.offsets;
  const int64_t ss = g.sstride();
  LaneRun<T> run_data(g, true);
  std::vector<T> gk(2 * g.G), gd(2 * g.DG), gm(g.DG);
  for_each_run(c, p0, p1, [&](int64_t p, int64_t n, int64_t y, int64_t x, int64_t run) {
    run_data.sample(c, n, y, x, run);
    const T* img = c.image(n);
    T* gimg = po.gin ? po.gin + (n - po.gin_n0) * g.H * g.W * g.C : nullptr;
    for (int64_t l = 0; l < run; ++l) {
      const T* grow = gr.g + (p + l) * gr.row_len;
      for (int64_t t = 0; t < g.K; ++t) {
        for (int64_t si = 0; si < c.nsegs; ++si) {
          const Segment& sg = c.segs[si];
          const T m = run_data.tap_mask(g, sg.dg, t, l);
          TapRefs<T> r;
          r.gins = 0;
          if (g.has_doff) {
            const LaneCorners<T>& d = run_data.data[sg.dg * g.K + t];
            bool any = false;
            for (int j = 0; j < 4; ++j) {
              const int64_t at = j * R + l, row = d.index[at] * g.C;
              r.x[j] = img + row;
              r.dw[j] = d.weight[at];
              r.ddy[j] = d.d_dy[at];
              r.ddx[j] = d.d_dx[at];
              any = any || d.present[at];
              if (gimg && d.present[at]) {
                r.gin[r.gins] = gimg + row;
                r.gin_scale[r.gins++] = m * d.weight[at];
              }
            }
            if (!any) continue;  // the sample reads nothing: every sum is zero
          } else {
            const int64_t pixel = run_data.pixel[t * R + l];
            if (pixel < 0) continue;
            r.x[0] = img + pixel * g.C;
            if (gimg) {
              r.gin[0] = gimg + pixel * g.C;
              r.gin_scale[0] = m;
              r.gins = 1;
            }
          }
          // G's cell s of this segment, indexed by channel.
          const T* cells = grow + sg.colbase - sg.c0;
          if (g.has_koff) {
            const LaneCorners<T>& k = run_data.scope[sg.kg * g.K + t];
            for (int i = 0; i < 4; ++i) {
              const int64_t at = i * R + l;
              r.g[i] = cells + k.index[at] * ss;
              r.kw[i] = k.weight[at];
              r.kdy[i] = k.d_dy[at];
              r.kdx[i] = k.d_dx[at];
            }
          } else {  // the scope is the kernel: tap t is cell t (kOneCell)
            r.g[0] = cells + t * ss;
          }
          r.kernel_slopes = out.koff != nullptr;
          r.data_slopes = out.doff != nullptr;
          r.mask = out.mask != nullptr;
          TapSums<V> vs;
          TapSums<T> ts;
          if (g.has_doff && !g.has_koff)
            tap_segment<true, true>(sg, r, vs, ts);
          else if (g.has_doff)
            tap_segment<true, false>(sg, r, vs, ts);
          else if (!g.has_koff)
            tap_segment<false, true>(sg, r, vs, ts);
          else
            tap_segment<false, false>(sg, r, vs, ts);
          gk[2 * sg.kg] += m * (sum_lanes(vs.ky) + ts.ky);
          gk[2 * sg.kg + 1] += m * (sum_lanes(vs.kx) + ts.kx);
          gd[2 * sg.dg] += m * (sum_lanes(vs.dy) + ts.dy);
          gd[2 * sg.dg + 1] += m * (sum_lanes(vs.dx) + ts.dx);
          gm[sg.dg] += sum_lanes(vs.m) + ts.m;
        }
        flush_offset_grads(g, out, n, t, y * g.Wo + x + l, gk, gd, gm);
      }
    }
  });
}

}  // namespace cpu
}  // namespace erftool
