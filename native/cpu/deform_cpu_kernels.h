// Per-position CPU kernels of the column-form deformable operator.
//
// Torch-free: plain pointers and the shared math of deform_math.h. Tensors
// are channels-last here (input (H, W, C) per image) so that the innermost
// loops run over channels that share one set of bilinear coefficients: the
// coefficients of a (position, tap, group) are computed once and reused over
// the group's channels, and the channel loops vectorise.
//
// A column row (one output position) holds S2 * C values. Its layout is
// (weight group, scope cell, channel in group) so that a grouped 1x1
// convolution over the rows is the GEMM, or (scope cell, channel) for the
// depthwise path, which never materialises the rows. Either way a Segment
// (a channel range with one weight, kernel-offset and data group) maps to
// row[colbase + s * sstride + (c - c0)].
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "erftool/deform_math.h"

#if defined(__GNUC__)
#define ERFTOOL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ERFTOOL_ALWAYS_INLINE inline
#endif

namespace erftool {
namespace cpu {

using math::BilinearCorners;

struct Geometry {
  int64_t N, C, H, W;          // input
  int64_t O, groups, Cg, Og;   // output channels, weight groups
  int64_t Kh, Kw, K;           // kernel taps
  int64_t Sh, Sw, S2;          // scope (the weight's spatial shape)
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;
  int64_t G, DG;               // kernel-offset and data-offset groups
  bool has_koff, has_doff, has_mask;
  bool depthwise;              // (scope, channel) rows, no GEMM

  int64_t plane() const { return Ho * Wo; }
  int64_t row_len() const { return S2 * C; }
  int64_t sstride() const { return depthwise ? C : Cg; }
};

struct Segment {
  int64_t c0, c1;   // channel range [c0, c1)
  int64_t kg, dg;   // kernel-offset group, data group
  int64_t colbase;  // column-row index of (c0, scope cell 0)
};

// Split the channels at every weight-, kernel-offset- and data-group border.
inline std::vector<Segment> make_segments(const Geometry& g) {
  std::vector<int64_t> cuts;
  const int64_t ckg = g.C / g.G, cdg = g.C / g.DG;
  for (int64_t c = 0; c <= g.C; ++c) {
    const bool wcut = !g.depthwise && c % g.Cg == 0;
    if (c == 0 || c == g.C || c % ckg == 0 || c % cdg == 0 || wcut) cuts.push_back(c);
  }
  std::vector<Segment> segs;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    Segment s;
    s.c0 = cuts[i];
    s.c1 = cuts[i + 1];
    s.kg = s.c0 / ckg;
    s.dg = s.c0 / cdg;
    if (g.depthwise) {
      s.colbase = s.c0;
    } else {
      const int64_t wg = s.c0 / g.Cg;
      s.colbase = wg * g.S2 * g.Cg + (s.c0 - wg * g.Cg);
    }
    segs.push_back(s);
  }
  return segs;
}

// ---------------------------------------------------------------- vector loops

template <typename T>
ERFTOOL_ALWAYS_INLINE void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// ---------------------------------------------------------------- tap sampling

// Everything the kernels read, for one chunk of (images x output rows).
template <typename T>
struct Ctx {
  const Geometry* g;
  const Segment* segs;
  int64_t nsegs;
  const T* x;       // input, (N, H, W, C) from image x_n0 on
  int64_t x_n0 = 0;
  const T* koff;    // (N, 2*G*K, Ho, Wo) or null
  const T* doff;    // (N, 2*DG*K, Ho, Wo) or null
  const T* mask;    // (N, DG*K, Ho, Wo) or null
  const T* wt;      // depthwise: sampled-from weight as (S2, C)
  int64_t n0, nc, y0, rows;  // the chunk

  int64_t positions() const { return nc * rows * g->Wo; }
  const T* image(int64_t n) const { return x + (n - x_n0) * g->H * g->W * g->C; }
};

// Per-task scratch: corners of every group for the current tap, channel buffers.
template <typename T>
struct Scratch {
  std::vector<BilinearCorners<T>> kc, dc;
  std::vector<T> m, v;
  explicit Scratch(const Geometry& g)
      : kc(g.G), dc(g.DG), m(g.DG), v(std::max<int64_t>(g.C, 1)) {}
};

// Corners of the rigid tap pixel as a one-corner BilinearCorners (no derivative).
template <typename T>
ERFTOOL_ALWAYS_INLINE BilinearCorners<T> pixel_corner(int64_t iy, int64_t ix, int64_t H,
                                                      int64_t W) {
  BilinearCorners<T> c;
  for (int i = 0; i < 4; ++i) {
    c.index[i] = -1;
    c.weight[i] = T(0);
    c.d_dy[i] = T(0);
    c.d_dx[i] = T(0);
  }
  if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
    c.index[0] = iy * W + ix;
    c.weight[0] = T(1);
  }
  return c;
}

