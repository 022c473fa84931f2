// CUDA kernels of the column form of erftool's unified deform op.
//
// Forward:  columns[c*S2 + s, col] = sum_k coef[g(c), col, k, s] * X[c, col, k]
//           out_g = W_g (C_out/groups x C_in/groups*S2) @ columns_g   (cuBLAS, in the glue)
// where coef[., ., k, .] is the (at most four-cell) bilinear stencil with which
// tap k samples the S_h x S_w scope, and X[c, col, k] = mask * input tap (rigid
// integer tap, or a bilinear sample at the data offset).
//
// Backward, from grad_columns = W_g^T @ grad_out_g (cuBLAS, in the glue):
//   dX[c, col, k]       = sum_s coef[.., k, s] * grad_columns[c*S2 + s, col]
//   d kernel offset     = sum_{c in group} X * sum_s dcoef/d(delta) * grad_columns
//   d mask              = sum_{c in group} (unmasked tap) * (sum_s coef * grad_columns)
//   d data offset       = sum_{c in group} mask * dX-part * d(bilinear input)/d(y, x)
//   d input             = rigid grid: gather over the taps reading each pixel;
//                         data offsets: fp32 / fp64 atomicAdd scatter.
//
// Thread layout of the per-position kernels: blocks of 32 positions (x, one
// warp: consecutive columns give coalesced loads and stores) by 8 channel
// lanes (y). A block first computes the coefficients of its 32 positions x K
// taps for its channel segment (one kernel-offset group and one data-offset
// group) into shared memory; every channel of the segment then reuses them.
//
// No torch headers: `nvcc -c` against the CUDA runtime alone
// (native/cuda/check_compile.sh). All indexing of tensors is int64.
#include "deform_kernels.cuh"

#include <erftool/deform_math.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace erftool {
namespace cuda {
namespace {

constexpr int kTileP = 32;      // positions per block (blockDim.x)
constexpr int kLanes = 8;       // channel lanes per block (blockDim.y)
constexpr int kThreads = kTileP * kLanes;
constexpr int kDefaultSmem = 48 * 1024;

// ---------------------------------------------------------------------------
// Scalar conversions (accumulate in float for the half types).

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Full-precision atomics only: float everywhere, double natively from sm_60
// (a compare-and-swap loop below that, for completeness).
__device__ __forceinline__ void atomic_add(float* address, float v) { atomicAdd(address, v); }
__device__ __forceinline__ void atomic_add(double* address, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  unsigned long long* a = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = *a, assumed;
  do {
    assumed = old;
    old = atomicCAS(a, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
  } while (assumed != old);
#else
  atomicAdd(address, v);
#endif
}

// ---------------------------------------------------------------------------
// Per-(position, tap) coefficients, kept in shared memory.

template <typename A>
struct TapCoef {
  A kly, klx;     // kernel side: fractional part of the scope coordinate
  A dly, dlx;     // data side: fractional part of the sample (deformed grid only)
  A m;            // mask (1 without mask)
  int didx[4];    // data side: flat index in the H x W plane of the corners (-1: outside)
  short kidx[4];  // kernel side: flat index in the S_h x S_w scope (-1: outside)
};

// Corner weights (and their derivatives along y / x) of a bilinear stencil
// given the fractional parts, in math::bilinear_corners' corner order.
template <typename A>
__device__ __forceinline__ void stencil(A ly, A lx, A* w) {
  const A hy = A(1) - ly, hx = A(1) - lx;
  w[0] = hy * hx;
  w[1] = hy * lx;
  w[2] = ly * hx;
  w[3] = ly * lx;
}
template <typename A>
__device__ __forceinline__ void stencil_grad(A ly, A lx, A* wy, A* wx) {
  const A hy = A(1) - ly, hx = A(1) - lx;
  wy[0] = -hx;
  wy[1] = -lx;
  wy[2] = hx;
  wy[3] = lx;
  wx[0] = -hy;
  wx[1] = hy;
  wx[2] = -ly;
  wx[3] = ly;
}

template <typename A>
__device__ __forceinline__ A frac_part(A v) {
  return v - floor(v);
}

// Scope coordinates (u, v) that tap k (= a*kw + b) samples at column `pos` of image n.
template <typename scalar_t>
__device__ __forceinline__ void scope_position(const DeformShape& sh,
                                               const scalar_t* kernel_offset, int64_t n,
                                               int64_t kg, int64_t k, int64_t P, int64_t pos,
                                               acc_t<scalar_t>* u, acc_t<scalar_t>* v) {
  using A = acc_t<scalar_t>;
  const int64_t K = int64_t(sh.kh) * sh.kw;
  const int64_t a = k / sh.kw, b = k % sh.kw;
  A du = A(0), dv = A(0);
  if (kernel_offset != nullptr) {
    const scalar_t* o = kernel_offset + ((n * sh.G + kg) * 2 * K + 2 * k) * P + pos;
    du = to_acc(o[0]);
    dv = to_acc(o[P]);
  }
  *u = math::scope_coordinate<A>(a, sh.kh, sh.scope_h, du);
  *v = math::scope_coordinate<A>(b, sh.kw, sh.scope_w, dv);
}

// Kernel-side stencil of a scope sample at (u, v).
template <typename A>
__device__ __forceinline__ void scope_stencil(const DeformShape& sh, A u, A v, A* ly, A* lx,
                                              int64_t* idx) {
  const math::BilinearCorners<A> c = math::bilinear_corners<A>(u, v, sh.scope_h, sh.scope_w);
  bool any = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    idx[i] = c.index[i];
    any = any || c.index[i] >= 0;
  }
  *ly = any ? frac_part(u) : A(0);
  *lx = any ? frac_part(v) : A(0);
}

// Kernel-side stencil of tap k at column `pos` of image n.
template <typename scalar_t>
__device__ __forceinline__ void kernel_side(const DeformShape& sh, const scalar_t* kernel_offset,
                                            int64_t n, int64_t kg, int64_t k, int64_t P,
                                            int64_t pos, acc_t<scalar_t>* ly, acc_t<scalar_t>* lx,
                                            int64_t* idx) {
  acc_t<scalar_t> u, v;
  scope_position(sh, kernel_offset, n, kg, k, P, pos, &u, &v);
  scope_stencil(sh, u, v, ly, lx, idx);
}

// The column build's register path (below) keeps a scope of up to
// kRegScope x kRegScope cells in registers; these are the dense row and
// column weights of one (position, tap) it reads.
constexpr int kRegScope = 4;

template <typename A>
struct ScopeRows {
  A row[kRegScope];
  A col[kRegScope];
};

// Coefficients of the block's 32 positions x K taps; with `rows`, also the
// register path's dense scope weights of each, from the same scope sample.
template <typename scalar_t, bool kDeform>
__device__ void fill_coefficients(const DeformShape& sh, int64_t tile0, int64_t cols, int64_t kg,
                                  int64_t dg, const scalar_t* kernel_offset,
                                  const scalar_t* data_offset, const scalar_t* mask,
                                  TapCoef<acc_t<scalar_t>>* coef,
                                  ScopeRows<acc_t<scalar_t>>* rows = nullptr) {
  using A = acc_t<scalar_t>;
  const int K = sh.kh * sh.kw;
  const int64_t P = sh.Ho * sh.Wo;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int e = tid; e < kTileP * K; e += blockDim.x * blockDim.y) {
    const int p = e / K, k = e % K;
    const int64_t col = tile0 + p;
    TapCoef<A> t;
    t.kly = t.klx = t.dly = t.dlx = A(0);
    t.m = A(1);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      t.didx[i] = -1;
      t.kidx[i] = -1;
    }
    // Beyond the last column: a sample outside the scope, all row weights 0.
    A u = A(-1), v = A(-1);
    if (col < cols) {
      const int64_t n = col / P, pos = col % P;
      const int64_t y = pos / sh.Wo, x = pos % sh.Wo;
      const int64_t a = k / sh.kw, b = k % sh.kw;

      int64_t kidx[4];
      scope_position(sh, kernel_offset, n, kg, int64_t(k), P, pos, &u, &v);
      scope_stencil(sh, u, v, &t.kly, &t.klx, kidx);
#pragma unroll
      for (int i = 0; i < 4; ++i) t.kidx[i] = static_cast<short>(kidx[i]);

      const int64_t iy = y * sh.stride_h - sh.pad_h + a * sh.dil_h;
      const int64_t ix = x * sh.stride_w - sh.pad_w + b * sh.dil_w;
      if (kDeform) {
        const scalar_t* o = data_offset + ((n * sh.DG + dg) * 2 * K + 2 * k) * P + pos;
        const A py = static_cast<A>(iy) + to_acc(o[0]);
        const A px = static_cast<A>(ix) + to_acc(o[P]);
        const math::BilinearCorners<A> c = math::bilinear_corners<A>(py, px, sh.H, sh.W);
        bool any = false;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          t.didx[i] = static_cast<int>(c.index[i]);
          any = any || c.index[i] >= 0;
        }
        if (any) {
          t.dly = frac_part(py);
          t.dlx = frac_part(px);
        }
      } else if (iy >= 0 && iy < sh.H && ix >= 0 && ix < sh.W) {
        t.didx[0] = static_cast<int>(iy * sh.W + ix);
      }
      if (mask != nullptr) t.m = to_acc(mask[((n * sh.DG + dg) * K + k) * P + pos]);
    }
    coef[e] = t;
    if (rows != nullptr) {
      ScopeRows<A> r;
      math::axis_weights<kRegScope>(math::axis_sample(u, int64_t(sh.scope_h)), sh.scope_h, r.row);
      math::axis_weights<kRegScope>(math::axis_sample(v, int64_t(sh.scope_w)), sh.scope_w, r.col);
      rows[e] = r;
    }
  }
}

