// Column rows of a local Deformable Kernel built in vector registers.
//
// build_rows (deform_cpu_kernels.h) scatters every tap into its <= 4 scope
// cells of the row in memory, one position and tap at a time. Here a run of
// positions along an output row (one per vector lane) first gets every tap's
// bilinear weights over the whole scope as dense rows (zero off its corners),
// computed lane-parallel from the contiguous offsets; then, per position and
// vector of channels, the S2 cell sums stay in registers (up to 16 per pass
// over the taps) while each tap adds its values times its dense weights, and
// every cell is stored once.
// A 56x56x64 image with a 4x4 scope, one thread: 250 against 460 ns per
// position (about half of that was sampling the taps one by one); 3x3 scope
// 180 against 430 ns; AVX2 code on the same host 360 against 460 ns. Four
// times the multiply-adds of the scatter, but no per-tap loads and stores of
// the row and no branches.
//
// Same arithmetic as build_rows: the weights are math::axis_sample /
// axis_weights lane by lane (their products the corner weights of
// math::bilinear_corners), and each cell sums its taps in tap order, fused
// multiply-adds from +0 -- zero weights add exact zeros -- so the rows are
// bit for bit those of build_rows for finite inputs (tests/test_native_cpu.py
// compares the two, ERFTOOL_CPU_COLUMN_BUILD=scatter forcing the latter).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "deform_cpu_kernels.h"
#include "lane_sampling_cpu.h"
#include "vector_cpu.h"

namespace erftool {
namespace cpu {

// Cells whose sums one pass over the taps holds in registers (25 sums in
// one pass ran 1.6x slower than the scatter, 56x56x64, AVX-512: more sums
// than registers), and the largest scope this path takes, in two passes
// (scope 5, 56x56x64, against the scatter in the same processes: forward
// 3.78-3.91x conv2d against 3.94-4.03x, forward+backward 3.83-3.91x
// against 3.97-4.06x).
constexpr int64_t kDensePassCells = 16;
constexpr int64_t kDenseMostCells = 32;

// Kernel offsets (else the scope is fixed and each tap has one cell: the
// scatter writes it once) and at most kDenseMostCells cells.
inline bool dense_rows_apply(const Geometry& g) {
  return g.has_koff && !g.depthwise && g.S2 <= kDenseMostCells;
}

// w[i] = weight of cell i < S of an S-cell axis for each lane's coordinate u:
// math::axis_sample + math::axis_weights, lane-parallel.
template <typename T>
ERFTOOL_ALWAYS_INLINE void axis_weight_rows(typename RegisterVector<T>::type u, int64_t S,
                                            typename RegisterVector<T>::type* w) {
  using V = typename RegisterVector<T>::type;
  using I = typename RegisterVector<T>::int_type;
  const I inside = (u > T(-1)) & (u < T(S));  // NaN fails both
  const V us = inside ? u : V{};  // nothing out of range reaches the conversion
  const V lo = floor_lanes<V, I>(us);
  const V frac = us - lo;
  for (int64_t i = 0; i < S; ++i) {
    const I at_lo = inside & (lo == T(i)), at_hi = inside & (lo + T(1) == T(i));
    w[i] = at_lo ? T(1) - frac : (at_hi ? frac : V{});
  }
}

// Per-task scratch of one run of positions (R lanes).
template <typename T, int NS>
struct DenseRun {
  static constexpr int R = RegisterVector<T>::kLanes;
  std::vector<T> weights;      // (G, K, NS, R): tap t's weight of cell s, lane last
  LaneRun<T> data;             // the taps' data corners or pixels, and mask
  std::vector<const T*> taps;  // (DG, K) of one lane: tap values from channel 0 on, or null
  std::vector<T> samples;      // (K, C) of one lane: bilinear or masked tap values