// Scope and data corners (plus mask) of tap (a, b) at output (n, y, x), for
// every kernel-offset group and data group, into s.kc / s.dc / s.m.
template <typename T>
ERFTOOL_ALWAYS_INLINE void sample_tap(const Ctx<T>& c, int64_t n, int64_t y, int64_t x,
                                      int64_t a, int64_t b, Scratch<T>& s) {
  const Geometry& g = *c.g;
  const int64_t P = g.plane(), q = y * g.Wo + x, t = a * g.Kw + b;
  for (int64_t kg = 0; kg < g.G; ++kg) {
    T dr = T(0), dc = T(0);
    if (c.koff) {
      const T* p = c.koff + (n * 2 * g.G * g.K + kg * 2 * g.K + 2 * t) * P + q;
      dr = p[0];
      dc = p[P];
    }
    s.kc[kg] = math::bilinear_corners<T>(math::scope_coordinate<T>(a, g.Kh, g.Sh, dr),
                                         math::scope_coordinate<T>(b, g.Kw, g.Sw, dc),
                                         g.Sh, g.Sw);
  }
  const int64_t iy = y * g.sh - g.ph + a * g.dh, ix = x * g.sw - g.pw + b * g.dw;
  for (int64_t dg = 0; dg < g.DG; ++dg) {
    if (c.doff) {
      const T* p = c.doff + (n * 2 * g.DG * g.K + dg * 2 * g.K + 2 * t) * P + q;
      s.dc[dg] = math::bilinear_corners<T>(static_cast<T>(iy) + p[0],
                                           static_cast<T>(ix) + p[P], g.H, g.W);
    } else {
      s.dc[dg] = pixel_corner<T>(iy, ix, g.H, g.W);
    }
    s.m[dg] = c.mask ? c.mask[(n * g.DG * g.K + dg * g.K + t) * P + q] : T(1);
  }
}

// The four corner rows of a bilinear sample (scope cells of a sampled weight,
// or input pixels of a sampled tap), with absent corners pointing at a
// stand-in row (zeros, or any present row) with weight 0, so one fused loop
// needs no branches.
template <typename T>
struct CornerRows {
  const T* row[4];
  T w[4];
};

template <typename T>
ERFTOOL_ALWAYS_INLINE CornerRows<T> corner_rows(const BilinearCorners<T>& k, const T* base,
                                                int64_t stride, const T* zeros) {
  CornerRows<T> r;
  for (int i = 0; i < 4; ++i) {
    const bool on = k.index[i] >= 0 && k.weight[i] != T(0);
    r.row[i] = on ? base + k.index[i] * stride : zeros;
    r.w[i] = on ? k.weight[i] : T(0);
  }
  return r;
}

// y[c] = a * sum_i w_i row_i[c] (kAdd: y[c] +=): one pass over the four rows.
template <bool kAdd, typename T>
ERFTOOL_ALWAYS_INLINE void corner_sum(int64_t n, T a, const CornerRows<T>& r, T* __restrict y) {
  const T *__restrict r0 = r.row[0], *__restrict r1 = r.row[1];
  const T *__restrict r2 = r.row[2], *__restrict r3 = r.row[3];
  const T w0 = a * r.w[0], w1 = a * r.w[1], w2 = a * r.w[2], w3 = a * r.w[3];
  for (int64_t i = 0; i < n; ++i) {
    const T v = w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i];
    y[i] = kAdd ? y[i] + v : v;
  }
}

// corner_sum<false> with a = 1 into memory that is read back only long
// after (a whole output written in one pass): streaming stores then skip
// reading every destination line into the cache first (the global DK's
// tap-major kernels, 19 MB: 1.1-1.9 ms against 2.3-2.5 ms with plain stores,
// alternating builds on a loaded 2-core EPYC). Whole aligned AVX
// vectors only; anything else takes corner_sum. Callers issue
// stream_fence() before the written memory is read.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx"))) inline void corner_sum_stream_avx(const CornerRows<float>& r,
                                                                  float* y, int64_t n) {
  const __m256 w0 = _mm256_set1_ps(r.w[0]), w1 = _mm256_set1_ps(r.w[1]);
  const __m256 w2 = _mm256_set1_ps(r.w[2]), w3 = _mm256_set1_ps(r.w[3]);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 v = _mm256_mul_ps(w0, _mm256_loadu_ps(r.row[0] + i));
    v = _mm256_add_ps(v, _mm256_mul_ps(w1, _mm256_loadu_ps(r.row[1] + i)));
    v = _mm256_add_ps(v, _mm256_mul_ps(w2, _mm256_loadu_ps(r.row[2] + i)));
    v = _mm256_add_ps(v, _mm256_mul_ps(w3, _mm256_loadu_ps(r.row[3] + i)));
    _mm256_stream_ps(y + i, v);
  }
}
#endif

