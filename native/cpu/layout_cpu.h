// Copies between NCHW tensors and the position-major (channels-last) rows the
// CPU kernels read and write.
//
// Why not at::Tensor::contiguous(ChannelsLast): on the 2-core EPYC it took
// 17 ms for an (8, 256, 56, 56) float tensor and 12 ms back, against 2.8 ms
// for a plain copy of it (and 1 ms for the 64-channel one): 256 read streams
// 12.5 KB apart thrash the cache. Tiles of 16 rows x 64 columns keep both
// sides in cache and write whole cache lines.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace erftool {
namespace cpu {

// One tile: dst[j * dst_ld + i] = src[i * src_ld + j], i in [i0, i1), j in [j0, j1).
template <typename T>
void transpose_tile(const T* s, int64_t sld, T* d, int64_t dld, int64_t i0, int64_t i1,
                    int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t i = i0; i < i1; ++i) d[j * dld + i] = s[i * sld + j];
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ERFTOOL_HAVE_AVX2_TRANSPOSE 1
// Element-wise tiles still ran at about one element per nanosecond; the
// tile's 8 x 8 blocks are transposed in registers (the standard
// unpack / shuffle / lane-permute sequence). Ragged edges take a last block
// overlapping the one before (rewriting some values with themselves) where
// the tile is at least 8 wide that way, element-wise otherwise: the
// element-wise ninth row of a 9 x 256 tile (the global DK's 3 x 3 taps of
// 256 channels) took about half of its transposing time.
__attribute__((target("avx2"))) inline void transpose_8x8_avx2(const float* a, int64_t sld,
                                                                float* b, int64_t dld) {
  __m256 r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(a + k * sld);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);      // rows k, k+1: columns 0 1 | 4 5
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);  // columns 2 3 | 6 7
  }
  for (int k = 0; k < 8; k += 4)
    for (int h = 0; h < 2; ++h) {  // four rows: columns 0 | 4, 1 | 5 (h = 0), 2 | 6, 3 | 7
      u[k + 2 * h] = _mm256_shuffle_ps(t[k + h], t[k + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
      u[k + 2 * h + 1] = _mm256_shuffle_ps(t[k + h], t[k + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(b + k * dld, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
    _mm256_storeu_ps(b + (k + 4) * dld, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
  }
}

__attribute__((target("avx2"))) inline void transpose_tile_avx2(
    const float* s, int64_t sld, float* d, int64_t dld, int64_t i0, int64_t i1, int64_t j0,
    int64_t j1) {
  // Block starts along one axis: every 8, the last one moved back to end at
  // the edge; [lo, end) is what they leave to the element-wise loop.
  const auto blocks_end = [](int64_t lo, int64_t hi) { return hi - lo >= 8 ? hi : lo; };
  const int64_t ie = blocks_end(i0, i1), je = blocks_end(j0, j1);
  for (int64_t i = i0; i < ie; i += 8)
    for (int64_t j = j0; j < je; j += 8) {
      const int64_t bi = std::min(i, ie - 8), bj = std::min(j, je - 8);
      transpose_8x8_avx2(s + bi * sld + bj, sld, d + bj * dld + bi, dld);
    }
  transpose_tile(s, sld, d, dld, ie, i1, j0, j1);
  transpose_tile(s, sld, d, dld, i0, ie, je, j1);
}

inline bool avx2_transpose_ok() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

// dst[j * dst_ld + i] = src[i * src_ld + j] for i in [i0, i1), j in [j0, j1),
// on the calling thread: register transposes for float where AVX2 runs.
template <typename T>
void transpose_block(const T* src, int64_t src_ld, T* dst, int64_t dst_ld, int64_t i0,
                     int64_t i1, int64_t j0, int64_t j1) {
#ifdef ERFTOOL_HAVE_AVX2_TRANSPOSE
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_transpose_ok()) {
      transpose_tile_avx2(src, src_ld, dst, dst_ld, i0, i1, j0, j1);
      return;
    }
  }
#endif
  transpose_tile(src, src_ld, dst, dst_ld, i0, i1, j0, j1);
}

// dst[j * dst_ld + i] = src[i * src_ld + j] for i < rows, j < cols, in each of
// `planes` planes (src_plane and dst_plane elements apart).
template <typename T>
void transpose_planes(const T* src, int64_t src_plane, int64_t src_ld, T* dst, int64_t dst_plane,
                      int64_t dst_ld, int64_t planes, int64_t rows, int64_t cols) {
  constexpr int64_t kTileRows = 16, kTileCols = 64;
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, planes * row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / row_tiles, i0 = (t % row_tiles) * kTileRows;
      const int64_t i1 = std::min(rows, i0 + kTileRows);
      const T* s = src + p * src_plane;
      T* d = dst + p * dst_plane;
      for (int64_t j0 = 0; j0 < cols; j0 += kTileCols) {
        transpose_block(s, src_ld, d, dst_ld, i0, i1, j0, std::min(cols, j0 + kTileCols));
      }
    }
  });
}