// Unmasked input tap and (deformed grid only) its derivatives along y / x.
template <typename scalar_t, bool kDeform, bool kGrad>
__device__ __forceinline__ acc_t<scalar_t> tap_value(const scalar_t* plane,
                                                     const TapCoef<acc_t<scalar_t>>& t,
                                                     acc_t<scalar_t>* vdy, acc_t<scalar_t>* vdx) {
  using A = acc_t<scalar_t>;
  if (!kDeform) return t.didx[0] >= 0 ? to_acc(plane[t.didx[0]]) : A(0);
  A w[4];
  stencil(t.dly, t.dlx, w);
  A v = A(0);
  A wy[4], wx[4];
  if (kGrad) {
    stencil_grad(t.dly, t.dlx, wy, wx);
    *vdy = A(0);
    *vdx = A(0);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (t.didx[i] >= 0) {
      const A pv = to_acc(plane[t.didx[i]]);
      v += w[i] * pv;
      if (kGrad) {
        *vdy += wy[i] * pv;
        *vdx += wx[i] * pv;
      }
    }
  }
  return v;
}

// ---------------------------------------------------------------------------
// (a) Column build. Three ways to accumulate a channel's S2 scope cells:
//   * kIdentity: a rigid scope (no kernel offsets, S = K, i.e. DCN): tap k is
//     cell k with weight 1, written straight out;
//   * kRegisters: scopes up to kRegScope x kRegScope: the cells live in
//     registers, and every tap adds the outer product of its dense row and
//     column weights (16 FMAs at scope 4: no dynamic indexing, no shared
//     memory traffic beyond one read of the tap's weights);
//   * kShared: any scope: the cells live in shared memory, in slabs, and each
//     tap adds into its (up to four) cells.

enum class ColumnPath { kIdentity, kRegisters, kShared };

// The input channels [begin, end) a block of the column-build grid works on
// (blockIdx.y: a channel segment, possibly split over several blocks), and
// that segment's kernel-offset and data-offset groups.
struct BlockChannels {
  int64_t begin, end, kg, dg;
};

__device__ __forceinline__ BlockChannels block_channels(const DeformShape& sh, int64_t Cs,
                                                        int splits) {
  const int64_t seg = blockIdx.y / splits, split = blockIdx.y % splits;
  const int64_t per_split = (Cs + splits - 1) / splits;
  const int64_t begin = seg * Cs + split * per_split;
  return BlockChannels{begin, min(begin + per_split, (seg + 1) * Cs), seg * Cs / (sh.C / sh.G),
                       seg * Cs / (sh.C / sh.DG)};
}