template <typename T>
ERFTOOL_ALWAYS_INLINE void corner_sum_stream(int64_t n, const CornerRows<T>& r, T* y) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx = __builtin_cpu_supports("avx");
    if (avx && reinterpret_cast<uintptr_t>(y) % 32 == 0 && n % 8 == 0) {
      corner_sum_stream_avx(r, y, n);
      return;
    }
  }
#endif
  corner_sum<false>(n, T(1), r, y);
}

// dst[i] = src[i] for i < n, as scalar_t, with streaming stores where they
// apply (see corner_sum_stream): a whole channel-major kernel block of the
// global DK at a time.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx"))) inline void stream_copy_avx(const float* src, float* dst,
                                                            int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
}
#endif

template <typename T, typename scalar_t>
ERFTOOL_ALWAYS_INLINE void stream_copy(int64_t n, const T* src, scalar_t* dst) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<scalar_t, float>) {
    static const bool avx = __builtin_cpu_supports("avx");
    if (avx && reinterpret_cast<uintptr_t>(dst) % 32 == 0 && n % 8 == 0) {
      stream_copy_avx(src, dst, n);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

inline void stream_fence() {
#if defined(__GNUC__) && defined(__x86_64__)
  _mm_sfence();
#endif
}

// m * (bilinear sample) of one tap over channels [c0, c0 + len). Points
// straight into the input when the tap sits on one pixel with unit weight,
// else fills buf; null when the tap reads nothing.
template <typename T>
ERFTOOL_ALWAYS_INLINE const T* tap_values(const BilinearCorners<T>& d, T m, const T* img,
                                          int64_t C, int64_t c0, int64_t len, T* buf) {
  int count = 0, last = -1;
  for (int j = 0; j < 4; ++j)
    if (d.index[j] >= 0 && d.weight[j] != T(0)) ++count, last = j;
  if (count == 0) return nullptr;
  const T* any = img + d.index[last] * C + c0;
  if (count == 1 && d.weight[last] * m == T(1)) return any;
  // Absent corners re-read a present row with weight 0: no zero fill.
  corner_sum<false>(len, m, corner_rows(d, img + c0, C, any), buf);
  return buf;
}

// Decode a chunk-linear position p into image n and output (y, x).
template <typename T>
ERFTOOL_ALWAYS_INLINE void decode(const Ctx<T>& c, int64_t p, int64_t* n, int64_t* y,
                                  int64_t* x) {
  const int64_t Wo = c.g->Wo, per_image = c.rows * Wo;
  *n = c.n0 + p / per_image;
  *y = c.y0 + (p % per_image) / Wo;
  *x = p % Wo;
}

// ---------------------------------------------------------------- forward

// y = a * x (the first write of a column-row cell: no zero fill needed).
template <typename T>
ERFTOOL_ALWAYS_INLINE void scale_into(int64_t n, T a, const T* __restrict x, T* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

// Writes one column row cell by cell: the first contribution to a (segment,
// scope cell) is stored, later ones added, and cells no tap reached are
// zeroed at the end -- instead of zero-filling the whole row first, an extra
// pass over S2 * C values per position (memset was ~5 % of a DK forward's
// perf samples, half as many as the scatter itself).
template <typename T>
struct RowWriter {
  const Geometry* g;
  const Segment* segs;
  int64_t nsegs;
  std::vector<unsigned char> written;  // (segment, scope cell)
  T* row = nullptr;

  RowWriter(const Geometry& geom, const Segment* s, int64_t n)
      : g(&geom), segs(s), nsegs(n), written(n * geom.S2) {}

  void begin(T* r) {
    row = r;
    std::fill(written.begin(), written.end(), 0);
  }
  ERFTOOL_ALWAYS_INLINE void add(int64_t si, int64_t cell, T w, const T* v) {
    const Segment& sg = segs[si];
    T* dst = row + sg.colbase + cell * g->sstride();
    unsigned char& done = written[si * g->S2 + cell];
    if (done)
      axpy(sg.c1 - sg.c0, w, v, dst);
    else
      scale_into(sg.c1 - sg.c0, w, v, dst);
    done = 1;
  }
  void finish() {
    for (int64_t si = 0; si < nsegs; ++si)
      for (int64_t cell = 0; cell < g->S2; ++cell)
        if (!written[si * g->S2 + cell]) {
          T* dst = row + segs[si].colbase + cell * g->sstride();
          std::fill(dst, dst + (segs[si].c1 - segs[si].c0), T(0));
        }
  }
};

// One tap of segment si scattered into its <= 4 scope cells of the row.
template <typename T>
ERFTOOL_ALWAYS_INLINE void scatter_tap(Scratch<T>& s, int64_t si, const T* img, int64_t C,
                                       RowWriter<T>& w) {
  const Segment& sg = w.segs[si];
  const T* v = tap_values(s.dc[sg.dg], s.m[sg.dg], img, C, sg.c0, sg.c1 - sg.c0, s.v.data());
  if (!v) return;
  const BilinearCorners<T>& k = s.kc[sg.kg];
  for (int j = 0; j < 4; ++j)
    if (k.index[j] >= 0 && k.weight[j] != T(0)) w.add(si, k.index[j], k.weight[j], v);
}

// Column rows of positions [p0, p1): every tap scattered into its <= 4 scope cells.
template <typename T>
ERFTOOL_ALWAYS_INLINE void build_rows(const Ctx<T>& c, int64_t p0, int64_t p1, T* col) {
  const Geometry& g = *c.g;
  Scratch<T> s(g);
  RowWriter<T> w(g, c.segs, c.nsegs);
  for (int64_t p = p0; p < p1; ++p) {
    int64_t n, y, x;
    decode(c, p, &n, &y, &x);
    w.begin(col + p * g.row_len());
    const T* img = c.image(n);
    for (int64_t a = 0; a < g.Kh; ++a)
      for (int64_t b = 0; b < g.Kw; ++b) {
        sample_tap(c, n, y, x, a, b, s);
        for (int64_t i = 0; i < c.nsegs; ++i) scatter_tap(s, i, img, g.C, w);
      }
    w.finish();
  }
}

// y[c] += a * x[c] * (sum_i w_i row_i[c]): one pass over the four rows.
template <typename T>
ERFTOOL_ALWAYS_INLINE void fused_corner_axpy(int64_t n, T a, const T* __restrict x,
                                             const CornerRows<T>& r, T* __restrict y) {
  const T *__restrict r0 = r.row[0], *__restrict r1 = r.row[1];
  const T *__restrict r2 = r.row[2], *__restrict r3 = r.row[3];
  const T w0 = a * r.w[0], w1 = a * r.w[1], w2 = a * r.w[2], w3 = a * r.w[3];
  for (int64_t i = 0; i < n; ++i)
    y[i] += x[i] * (w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i]);
}

// y[c] += (sum_i kw_i krow_i[c]) * (sum_j dw_j drow_j[c]): the sampled weight
// times the sampled data, both bilinear, in one pass.
template <typename T>
ERFTOOL_ALWAYS_INLINE void fused_bilinear_product(int64_t n, const CornerRows<T>& k,
                                                  const CornerRows<T>& d, T* __restrict y) {
  const T *__restrict k0 = k.row[0], *__restrict k1 = k.row[1];
  const T *__restrict k2 = k.row[2], *__restrict k3 = k.row[3];
  const T *__restrict d0 = d.row[0], *__restrict d1 = d.row[1];
  const T *__restrict d2 = d.row[2], *__restrict d3 = d.row[3];
  for (int64_t i = 0; i < n; ++i)
    y[i] += (k.w[0] * k0[i] + k.w[1] * k1[i] + k.w[2] * k2[i] + k.w[3] * k3[i]) *
            (d.w[0] * d0[i] + d.w[1] * d1[i] + d.w[2] * d2[i] + d.w[3] * d3[i]);
}

// Depthwise forward, no column rows: out[p, c] = sum_taps value * sampled weight.
// Sampler: at(n, y, x), then tap(a, b, s) fills s as sample_tap does
// (RunSampler, lane_sampling_cpu.h).
template <typename T, typename Sampler>
ERFTOOL_ALWAYS_INLINE void depthwise_rows(const Ctx<T>& c, int64_t p0, int64_t p1, T* out,
                                          Sampler&& sampler) {
  const Geometry& g = *c.g;
  Scratch<T> s(g);
  const std::vector<T> zeros(g.C, T(0));
  for (int64_t p = p0; p < p1; ++p) {
    int64_t n, y, x;
    decode(c, p, &n, &y, &x);
    sampler.at(n, y, x);
    T* o = out + p * g.C;
    std::fill(o, o + g.C, T(0));
    const T* img = c.image(n);
    for (int64_t a = 0; a < g.Kh; ++a)
      for (int64_t b = 0; b < g.Kw; ++b) {
        sampler.tap(a, b, s);
        for (int64_t i = 0; i < c.nsegs; ++i) {
          const Segment& sg = c.segs[i];
          const int64_t len = sg.c1 - sg.c0;
          const CornerRows<T> k = corner_rows(s.kc[sg.kg], c.wt + sg.colbase, g.C, zeros.data());
          CornerRows<T> d = corner_rows(s.dc[sg.dg], img + sg.c0, g.C, zeros.data());
          int count = 0, last = 0;
          for (int j = 0; j < 4; ++j) {
            d.w[j] *= s.m[sg.dg];
            if (d.w[j] != T(0)) ++count, last = j;
          }
          if (count == 0) continue;
          int kcount = 0, klast = 0;
          for (int j = 0; j < 4; ++j)
            if (k.w[j] != T(0)) ++kcount, klast = j;
          if (count == 1 && d.w[last] == T(1))  // a rigid tap: read the pixel in place
            fused_corner_axpy(len, T(1), d.row[last], k, o + sg.c0);
          else if (kcount == 1 && k.w[klast] == T(1))  // a rigid kernel cell (DC)
            fused_corner_axpy(len, T(1), k.row[klast], d, o + sg.c0);
          else
            fused_bilinear_product(len, k, d, o + sg.c0);
        }
      }
  }
}

// ---------------------------------------------------------------- backward

// Gradient of the column rows, G[p][colbase + s * sstride + c], read densely
// from a buffer (general path).
template <typename T>
struct DenseGrad {
  const T* g;
  int64_t row_len, ss;
  const T* zeros;  // >= Cg zeros, stands in for absent corners
  // dst[c] += scale * sum_j w_j G[p][s_j][c]: the gradient of the tap value,
  // one pass over dst for all four corners.
  ERFTOOL_ALWAYS_INLINE void tap_grad(int64_t p, const Segment& sg, int64_t cs, int64_t len,
                                      const BilinearCorners<T>& k, T scale, T* dst) const {
    const T* row = g + p * row_len + sg.colbase + (cs - sg.c0);
    corner_sum<true>(len, scale, corner_rows(k, row, ss, zeros), dst);
  }
};

// Depthwise: G[p][s][c] = grad_out[p][c] * Wt[s][c], never materialised
// (for the separate input-gradient passes; depthwise_backward_rows below
// does the rest).
template <typename T>
struct DepthwiseGrad {
  const T* gout;  // (positions, C)
  const T* wt;    // (S2, C)
  int64_t C;
  const T* zeros;  // C zeros
  ERFTOOL_ALWAYS_INLINE void tap_grad(int64_t p, const Segment&, int64_t cs, int64_t len,
                                      const BilinearCorners<T>& k, T scale, T* dst) const {
    fused_corner_axpy(len, scale, gout + p * C + cs, corner_rows(k, wt + cs, C, zeros), dst);
  }
};

// Output tensors of the fused offset / mask gradient pass (null = not wanted).
template <typename T>
struct OffsetGrads {
  T* koff;  // (N, 2*G*K, Ho, Wo)
  T* doff;  // (N, 2*DG*K, Ho, Wo)
  T* mask;  // (N, DG*K, Ho, Wo)
};

// Everything the fused backward pass (lane_backward_cpu.h) writes (null =
// not wanted).
template <typename T>
struct PassOutputs {
  OffsetGrads<T> offsets;
  T* gin = nullptr;     // (N, H, W, C) input gradient, from image gin_n0 on
  int64_t gin_n0 = 0;
};

// Stores the offset and mask gradients of tap t at output (n, q), one per
// group, and zeroes the sums for the next tap (a std::fill per tap compiled
// to `rep stos`, 6 % of the depthwise pass's samples).
template <typename T>
ERFTOOL_ALWAYS_INLINE void flush_offset_grads(const Geometry& g, const OffsetGrads<T>& out,
                                              int64_t n, int64_t t, int64_t q, std::vector<T>& gk,
                                              std::vector<T>& gd, std::vector<T>& gm) {
  const int64_t P = g.plane();
  for (int64_t kg = 0; kg < g.G; ++kg) {
    if (out.koff) {
      T* o = out.koff + (n * 2 * g.G * g.K + kg * 2 * g.K + 2 * t) * P + q;
      o[0] = gk[2 * kg];
      o[P] = gk[2 * kg + 1];
    }
    gk[2 * kg] = gk[2 * kg + 1] = T(0);
  }
  for (int64_t dg = 0; dg < g.DG; ++dg) {
    if (out.doff) {
      T* o = out.doff + (n * 2 * g.DG * g.K + dg * 2 * g.K + 2 * t) * P + q;
      o[0] = gd[2 * dg];
      o[P] = gd[2 * dg + 1];
    }
    if (out.mask) out.mask[(n * g.DG * g.K + dg * g.K + t) * P + q] = gm[dg];
    gd[2 * dg] = gd[2 * dg + 1] = gm[dg] = T(0);
  }
}

// The gradient of one tap's bilinear data sample over channels [cs, cs + len)
// of segment sg at position p, scattered into its <= 4 input pixels of the
// image's (H, W, C) input gradient gimg.
template <typename T, typename Grad>
ERFTOOL_ALWAYS_INLINE void scatter_tap_grad(const Grad& gr, int64_t p, const Segment& sg,
                                            int64_t cs, int64_t len, int64_t C, Scratch<T>& s,
                                            T* gimg) {
  const BilinearCorners<T>& d = s.dc[sg.dg];
  if (d.index[0] < 0 && d.index[1] < 0 && d.index[2] < 0 && d.index[3] < 0) return;
  T* v = s.v.data();
  std::fill(v, v + len, T(0));
  gr.tap_grad(p, sg, cs, len, s.kc[sg.kg], s.m[sg.dg], v);
  for (int j = 0; j < 4; ++j)
    if (d.index[j] >= 0 && d.weight[j] != T(0)) axpy(len, d.weight[j], v, gimg + d.index[j] * C + cs);
}

// ---------------------------------------------------------------- depthwise backward

// The depthwise layers have no column rows to hand to a GEMM: one pass reads
// each tap's input and weight rows once per channel vector and produces every
// gradient from them. For a tap with sampled weight kv = sum_i kw_i W_i
// (scope corners i) and data sample vu = sum_j dw_j X_j (input corners j),
// mask m and grad_out go, per channel:
//   weight   W_i += m * kw_i * vu * go
//   input    X_j += m * dw_j * kv * go
// and the offset and mask gradients need only the channel sums
//   A_i = sum_c W_i vu go,  B_j = sum_c X_j kv go:
//   kernel offset m * sum_i slope_i A_i, data offset m * sum_j slope_j B_j,
//   mask sum_i kw_i A_i.
// (perf, depthwise 56x56x256: the generic pass plus a separate data-offset
// scatter read each row up to five times, in nine loops per tap.)

// Outputs of the depthwise pass (null = not wanted).
template <typename T>
struct DepthwiseOutputs {
  OffsetGrads<T> offsets;
  T* wacc = nullptr;  // weight gradient (S2, C) of this block, accumulated
  T* gin = nullptr;   // (N, H, W, C) input gradient from image gin_n0 on; callers
  int64_t gin_n0 = 0;  // keep concurrent writers apart
};

// The corners of one bilinear sample that take part, packed first and padded
// to four with zero rows to read and private scratch rows to write, so the
// channel loop has no branches and no two of its write rows alias.
template <typename T>
struct PackedCorners {
  const T* read[4];
  T* write[4];
  T w[4], dy[4], dx[4];
  int n = 0;
};

// slopes: keep zero-weight corners (their slope still counts). A corner with
// zero weight, or with no write base, writes to its scratch row.
template <typename T>
ERFTOOL_ALWAYS_INLINE PackedCorners<T> pack_corners(const BilinearCorners<T>& k, bool slopes,
                                                    const T* read_base, T* write_base,
                                                    int64_t stride, const T* zeros, T* scratch) {
  PackedCorners<T> u;
  // Every slot padded first: padding only the unused tail (a variable count)
  // was compiled to three `rep stos` memsets, 18 % of the pass with 8 channels.
  for (int s = 0; s < 4; ++s) {
    u.read[s] = zeros;
    u.write[s] = scratch + s * stride;
    u.w[s] = u.dy[s] = u.dx[s] = T(0);
  }
  for (int i = 0; i < 4; ++i) {
    if (k.index[i] < 0 || (k.weight[i] == T(0) && !slopes)) continue;
    const int s = u.n++;
    u.read[s] = read_base + k.index[i] * stride;
    if (write_base && k.weight[i] != T(0)) u.write[s] = write_base + k.index[i] * stride;
    u.w[s] = k.weight[i], u.dy[s] = k.d_dy[i], u.dx[s] = k.d_dx[i];
  }
  return u;
}

// One tap over `len` channels: NK scope corners and ND data corners (1 or 4),
// weight gradient (kW) and input gradient (kIn) accumulated in place; the
// channel sums A_i, B_j returned.
template <int NK, int ND, bool kW, bool kIn, typename T>
ERFTOOL_ALWAYS_INLINE void depthwise_tap_channels(int64_t len, T m, const T* __restrict go,
                                                  const PackedCorners<T>& k,
                                                  const PackedCorners<T>& d, T* A, T* B) {
  const T *__restrict W0 = k.read[0], *__restrict W1 = k.read[1];
  const T *__restrict W2 = k.read[2], *__restrict W3 = k.read[3];
  const T *__restrict X0 = d.read[0], *__restrict X1 = d.read[1];
  const T *__restrict X2 = d.read[2], *__restrict X3 = d.read[3];
  T *__restrict V0 = k.write[0], *__restrict V1 = k.write[1];
  T *__restrict V2 = k.write[2], *__restrict V3 = k.write[3];
  T *__restrict G0 = d.write[0], *__restrict G1 = d.write[1];
  T *__restrict G2 = d.write[2], *__restrict G3 = d.write[3];
  const T kw0 = k.w[0], kw1 = k.w[1], kw2 = k.w[2], kw3 = k.w[3];
  const T dw0 = d.w[0], dw1 = d.w[1], dw2 = d.w[2], dw3 = d.w[3];
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
  // The mask multiplies the two products once per channel, not each corner's
  // weight outside the loop: eight fewer live coefficients (16 vector
  // registers; the (4, 1) loop spilled its coefficients to the stack).
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t c = 0; c < len; ++c) {
    T kv = kw0 * W0[c], vu = dw0 * X0[c];
    if constexpr (NK > 1) kv += kw1 * W1[c] + kw2 * W2[c] + kw3 * W3[c];
    if constexpr (ND > 1) vu += dw1 * X1[c] + dw2 * X2[c] + dw3 * X3[c];
    const T vg = vu * go[c], kg = kv * go[c];
    a0 += W0[c] * vg;
    b0 += X0[c] * kg;
    if constexpr (NK > 1) a1 += W1[c] * vg, a2 += W2[c] * vg, a3 += W3[c] * vg;
    if constexpr (ND > 1) b1 += X1[c] * kg, b2 += X2[c] * kg, b3 += X3[c] * kg;
    if constexpr (kW) {
      const T mvg = m * vg;
      V0[c] += kw0 * mvg;
      if constexpr (NK > 1) V1[c] += kw1 * mvg, V2[c] += kw2 * mvg, V3[c] += kw3 * mvg;
    }
    if constexpr (kIn) {
      const T mkg = m * kg;
      G0[c] += dw0 * mkg;
      if constexpr (ND > 1) G1[c] += dw1 * mkg, G2[c] += dw2 * mkg, G3[c] += dw3 * mkg;
    }
  }
  A[0] = a0, A[1] = a1, A[2] = a2, A[3] = a3;
  B[0] = b0, B[1] = b1, B[2] = b2, B[3] = b3;
}

template <int NK, int ND, typename T>
ERFTOOL_ALWAYS_INLINE void depthwise_tap_wants(bool weight, bool input, int64_t len, T m,
                                               const T* go, const PackedCorners<T>& k,
                                               const PackedCorners<T>& d, T* A, T* B) {
  if (weight && input)
    depthwise_tap_channels<NK, ND, true, true>(len, m, go, k, d, A, B);
  else if (weight)
    depthwise_tap_channels<NK, ND, true, false>(len, m, go, k, d, A, B);
  else if (input)
    depthwise_tap_channels<NK, ND, false, true>(len, m, go, k, d, A, B);
  else
    depthwise_tap_channels<NK, ND, false, false>(len, m, go, k, d, A, B);
}

// The depthwise backward over positions [p0, p1) of the chunk; gout is the
// chunk's grad_out as (positions, C). With out.gin the caller must keep
// concurrent passes off each other's input pixels (row-block phases on a
// rigid grid, or one image per task).
template <typename T, typename Sampler>
ERFTOOL_ALWAYS_INLINE void depthwise_backward_rows(const Ctx<T>& c, const T* gout,
                                                   const DepthwiseOutputs<T>& out, int64_t p0,
                                                   int64_t p1, Sampler&& sampler) {
  const Geometry& g = *c.g;
  Scratch<T> s(g);
  const int64_t C = g.C;
  const std::vector<T> zeros(C, T(0));
  std::vector<T> scratch(8 * C);
  std::vector<T> gk(2 * g.G), gd(2 * g.DG), gm(g.DG);
  const OffsetGrads<T>& og = out.offsets;
  const bool weight = out.wacc != nullptr, input = out.gin != nullptr;
  for (int64_t p = p0; p < p1; ++p) {
    int64_t n, y, x;
    decode(c, p, &n, &y, &x);
    sampler.at(n, y, x);
    const int64_t q = y * g.Wo + x;
    const T* img = c.image(n);
    T* gimg = input ? out.gin + (n - out.gin_n0) * g.H * g.W * C : nullptr;
    const T* go = gout + p * C;
    for (int64_t a = 0; a < g.Kh; ++a)
      for (int64_t b = 0; b < g.Kw; ++b) {
        sampler.tap(a, b, s);
        for (int64_t si = 0; si < c.nsegs; ++si) {
          const Segment& sg = c.segs[si];
          const PackedCorners<T> k =
              pack_corners(s.kc[sg.kg], og.koff != nullptr, c.wt + sg.c0,
                           weight ? out.wacc + sg.c0 : nullptr, C, zeros.data(), scratch.data());
          const PackedCorners<T> d =
              pack_corners(s.dc[sg.dg], og.doff != nullptr, img + sg.c0,
                           input ? gimg + sg.c0 : nullptr, C, zeros.data(), scratch.data() + 4 * C);
          if (k.n == 0 || d.n == 0) continue;
          const T m = s.m[sg.dg];
          const int64_t len = sg.c1 - sg.c0;
          T A[4], B[4];
          if (k.n == 1 && d.n == 1)
            depthwise_tap_wants<1, 1>(weight, input, len, m, go + sg.c0, k, d, A, B);
          else if (d.n == 1)
            depthwise_tap_wants<4, 1>(weight, input, len, m, go + sg.c0, k, d, A, B);
          else if (k.n == 1)
            depthwise_tap_wants<1, 4>(weight, input, len, m, go + sg.c0, k, d, A, B);
          else
            depthwise_tap_wants<4, 4>(weight, input, len, m, go + sg.c0, k, d, A, B);
          for (int i = 0; i < k.n; ++i) {
            gk[2 * sg.kg] += m * k.dy[i] * A[i];
            gk[2 * sg.kg + 1] += m * k.dx[i] * A[i];
            gm[sg.dg] += k.w[i] * A[i];
          }
          for (int j = 0; j < d.n; ++j) {
            gd[2 * sg.dg] += m * d.dy[j] * B[j];
            gd[2 * sg.dg + 1] += m * d.dx[j] * B[j];
          }
        }
        flush_offset_grads(g, og, n, a * g.Kw + b, q, gk, gd, gm);
      }
  }
}

// Input gradient on a rigid data grid, gather form: each input pixel of rows
// task = (image in chunk, input row) sums over the taps that read it. Tasks
// [t0, t1) of nc * (iy_hi - iy_lo); gin is (N, H, W, C) and is accumulated.
template <typename T, typename Grad>
ERFTOOL_ALWAYS_INLINE void input_grad_gather(const Ctx<T>& c, const Grad& gr, int64_t iy_lo,
                                             int64_t iy_hi, int64_t t0, int64_t t1, T* gin) {
  const Geometry& g = *c.g;
  Scratch<T> s(g);
  const int64_t nrows = iy_hi - iy_lo;
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t ni = task / nrows, iy = iy_lo + task % nrows, n = c.n0 + ni;
    for (int64_t ix = 0; ix < g.W; ++ix) {
      T* dst = gin + ((n * g.H + iy) * g.W + ix) * g.C;
      for (int64_t a = 0; a < g.Kh; ++a) {
        const int64_t ynum = iy + g.ph - a * g.dh;
        if (ynum < 0 || ynum % g.sh != 0) continue;
        const int64_t y = ynum / g.sh;
        if (y < c.y0 || y >= c.y0 + c.rows) continue;
        for (int64_t b = 0; b < g.Kw; ++b) {
          const int64_t xnum = ix + g.pw - b * g.dw;
          if (xnum < 0 || xnum % g.sw != 0) continue;
          const int64_t x = xnum / g.sw;
          if (x >= g.Wo) continue;
          const int64_t p = (ni * c.rows + (y - c.y0)) * g.Wo + x;
          sample_tap(c, n, y, x, a, b, s);
          for (int64_t si = 0; si < c.nsegs; ++si) {
            const Segment& sg = c.segs[si];
            gr.tap_grad(p, sg, sg.c0, sg.c1 - sg.c0, s.kc[sg.kg], s.m[sg.dg], dst + sg.c0);
          }
        }
      }
    }
  }
}