// Rows [y0, y0 + rows) of images [n0, n0 + nc) of an NCHW tensor.
struct RowBand {
  int64_t n0, nc, y0, rows;
};

// The band of a contiguous NCHW (N, C, H, W) array as channels-last rows
// (nc * rows * W, C), written into out.
template <typename T>
void band_rows_into(const T* nchw, int64_t C, int64_t H, int64_t W, const RowBand& b, T* out) {
  transpose_planes<T>(nchw + (b.n0 * C * H + b.y0) * W, C * H * W, H * W, out, b.rows * W * C, C,
                      b.nc, C, b.rows * W);
}

// The band of contiguous NCHW `nchw` as a channels-last (nc, C, rows, W) tensor.
inline at::Tensor band_to_channels_last(const at::Tensor& nchw, const RowBand& b) {
  TORCH_INTERNAL_ASSERT(nchw.is_contiguous());
  const int64_t C = nchw.size(1), H = nchw.size(2), W = nchw.size(3);
  at::Tensor out = at::empty({b.nc, C, b.rows, W}, nchw.options().memory_format(
                                                       at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(nchw.scalar_type(), "erftool_band_to_channels_last", [&] {
    band_rows_into<scalar_t>(nchw.data_ptr<scalar_t>(), C, H, W, b, out.data_ptr<scalar_t>());
  });
  return out;
}

inline at::Tensor to_channels_last(const at::Tensor& nchw) {
  return band_to_channels_last(nchw, {0, nchw.size(0), 0, nchw.size(2)});
}

// Channels-last rows (nc * rows * W, C) written into the band of a contiguous
// NCHW (N, C, H, W) array: the inverse of band_rows_into.
template <typename T>
void rows_into_band(const T* rows, int64_t C, int64_t H, int64_t W, const RowBand& b, T* nchw) {
  transpose_planes<T>(rows, b.rows * W * C, C, nchw + (b.n0 * C * H + b.y0) * W, C * H * W,
                      H * W, b.nc, b.rows * W, C);
}

// Position-major rows (nc * rows * W, C) written into the band of contiguous
// NCHW `out`.
inline void rows_to_band(const at::Tensor& rows_buf, const RowBand& b, at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous());
  const int64_t C = out.size(1), H = out.size(2), W = out.size(3);
  if (b.nc * b.rows * W * C == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "erftool_rows_to_band", [&] {
    rows_into_band<scalar_t>(rows_buf.data_ptr<scalar_t>(), C, H, W, b,
                             out.data_ptr<scalar_t>());
  });
}

// A contiguous NCHW copy of an (N, H, W, C) contiguous tensor.
inline at::Tensor nhwc_to_nchw(const at::Tensor& nhwc) {
  const int64_t N = nhwc.size(0), H = nhwc.size(1), W = nhwc.size(2), C = nhwc.size(3);
  at::Tensor out = at::empty({N, C, H, W}, nhwc.options());
  rows_to_band(nhwc, {0, N, 0, H}, out);
  return out;
}

}  // namespace cpu
}  // namespace erftool