  explicit DenseRun(const Geometry& g)
      : weights(g.G * g.K * NS * R, T(0)),  // cells S2..NS-1 stay zero
        data(g, false),
        taps(g.DG * g.K),
        samples((g.has_doff || g.has_mask) ? g.K * g.C : 0) {}
};

// Dense weights of positions (n, y, x + l), l < run, and their data corners.
template <typename T, int NS>
ERFTOOL_ALWAYS_INLINE void sample_run(const Ctx<T>& c, int64_t n, int64_t y, int64_t x,
                                      int64_t run, DenseRun<T, NS>& r) {
  using V = typename RegisterVector<T>::type;
  constexpr int R = DenseRun<T, NS>::R;
  const Geometry& g = *c.g;
  const int64_t P = g.plane(), q = y * g.Wo + x;
  const T* koff = c.koff + n * 2 * g.G * g.K * P;
  V rows[kDenseMostCells], cols[kDenseMostCells];
  for (int64_t a = 0; a < g.Kh; ++a)
    for (int64_t b = 0; b < g.Kw; ++b) {
      const int64_t t = a * g.Kw + b;
      for (int64_t kg = 0; kg < g.G; ++kg) {
        const int64_t ch = kg * 2 * g.K + 2 * t;
        axis_weight_rows<T>(math::scope_coordinate<T>(a, g.Kh, g.Sh, T(0)) +
                                plane_lanes(koff, ch, P, q, run), g.Sh, rows);
        axis_weight_rows<T>(math::scope_coordinate<T>(b, g.Kw, g.Sw, T(0)) +
                                plane_lanes(koff, ch + 1, P, q, run), g.Sw, cols);
        T* w = r.weights.data() + (kg * g.K + t) * NS * R;
        for (int64_t i = 0; i < g.Sh; ++i)
          for (int64_t j = 0; j < g.Sw; ++j) store_vector(w + (i * g.Sw + j) * R, rows[i] * cols[j]);
      }
    }
  r.data.sample(c, n, y, x, run);
}

// The tap values of lane l into r.taps: the input pixel itself, or the
// bilinear / masked sample (tap_values, as build_rows takes them).
template <typename T, int NS>
ERFTOOL_ALWAYS_INLINE void lane_taps(const Ctx<T>& c, int64_t n, int64_t l, DenseRun<T, NS>& r) {
  constexpr int R = DenseRun<T, NS>::R;
  const Geometry& g = *c.g;
  const T* img = c.image(n);
  const LaneRun<T>& d = r.data;
  for (int64_t t = 0; t < g.K; ++t) {
    if (!(g.has_doff || g.has_mask)) {
      const int64_t pixel = d.pixel[t * R + l];
      for (int64_t dg = 0; dg < g.DG; ++dg)
        r.taps[dg * g.K + t] = pixel >= 0 ? img + pixel * g.C : nullptr;
      continue;
    }
    T* buf = r.samples.data() + t * g.C;
    for (int64_t dg = 0; dg < g.DG; ++dg) {
      const int64_t c0 = dg * (g.C / g.DG);
      const T* v = tap_values(d.tap_corners(g, dg, t, l), d.tap_mask(g, dg, t, l), img, g.C, c0,
                              g.C / g.DG, buf + c0);
      r.taps[dg * g.K + t] = v ? v - c0 : nullptr;
    }
  }
}

// `cells` (<= NSums) cells of channels [ch, ch + width of V) of lane l (V a
// vector, or T for one channel): every tap's values times its weights,
// summed in registers, stored once. weights: tap t's from t * NStride * R on.
template <int NSums, int NStride, typename V, typename T>
ERFTOOL_ALWAYS_INLINE void dense_cells(int64_t K, const T* __restrict weights, int64_t lane,
                                       const T* const* taps, int64_t ch, int64_t cells,
                                       T* __restrict dst, int64_t cell_stride) {
  constexpr int R = RegisterVector<T>::kLanes;
  V sums[NSums];
  for (int s = 0; s < NSums; ++s) sums[s] = V{};
  for (int64_t t = 0; t < K; ++t) {
    if (!taps[t]) continue;
    const V v = load_vector<V>(taps[t] + ch);
    const T* w = weights + t * NStride * R + lane;
    for (int s = 0; s < NSums; ++s) sums[s] += w[s * R] * v;
  }
  for (int s = 0; s < NSums; ++s)
    if (s < cells) store_vector(dst + s * cell_stride, sums[s]);
}

template <typename T, int NS>
void build_rows_dense_ns(const Ctx<T>& c, int64_t p0, int64_t p1, T* col) {
  constexpr int R = DenseRun<T, NS>::R;
  const Geometry& g = *c.g;
  DenseRun<T, NS> r(g);
  for_each_run(c, p0, p1, [&](int64_t p, int64_t n, int64_t y, int64_t x, int64_t run) {
    sample_run(c, n, y, x, run, r);
    for (int64_t l = 0; l < run; ++l) {
      lane_taps(c, n, l, r);
      T* row = col + (p + l) * g.row_len();
      for (int64_t si = 0; si < c.nsegs; ++si) {
        const Segment& sg = c.segs[si];
        const T* w = r.weights.data() + sg.kg * g.K * NS * R;
        const T* const* taps = r.taps.data() + sg.dg * g.K;
        T* dst = row + sg.colbase;
        // Scopes over kDensePassCells cells: one pass per block of cells.
        constexpr int kPass = NS < kDensePassCells ? NS : kDensePassCells;
        for (int64_t s0 = 0; s0 < g.S2; s0 += kPass)
          for_channel_vectors<T>(sg.c0, sg.c1, [&](int64_t ch, auto width) {
            using W = typename decltype(width)::type;
            dense_cells<kPass, NS, W>(g.K, w + s0 * R, l, taps, ch,
                                      std::min<int64_t>(kPass, g.S2 - s0),
                                      dst + (ch - sg.c0) + s0 * g.sstride(), g.sstride());
          });
      }
    }
  });
}

// Column rows of positions [p0, p1) (dense_rows_apply(g) must hold).
template <typename T>
void build_rows_dense(const Ctx<T>& c, int64_t p0, int64_t p1, T* col) {
  const int64_t S2 = c.g->S2;
  if (S2 <= 4)
    build_rows_dense_ns<T, 4>(c, p0, p1, col);
  else if (S2 <= 9)
    build_rows_dense_ns<T, 9>(c, p0, p1, col);
  else if (S2 <= kDensePassCells)
    build_rows_dense_ns<T, kDensePassCells>(c, p0, p1, col);
  else
    build_rows_dense_ns<T, kDenseMostCells>(c, p0, p1, col);
}

// Without kernel offsets (DC: the scope is the kernel) tap t fills cell t
// alone: its lane-sampled values are written straight into the row, the
// same values build_rows writes (tap_values; zero where it reads nothing).
template <typename T>
void build_rows_tap_cells(const Ctx<T>& c, int64_t p0, int64_t p1, T* col) {
  const Geometry& g = *c.g;
  LaneRun<T> lanes(g, false);
  for_each_run(c, p0, p1, [&](int64_t p, int64_t n, int64_t y, int64_t x, int64_t run) {
    lanes.sample(c, n, y, x, run);
    const T* img = c.image(n);
    for (int64_t l = 0; l < run; ++l) {
      T* row = col + (p + l) * g.row_len();
      for (int64_t t = 0; t < g.K; ++t)
        for (int64_t si = 0; si < c.nsegs; ++si) {
          const Segment& sg = c.segs[si];
          const int64_t len = sg.c1 - sg.c0;
          T* dst = row + sg.colbase + t * g.sstride();
          const T* v = tap_values(lanes.tap_corners(g, sg.dg, t, l), lanes.tap_mask(g, sg.dg, t, l),
                                  img, g.C, sg.c0, len, dst);
          if (!v)
            std::fill(dst, dst + len, T(0));
          else if (v != dst)
            std::copy(v, v + len, dst);
        }
    }
  });
}

}  // namespace cpu
}  // namespace erftool