// Input gradient with data offsets: a scatter into <= 4 pixels per tap. Each
// task owns (image in chunk, channel tile) of gin, so no two threads write
// the same element and the summation order is fixed.
template <typename T, typename Grad>
ERFTOOL_ALWAYS_INLINE void input_grad_scatter(const Ctx<T>& c, const Grad& gr, int64_t tile,
                                              int64_t t0, int64_t t1, T* gin) {
  const Geometry& g = *c.g;
  Scratch<T> s(g);
  const int64_t ntiles = (g.C + tile - 1) / tile, per_image = c.rows * g.Wo;
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t ni = task / ntiles, lo = (task % ntiles) * tile;
    const int64_t hi = std::min(g.C, lo + tile), n = c.n0 + ni;
    T* gimg = gin + n * g.H * g.W * g.C;
    for (int64_t pp = 0; pp < per_image; ++pp) {
      const int64_t p = ni * per_image + pp, y = c.y0 + pp / g.Wo, x = pp % g.Wo;
      for (int64_t a = 0; a < g.Kh; ++a)
        for (int64_t b = 0; b < g.Kw; ++b) {
          sample_tap(c, n, y, x, a, b, s);
          for (int64_t si = 0; si < c.nsegs; ++si) {
            const Segment& sg = c.segs[si];
            const int64_t cs = std::max(sg.c0, lo), ce = std::min(sg.c1, hi);
            if (cs >= ce) continue;
            scatter_tap_grad(gr, p, sg, cs, ce - cs, g.C, s, gimg);
          }
        }
    }
  }
}

}  // namespace cpu
}  // namespace erftool