template <typename scalar_t, bool kDeform, ColumnPath kPath>
__global__ void __launch_bounds__(kThreads)
    build_columns_kernel(DeformShape sh, int64_t cols, int64_t Cs, int splits, int slab,
                         int coef_bytes, const scalar_t* __restrict__ input,
                         const scalar_t* __restrict__ kernel_offset,
                         const scalar_t* __restrict__ data_offset,
                         const scalar_t* __restrict__ mask, scalar_t* __restrict__ columns) {
  using A = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  TapCoef<A>* coef = reinterpret_cast<TapCoef<A>*>(smem);
  // After the coefficients: kRegisters' scope rows, or kShared's accumulators.
  ScopeRows<A>* rows = reinterpret_cast<ScopeRows<A>*>(smem + coef_bytes);
  A* acc = reinterpret_cast<A*>(smem + coef_bytes);

  const int K = sh.kh * sh.kw;
  const int64_t S2 = int64_t(sh.scope_h) * sh.scope_w;
  const int64_t P = sh.Ho * sh.Wo;
  const int64_t HW = sh.H * sh.W;
  const int64_t tile0 = int64_t(blockIdx.x) * kTileP;
  const BlockChannels ch = block_channels(sh, Cs, splits);

  fill_coefficients<scalar_t, kDeform>(sh, tile0, cols, ch.kg, ch.dg, kernel_offset, data_offset,
                                       mask, coef,
                                       kPath == ColumnPath::kRegisters ? rows : nullptr);
  __syncthreads();

  const int p = threadIdx.x;
  const int tid = threadIdx.y * kTileP + threadIdx.x;
  const int64_t col = tile0 + p;
  if (col >= cols) return;  // no barrier below
  const int64_t n = col / P;
  const TapCoef<A>* my = coef + p * K;

  for (int64_t c = ch.begin + threadIdx.y; c < ch.end; c += kLanes) {
    const scalar_t* plane = input + (n * sh.C + c) * HW;
    scalar_t* out = columns + (c * S2) * cols + col;
    if constexpr (kPath == ColumnPath::kIdentity) {
      for (int k = 0; k < K; ++k) {
        const TapCoef<A> t = my[k];
        out[k * cols] = from_acc<scalar_t>(
            t.m * tap_value<scalar_t, kDeform, false>(plane, t, nullptr, nullptr));
      }
    } else if constexpr (kPath == ColumnPath::kRegisters) {
      const ScopeRows<A>* my_rows = rows + p * K;
      A cell[kRegScope][kRegScope] = {};
      for (int k = 0; k < K; ++k) {
        const TapCoef<A> t = my[k];
        const ScopeRows<A> r = my_rows[k];
        const A x = t.m * tap_value<scalar_t, kDeform, false>(plane, t, nullptr, nullptr);
#pragma unroll
        for (int i = 0; i < kRegScope; ++i) {
          const A xr = x * r.row[i];
#pragma unroll
          for (int j = 0; j < kRegScope; ++j) cell[i][j] += xr * r.col[j];
        }
      }
#pragma unroll
      for (int i = 0; i < kRegScope; ++i)
#pragma unroll
        for (int j = 0; j < kRegScope; ++j)
          if (i < sh.scope_h && j < sh.scope_w)
            out[(i * sh.scope_w + j) * cols] = from_acc<scalar_t>(cell[i][j]);
    } else {
      A* my_acc = acc + tid;
      for (int64_t s0 = 0; s0 < S2; s0 += slab) {
        const int ns = static_cast<int>(min(int64_t(slab), S2 - s0));
        for (int s = 0; s < ns; ++s) my_acc[s * kThreads] = A(0);
        for (int k = 0; k < K; ++k) {
          const TapCoef<A> t = my[k];
          if (t.kidx[0] < 0 && t.kidx[1] < 0 && t.kidx[2] < 0 && t.kidx[3] < 0) continue;
          const A x = t.m * tap_value<scalar_t, kDeform, false>(plane, t, nullptr, nullptr);
          A w[4];
          stencil(t.kly, t.klx, w);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t si = int64_t(t.kidx[i]) - s0;
            if (si >= 0 && si < ns) my_acc[si * kThreads] += w[i] * x;
          }
        }
        for (int s = 0; s < ns; ++s)
          out[(s0 + s) * cols] = from_acc<scalar_t>(my_acc[s * kThreads]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// (a') Depthwise forward (one input channel per group): no columns and no
// per-group products (a depthwise layer has one per channel). The block
// layout and coefficients are the column build's; each output channel o of
// input channel c = o / multiplier takes, per tap, the tap value times the
// bilinear sample of o's scope at the tap's kernel-side stencil.

template <typename scalar_t, bool kDeform>
__global__ void __launch_bounds__(kThreads)
    depthwise_forward_kernel(DeformShape sh, int64_t cols, int64_t Cs, int splits,
                             int64_t multiplier, const scalar_t* __restrict__ input,
                             const scalar_t* __restrict__ weight,
                             const scalar_t* __restrict__ kernel_offset,
                             const scalar_t* __restrict__ data_offset,
                             const scalar_t* __restrict__ mask, scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  TapCoef<A>* coef = reinterpret_cast<TapCoef<A>*>(smem);

  const int K = sh.kh * sh.kw;
  const int64_t S2 = int64_t(sh.scope_h) * sh.scope_w;
  const int64_t P = sh.Ho * sh.Wo;
  const int64_t HW = sh.H * sh.W;
  const int64_t c_out = sh.C * multiplier;
  const int64_t tile0 = int64_t(blockIdx.x) * kTileP;
  const BlockChannels ch = block_channels(sh, Cs, splits);

  fill_coefficients<scalar_t, kDeform>(sh, tile0, cols, ch.kg, ch.dg, kernel_offset, data_offset,
                                       mask, coef);
  __syncthreads();

  const int p = threadIdx.x;
  const int64_t col = tile0 + p;
  if (col >= cols) return;  // no barrier below
  const int64_t n = col / P, pos = col % P;
  const TapCoef<A>* my = coef + p * K;

  for (int64_t c = ch.begin + threadIdx.y; c < ch.end; c += kLanes) {
    const scalar_t* plane = input + (n * sh.C + c) * HW;
    for (int64_t o = c * multiplier; o < (c + 1) * multiplier; ++o) {
      const scalar_t* scope = weight + o * S2;
      A sum = A(0);
      for (int k = 0; k < K; ++k) {
        const TapCoef<A> t = my[k];
        A w[4];
        stencil(t.kly, t.klx, w);
        A sampled = A(0);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (t.kidx[i] >= 0) sampled += w[i] * to_acc(scope[t.kidx[i]]);
        sum += t.m * tap_value<scalar_t, kDeform, false>(plane, t, nullptr, nullptr) * sampled;
      }
      out[(n * c_out + o) * P + pos] = from_acc<scalar_t>(sum);
    }
  }
}

// ---------------------------------------------------------------------------
// (b1) Fused backward pass: offset / mask gradients reduced over a segment's
// channels (per-thread sums, then a block reduction over the 8 lanes through
// shared memory: no global atomics), plus the atomic grad_input scatter of the
// deformed data grid.

template <typename scalar_t, bool kDeform>
__global__ void __launch_bounds__(kThreads)
    backward_fused_kernel(DeformShape sh, int64_t cols, int64_t U, int coef_bytes,
                          const scalar_t* __restrict__ grad_columns,
                          const scalar_t* __restrict__ input,
                          const scalar_t* __restrict__ kernel_offset,
                          const scalar_t* __restrict__ data_offset,
                          const scalar_t* __restrict__ mask, acc_t<scalar_t>* part_kernel_offset,
                          acc_t<scalar_t>* part_data_offset, acc_t<scalar_t>* part_mask,
                          acc_t<scalar_t>* grad_input_acc) {
  using A = acc_t<scalar_t>;
  constexpr int kSums = 5;
  extern __shared__ __align__(16) unsigned char smem[];
  TapCoef<A>* coef = reinterpret_cast<TapCoef<A>*>(smem);
  A* red = reinterpret_cast<A*>(smem + coef_bytes);  // [kSums][kLanes][kTileP]

  const int K = sh.kh * sh.kw;
  const int64_t S2 = int64_t(sh.scope_h) * sh.scope_w;
  const int64_t P = sh.Ho * sh.Wo;
  const int64_t HW = sh.H * sh.W;
  const int64_t Cs = sh.C / U;
  const int64_t tile0 = int64_t(blockIdx.x) * kTileP;
  const int64_t seg = blockIdx.y;
  const int64_t cb = seg * Cs, ce = cb + Cs;
  const int64_t kg = cb / (sh.C / sh.G);
  const int64_t dg = cb / (sh.C / sh.DG);

  fill_coefficients<scalar_t, kDeform>(sh, tile0, cols, kg, dg, kernel_offset, data_offset, mask,
                                       coef);
  __syncthreads();

  const int p = threadIdx.x;
  const int lane = threadIdx.y;
  const int64_t col = tile0 + p;
  const bool valid = col < cols;
  const int64_t n = valid ? col / P : 0;
  const int64_t pos = valid ? col % P : 0;
  const TapCoef<A>* my = coef + p * K;

  for (int k = 0; k < K; ++k) {
    A sum[kSums] = {A(0), A(0), A(0), A(0), A(0)};  // d_krow, d_kcol, d_mask, d_drow, d_dcol
    if (valid) {
      const TapCoef<A> t = my[k];
      A w[4], wy[4], wx[4];
      stencil(t.kly, t.klx, w);
      stencil_grad(t.kly, t.klx, wy, wx);
      A dw[4];
      if (kDeform) stencil(t.dly, t.dlx, dw);
      for (int64_t c = cb + lane; c < ce; c += kLanes) {
        const scalar_t* gc = grad_columns + (c * S2) * cols + col;
        A g = A(0), gy = A(0), gx = A(0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (t.kidx[i] >= 0) {
            const A gv = to_acc(gc[int64_t(t.kidx[i]) * cols]);
            g += w[i] * gv;
            gy += wy[i] * gv;
            gx += wx[i] * gv;
          }
        }
        const scalar_t* plane = input + (n * sh.C + c) * HW;
        A vdy = A(0), vdx = A(0);
        const A v = tap_value<scalar_t, kDeform, kDeform>(plane, t, &vdy, &vdx);
        const A xv = t.m * v;
        sum[0] += xv * gy;
        sum[1] += xv * gx;
        sum[2] += v * g;
        if (kDeform) {
          const A dx = t.m * g;
          sum[3] += dx * vdy;
          sum[4] += dx * vdx;
          if (grad_input_acc != nullptr && dx != A(0)) {
            A* gplane = grad_input_acc + (n * sh.C + c) * HW;
#pragma unroll
            for (int i = 0; i < 4; ++i)
              if (t.didx[i] >= 0) atomic_add(gplane + t.didx[i], dw[i] * dx);
          }
        }
      }
    }
    const int nsums = kDeform ? 5 : 3;
    for (int q = 0; q < nsums; ++q) red[(q * kLanes + lane) * kTileP + p] = sum[q];
    __syncthreads();
    if (lane < nsums && valid) {
      // Lane q finalises sum q for the 32 positions (fixed order: deterministic).
      const int q = lane;
      A total = A(0);
      for (int l = 0; l < kLanes; ++l) total += red[(q * kLanes + l) * kTileP + p];
      if (q < 2) {
        if (part_kernel_offset != nullptr)
          part_kernel_offset[((n * U + seg) * 2 * K + 2 * k + q) * P + pos] = total;
      } else if (q == 2) {
        if (part_mask != nullptr) part_mask[((n * U + seg) * K + k) * P + pos] = total;
      } else {
        if (part_data_offset != nullptr)
          part_data_offset[((n * U + seg) * 2 * K + 2 * k + (q - 3)) * P + pos] = total;
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// (b2) Rigid-grid grad_input, gather form: one thread per input element.

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    grad_input_rigid_kernel(DeformShape sh, int64_t cols, const scalar_t* __restrict__ grad_columns,
                            const scalar_t* __restrict__ kernel_offset,
                            const scalar_t* __restrict__ mask, scalar_t* __restrict__ grad_input) {
  using A = acc_t<scalar_t>;
  const int64_t K = int64_t(sh.kh) * sh.kw;
  const int64_t S2 = int64_t(sh.scope_h) * sh.scope_w;
  const int64_t P = sh.Ho * sh.Wo;
  const int64_t total = sh.nb * sh.C * sh.H * sh.W;
  const int64_t cpg = sh.C / sh.G, cpdg = sh.C / sh.DG;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(blockDim.x) * gridDim.x) {
    const int64_t ix = e % sh.W;
    const int64_t iy = (e / sh.W) % sh.H;
    const int64_t c = (e / (sh.W * sh.H)) % sh.C;
    const int64_t n = e / (sh.W * sh.H * sh.C);
    const int64_t kg = c / cpg, dg = c / cpdg;
    const scalar_t* gc = grad_columns + (c * S2) * cols + n * P;
    A sum = A(0);
    for (int64_t a = 0; a < sh.kh; ++a) {
      const int64_t ty = iy + sh.pad_h - a * sh.dil_h;
      if (ty < 0 || ty % sh.stride_h != 0) continue;
      const int64_t y = ty / sh.stride_h;
      if (y >= sh.Ho) continue;
      for (int64_t b = 0; b < sh.kw; ++b) {
        const int64_t tx = ix + sh.pad_w - b * sh.dil_w;
        if (tx < 0 || tx % sh.stride_w != 0) continue;
        const int64_t x = tx / sh.stride_w;
        if (x >= sh.Wo) continue;
        const int64_t pos = y * sh.Wo + x;
        const int64_t k = a * sh.kw + b;
        A ly, lx;
        int64_t idx[4];
        kernel_side(sh, kernel_offset, n, kg, k, P, pos, &ly, &lx, idx);
        A w[4];
        stencil(ly, lx, w);
        A g = A(0);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (idx[i] >= 0) g += w[i] * to_acc(gc[idx[i] * cols + pos]);
        if (mask != nullptr) g *= to_acc(mask[((n * sh.DG + dg) * K + k) * P + pos]);
        sum += g;
      }
    }
    grad_input[e] = from_acc<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------
// (c) Helpers.

template <typename scalar_t>
__global__ void reduce_segments_kernel(int64_t nb, int64_t U, int64_t G, int64_t J, int64_t P,
                                       const acc_t<scalar_t>* __restrict__ part,
                                       scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  const int64_t R = U / G;
  const int64_t total = nb * G * J * P;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(blockDim.x) * gridDim.x) {
    const int64_t p = e % P;
    const int64_t j = (e / P) % J;
    const int64_t g = (e / (P * J)) % G;
    const int64_t n = e / (P * J * G);
    A s = A(0);
    for (int64_t r = 0; r < R; ++r) s += part[((n * U + g * R + r) * J + j) * P + p];
    out[e] = from_acc<scalar_t>(s);
  }
}

// One thread per kernel entry (image, o, c), all of its taps: consecutive
// threads take consecutive c, so the tap-major stores are coalesced.
template <typename scalar_t>
__global__ void global_kernels_kernel(math::GlobalKernelShape shape, bool tap_major,
                                      int64_t entries, const scalar_t* __restrict__ weight,
                                      const scalar_t* __restrict__ offset,
                                      scalar_t* __restrict__ out) {
  using A = acc_t<scalar_t>;
  const auto load_weight = [weight](int64_t i) { return to_acc(weight[i]); };
  const auto load_offset = [offset](int64_t i) { return to_acc(offset[i]); };
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = e % shape.cg, o = e / shape.cg % shape.c_out;
    const int64_t n = e / (shape.cg * shape.c_out);
    // The threads of a warp mostly share n and the offset group, so the
    // corners cost about one computation per warp.
    const int64_t g = math::global_kernel_group(shape, o, c);
    for (int64_t k = 0; k < shape.kh * shape.kw; ++k) {
      const math::BilinearCorners<A> corners =
          math::global_kernel_corners<A>(shape, n, g, k, load_offset);
      out[math::global_kernel_index(shape, tap_major, n, o, c, k)] =
          from_acc<scalar_t>(math::global_kernel_value(shape, corners, o, c, load_weight));
    }
  }
}

// Scope cells a thread of the weight-gradient kernel sums per pass (a local
// array; larger scopes take several passes).
constexpr int kCellTile = 64;

// Backward of global_kernels_kernel, scope-weight part: one thread per kernel
// entry (o, c), summing over images and taps the kernel gradient times each
// corner's weight into its scope cell (deterministic: no atomics). A thread
// per scope cell would recompute every sample's corners once per cell.
template <typename scalar_t>
__global__ void global_kernels_weight_grad_kernel(math::GlobalKernelShape shape, bool tap_major,
                                                  int64_t entries,
                                                  const scalar_t* __restrict__ grad,
                                                  const scalar_t* __restrict__ offset,
                                                  scalar_t* __restrict__ grad_weight) {
  using A = acc_t<scalar_t>;
  const auto load_offset = [offset](int64_t i) { return to_acc(offset[i]); };
  const int64_t cells = shape.scope_h * shape.scope_w;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = e % shape.cg, o = e / shape.cg;
    const int64_t g = math::global_kernel_group(shape, o, c);
    for (int64_t first = 0; first < cells; first += kCellTile) {
      A sums[kCellTile];
      for (int i = 0; i < kCellTile; ++i) sums[i] = A(0);
      for (int64_t n = 0; n < shape.n; ++n)
        for (int64_t k = 0; k < shape.kh * shape.kw; ++k) {
          const math::BilinearCorners<A> corners =
              math::global_kernel_corners<A>(shape, n, g, k, load_offset);
          const A gk = to_acc(grad[math::global_kernel_index(shape, tap_major, n, o, c, k)]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t cell = corners.index[i] - first;
            if (corners.index[i] >= 0 && cell >= 0 && cell < kCellTile)
              sums[cell] += corners.weight[i] * gk;
          }
        }
      const int64_t width = cells - first < kCellTile ? cells - first : kCellTile;
      for (int64_t i = 0; i < width; ++i)
        grad_weight[e * cells + first + i] = from_acc<scalar_t>(sums[i]);
    }
  }
}

// Offset part: one block per sample (image, offset group, tap), whose threads
// stride over the kernel entries of that group (kernel gradient times the
// sample's slopes), then add their sums in a fixed tree in shared memory.
// blockDim.x is a power of two.
template <typename scalar_t>
__global__ void global_kernels_offset_grad_kernel(math::GlobalKernelShape shape, bool tap_major,
                                                  const scalar_t* __restrict__ grad,
                                                  const scalar_t* __restrict__ weight,
                                                  const scalar_t* __restrict__ offset,
                                                  scalar_t* __restrict__ grad_offset) {
  using A = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  A* sums = reinterpret_cast<A*>(smem);  // (2, blockDim.x): rows, then columns
  const auto load_weight = [weight](int64_t i) { return to_acc(weight[i]); };
  const auto load_offset = [offset](int64_t i) { return to_acc(offset[i]); };
  const int64_t taps = shape.kh * shape.kw, sample = blockIdx.x;
  const int64_t n = sample / (shape.offset_groups * taps), g = sample / taps % shape.offset_groups;
  const int64_t k = sample % taps;
  const math::BilinearCorners<A> corners =
      math::global_kernel_corners<A>(shape, n, g, k, load_offset);
  A sy = A(0), sx = A(0);
  for (int64_t e = threadIdx.x; e < shape.c_out * shape.cg; e += blockDim.x) {
    const int64_t c = e % shape.cg, o = e / shape.cg;
    if (math::global_kernel_group(shape, o, c) != g) continue;
    A dy, dx;
    math::global_kernel_slopes(shape, corners, o, c, load_weight, &dy, &dx);
    const A gk = to_acc(grad[math::global_kernel_index(shape, tap_major, n, o, c, k)]);
    sy += gk * dy;
    sx += gk * dx;
  }
  const unsigned t = threadIdx.x, width = blockDim.x;
  sums[t] = sy;
  sums[width + t] = sx;
  __syncthreads();
  for (unsigned half = width / 2; half > 0; half /= 2) {
    if (t < half) {
      sums[t] += sums[t + half];
      sums[width + t] += sums[width + t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    grad_offset[sample * 2] = from_acc<scalar_t>(sums[0]);
    grad_offset[sample * 2 + 1] = from_acc<scalar_t>(sums[width]);
  }
}

template <typename scalar_t>
__global__ void cast_kernel(const acc_t<scalar_t>* __restrict__ src, scalar_t* __restrict__ dst,
                            int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(blockDim.x) * gridDim.x)
    dst[e] = from_acc<scalar_t>(src[e]);
}

// ---------------------------------------------------------------------------
// Host side.

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct DeviceInfo {
  int sms = 1;
  int smem_optin = kDefaultSmem;
};

cudaError_t device_info(DeviceInfo* info) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  info->smem_optin = std::max(info->smem_optin, kDefaultSmem);
  return cudaSuccess;
}

// Grid-stride launch size for the element-wise kernels.
unsigned int elementwise_blocks(int64_t n, const DeviceInfo& info) {
  const int64_t want = (n + 255) / 256;
  const int64_t cap = int64_t(info.sms) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(want, cap)));
}

bool shape_ok(const DeformShape& sh) {
  const int64_t S2 = int64_t(sh.scope_h) * sh.scope_w;
  if (sh.nb <= 0 || sh.C <= 0 || sh.Ho <= 0 || sh.Wo <= 0) return false;
  if (sh.H * sh.W >= INT_MAX || S2 >= SHRT_MAX) return false;
  if (sh.G <= 0 || sh.DG <= 0 || sh.C % sh.G != 0 || sh.C % sh.DG != 0) return false;
  if (sh.kh <= 0 || sh.kw <= 0 || sh.stride_h <= 0 || sh.stride_w <= 0) return false;
  return true;
}

// Opt in to more than 48 KiB of dynamic shared memory when needed.
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// The grid of the per-position kernels (column build, depthwise forward):
// tiles of 32 positions by channel segments, a segment's channels split over
// several blocks only when the grid would otherwise leave SMs idle (each
// block keeps at least 8 channels per lane).
cudaError_t channel_grid(const DeformShape& sh, const DeviceInfo& info, dim3* grid,
                         int64_t* splits) {
  const int64_t cols = sh.nb * sh.Ho * sh.Wo;
  const int64_t U = num_segments(sh.G, sh.DG);
  const int64_t Cs = sh.C / U;
  const int64_t tiles = (cols + kTileP - 1) / kTileP;
  const int64_t target = int64_t(info.sms) * 4;
  int64_t s = (target + tiles * U - 1) / (tiles * U);
  s = std::max<int64_t>(1, std::min<int64_t>(s, (Cs + 8 * kLanes - 1) / (8 * kLanes)));
  if (tiles > INT_MAX || U * s > 65535) return cudaErrorInvalidValue;
  *grid = dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(U * s));
  *splits = s;
  return cudaSuccess;
}

// ERFTOOL_CUDA_COLUMN_BUILD=shared forces the shared-memory path of the column
// build (any scope), so that one benchmark run can time it against the
// register and identity paths on the same device.
bool shared_column_path_forced() {
  const char* v = std::getenv("ERFTOOL_CUDA_COLUMN_BUILD");
  return v != nullptr && std::strcmp(v, "shared") == 0;
}

template <typename scalar_t, bool kDeform, ColumnPath kPath>
cudaError_t launch_columns_path(const DeformShape& sh, int64_t cols, int64_t Cs, dim3 grid,
                                int64_t splits, int64_t slab, int64_t coef_bytes, int64_t smem,
                                const scalar_t* input, const scalar_t* kernel_offset,
                                const scalar_t* data_offset, const scalar_t* mask,
                                scalar_t* columns, cudaStream_t stream) {
  auto kernel = build_columns_kernel<scalar_t, kDeform, kPath>;
  cudaError_t err = prepare_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, dim3(kTileP, kLanes), smem, stream>>>(
      sh, cols, Cs, static_cast<int>(splits), static_cast<int>(slab),
      static_cast<int>(coef_bytes), input, kernel_offset, data_offset, mask, columns);
  return cudaGetLastError();
}

template <typename scalar_t, bool kDeform>
cudaError_t launch_columns(ColumnPath path, const DeformShape& sh, int64_t cols, int64_t Cs,
                           dim3 grid, int64_t splits, int64_t slab, int64_t coef_bytes,
                           int64_t smem, const scalar_t* input, const scalar_t* kernel_offset,
                           const scalar_t* data_offset, const scalar_t* mask, scalar_t* columns,
                           cudaStream_t stream) {
  switch (path) {
    case ColumnPath::kIdentity:
      return launch_columns_path<scalar_t, kDeform, ColumnPath::kIdentity>(
          sh, cols, Cs, grid, splits, slab, coef_bytes, smem, input, kernel_offset,
          data_offset, mask, columns, stream);
    case ColumnPath::kRegisters:
      return launch_columns_path<scalar_t, kDeform, ColumnPath::kRegisters>(
          sh, cols, Cs, grid, splits, slab, coef_bytes, smem, input, kernel_offset,
          data_offset, mask, columns, stream);
    default:
      return launch_columns_path<scalar_t, kDeform, ColumnPath::kShared>(
          sh, cols, Cs, grid, splits, slab, coef_bytes, smem, input, kernel_offset,
          data_offset, mask, columns, stream);
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_build_columns(const DeformShape& sh, const scalar_t* input,
                                 const scalar_t* kernel_offset, const scalar_t* data_offset,
                                 const scalar_t* mask, scalar_t* columns, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  if (!shape_ok(sh)) return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;

  const int64_t K = int64_t(sh.kh) * sh.kw;
  const int64_t S2 = int64_t(sh.scope_h) * sh.scope_w;
  const int64_t cols = sh.nb * sh.Ho * sh.Wo;
  const int64_t Cs = sh.C / num_segments(sh.G, sh.DG);
  const int64_t coef_bytes = round_up(kTileP * K * int64_t(sizeof(TapCoef<A>)), 16);
  const int64_t avail = info.smem_optin - coef_bytes;
  if (avail < 0) return cudaErrorInvalidValue;
  const int64_t rows_bytes = kTileP * K * int64_t(sizeof(ScopeRows<A>));
  ColumnPath path = ColumnPath::kShared;
  if (kernel_offset == nullptr && sh.scope_h == sh.kh && sh.scope_w == sh.kw)
    path = ColumnPath::kIdentity;
  else if (sh.scope_h <= kRegScope && sh.scope_w <= kRegScope && rows_bytes <= avail)
    path = ColumnPath::kRegisters;
  if (shared_column_path_forced()) path = ColumnPath::kShared;

  // kShared: scope cells accumulated at once, up to 32 KiB of shared accumulators.
  int64_t slab = std::min<int64_t>(S2, std::max<int64_t>(1, 32768 / (kThreads * sizeof(A))));
  slab = std::min<int64_t>(slab, avail / (kThreads * sizeof(A)));
  int64_t smem = coef_bytes;
  if (path == ColumnPath::kRegisters) smem += rows_bytes;
  if (path == ColumnPath::kShared) {
    if (slab < 1) return cudaErrorInvalidValue;
    smem += slab * kThreads * int64_t(sizeof(A));
  }

  int64_t splits = 1;
  dim3 grid;
  if ((err = channel_grid(sh, info, &grid, &splits)) != cudaSuccess) return err;
  if (data_offset != nullptr)
    return launch_columns<scalar_t, true>(path, sh, cols, Cs, grid, splits, slab, coef_bytes,
                                          smem, input, kernel_offset, data_offset, mask,
                                          columns, stream);
  return launch_columns<scalar_t, false>(path, sh, cols, Cs, grid, splits, slab, coef_bytes,
                                         smem, input, kernel_offset, nullptr, mask, columns,
                                         stream);
}

template <typename scalar_t>
cudaError_t launch_depthwise_forward(const DeformShape& sh, int64_t multiplier,
                                     const scalar_t* input, const scalar_t* weight,
                                     const scalar_t* kernel_offset, const scalar_t* data_offset,
                                     const scalar_t* mask, scalar_t* out, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  if (!shape_ok(sh) || multiplier <= 0) return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  const int64_t K = int64_t(sh.kh) * sh.kw;
  const int64_t smem = round_up(kTileP * K * int64_t(sizeof(TapCoef<A>)), 16);
  if (smem > info.smem_optin) return cudaErrorInvalidValue;
  int64_t splits = 1;
  dim3 grid;
  if ((err = channel_grid(sh, info, &grid, &splits)) != cudaSuccess) return err;
  const int64_t cols = sh.nb * sh.Ho * sh.Wo;
  const int64_t Cs = sh.C / num_segments(sh.G, sh.DG);
  if (data_offset != nullptr) {
    auto kernel = depthwise_forward_kernel<scalar_t, true>;
    if ((err = prepare_smem(kernel, smem)) != cudaSuccess) return err;
    kernel<<<grid, dim3(kTileP, kLanes), smem, stream>>>(sh, cols, Cs, static_cast<int>(splits),
                                                         multiplier, input, weight, kernel_offset,
                                                         data_offset, mask, out);
  } else {
    auto kernel = depthwise_forward_kernel<scalar_t, false>;
    if ((err = prepare_smem(kernel, smem)) != cudaSuccess) return err;
    kernel<<<grid, dim3(kTileP, kLanes), smem, stream>>>(sh, cols, Cs, static_cast<int>(splits),
                                                         multiplier, input, weight, kernel_offset,
                                                         nullptr, mask, out);
  }
  return cudaGetLastError();
}

int64_t fused_backward_segments(const DeformShape& sh) {
  const int64_t U = num_segments(sh.G, sh.DG);
  if (!shape_ok(sh)) return U;
  DeviceInfo info;
  if (device_info(&info) != cudaSuccess) return U;
  const int64_t cols = sh.nb * sh.Ho * sh.Wo;
  const int64_t tiles = (cols + kTileP - 1) / kTileP;
  const int64_t Cs = sh.C / U;
  const int64_t want = (int64_t(info.sms) * 4 + tiles * U - 1) / (tiles * U);
  // Largest divisor of Cs not above `want` that keeps >= 4 channels per lane.
  int64_t best = 1;
  for (int64_t d = 1; d <= std::min(want, Cs); ++d)
    if (Cs % d == 0 && Cs / d >= 4 * kLanes) best = d;
  return U * best;
}

template <typename scalar_t>
cudaError_t launch_backward_fused(const DeformShape& sh, int64_t segments,
                                  const scalar_t* grad_columns, const scalar_t* input, const scalar_t* kernel_offset,
                                  const scalar_t* data_offset, const scalar_t* mask,
                                  acc_t<scalar_t>* part_kernel_offset,
                                  acc_t<scalar_t>* part_data_offset, acc_t<scalar_t>* part_mask,
                                  acc_t<scalar_t>* grad_input_acc, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  if (!shape_ok(sh)) return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;

  const int64_t K = int64_t(sh.kh) * sh.kw;
  const int64_t cols = sh.nb * sh.Ho * sh.Wo;
  const int64_t U = segments;
  if (U <= 0 || U % num_segments(sh.G, sh.DG) != 0 || sh.C % U != 0) return cudaErrorInvalidValue;
  const int64_t coef_bytes = round_up(kTileP * K * int64_t(sizeof(TapCoef<A>)), 16);
  const int64_t smem = coef_bytes + 5 * int64_t(kThreads) * int64_t(sizeof(A));
  if (smem > info.smem_optin) return cudaErrorInvalidValue;
  const int64_t tiles = (cols + kTileP - 1) / kTileP;
  if (tiles > INT_MAX || U > 65535) return cudaErrorInvalidValue;

  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(U));
  const dim3 block(kTileP, kLanes);
  if (data_offset != nullptr) {
    auto kernel = backward_fused_kernel<scalar_t, true>;
    if ((err = prepare_smem(kernel, smem)) != cudaSuccess) return err;
    kernel<<<grid, block, smem, stream>>>(sh, cols, U, static_cast<int>(coef_bytes), grad_columns,
                                          input, kernel_offset, data_offset, mask,
                                          part_kernel_offset, part_data_offset, part_mask,
                                          grad_input_acc);
  } else {
    auto kernel = backward_fused_kernel<scalar_t, false>;
    if ((err = prepare_smem(kernel, smem)) != cudaSuccess) return err;
    kernel<<<grid, block, smem, stream>>>(sh, cols, U, static_cast<int>(coef_bytes), grad_columns,
                                          input, kernel_offset, nullptr, mask,
                                          part_kernel_offset, nullptr, part_mask, nullptr);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_grad_input_rigid(const DeformShape& sh, const scalar_t* grad_columns,
                                    const scalar_t* kernel_offset, const scalar_t* mask,
                                    scalar_t* grad_input, cudaStream_t stream) {
  if (!shape_ok(sh)) return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  const int64_t total = sh.nb * sh.C * sh.H * sh.W;
  if (total == 0) return cudaSuccess;
  const int64_t cols = sh.nb * sh.Ho * sh.Wo;
  grad_input_rigid_kernel<scalar_t><<<elementwise_blocks(total, info), 256, 0, stream>>>(
      sh, cols, grad_columns, kernel_offset, mask, grad_input);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_reduce_segments(int64_t nb, int64_t U, int64_t G, int64_t J, int64_t P,
                                   const acc_t<scalar_t>* part, scalar_t* out,
                                   cudaStream_t stream) {
  if (G <= 0 || U <= 0 || U % G != 0) return cudaErrorInvalidValue;
  const int64_t total = nb * G * J * P;
  if (total == 0) return cudaSuccess;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  reduce_segments_kernel<scalar_t><<<elementwise_blocks(total, info), 256, 0, stream>>>(
      nb, U, G, J, P, part, out);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_global_kernels(const math::GlobalKernelShape& shape, bool tap_major,
                                  const scalar_t* weight, const scalar_t* offset, scalar_t* out,
                                  cudaStream_t stream) {
  const int64_t entries = shape.n * shape.c_out * shape.cg;
  if (entries == 0 || shape.kh * shape.kw == 0) return cudaSuccess;
  if (shape.groups <= 0 || shape.offset_groups <= 0 || shape.c_out % shape.groups != 0 ||
      (shape.groups * shape.cg) % shape.offset_groups != 0)
    return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  global_kernels_kernel<scalar_t><<<elementwise_blocks(entries, info), 256, 0, stream>>>(
      shape, tap_major, entries, weight, offset, out);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_global_kernels_backward(const math::GlobalKernelShape& shape, bool tap_major,
                                           const scalar_t* grad, const scalar_t* weight,
                                           const scalar_t* offset, scalar_t* grad_weight,
                                           scalar_t* grad_offset, cudaStream_t stream) {
  if (shape.groups <= 0 || shape.offset_groups <= 0 || shape.c_out % shape.groups != 0 ||
      (shape.groups * shape.cg) % shape.offset_groups != 0 || shape.kh * shape.kw <= 0)
    return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  const int64_t entries = shape.c_out * shape.cg;
  if (grad_weight != nullptr && entries > 0 && shape.scope_h * shape.scope_w > 0) {
    const auto kernel = global_kernels_weight_grad_kernel<scalar_t>;
    kernel<<<elementwise_blocks(entries, info), 256, 0, stream>>>(shape, tap_major, entries,
                                                                  grad, offset, grad_weight);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t samples = shape.n * shape.offset_groups * shape.kh * shape.kw;
  if (grad_offset != nullptr && samples > 0) {
    unsigned threads = 32;  // a power of two, up to 256, no wider than the entries
    while (threads < 256 && threads < shape.c_out * shape.cg) threads *= 2;
    const auto kernel = global_kernels_offset_grad_kernel<scalar_t>;
    kernel<<<static_cast<unsigned>(samples), threads, 2 * threads * sizeof(acc_t<scalar_t>),
             stream>>>(shape, tap_major, grad, weight, offset, grad_offset);
    err = cudaGetLastError();
  }
  return err;
}

template <typename scalar_t>
cudaError_t launch_cast(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  DeviceInfo info;
  cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  cast_kernel<scalar_t><<<elementwise_blocks(n, info), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

#define ERFTOOL_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_depthwise_forward<T>(const DeformShape&, int64_t, const T*,      \
                                                   const T*, const T*, const T*, const T*, T*, \
                                                   cudaStream_t);                              \
  template cudaError_t launch_build_columns<T>(const DeformShape&, const T*, const T*, const T*, \
                                               const T*, T*, cudaStream_t);                      \
  template cudaError_t launch_backward_fused<T>(const DeformShape&, int64_t, const T*, const T*, \
                                                const T*, const T*, const T*, acc_t<T>*,         \
                                                acc_t<T>*, acc_t<T>*, acc_t<T>*, cudaStream_t);  \
  template cudaError_t launch_grad_input_rigid<T>(const DeformShape&, const T*, const T*,        \
                                                  const T*, T*, cudaStream_t);                   \
  template cudaError_t launch_reduce_segments<T>(int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                                 const acc_t<T>*, T*, cudaStream_t);             \
  template cudaError_t launch_global_kernels<T>(const math::GlobalKernelShape&, bool,            \
                                                const T*, const T*, T*, cudaStream_t);           \
  template cudaError_t launch_global_kernels_backward<T>(const math::GlobalKernelShape&, bool,   \
                                                         const T*, const T*, const T*, T*, T*,  \
                                                         cudaStream_t);                         \
  template cudaError_t launch_cast<T>(const acc_t<T>*, T*, int64_t, cudaStream_t);

ERFTOOL_INSTANTIATE(float)
ERFTOOL_INSTANTIATE(double)
ERFTOOL_INSTANTIATE(__half)
ERFTOOL_INSTANTIATE(__nv_bfloat16)

#undef ERFTOOL_INSTANTIATE

}  // namespace cuda
}  // namespace erftool
