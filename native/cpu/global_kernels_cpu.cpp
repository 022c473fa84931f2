// CPU kernels of erftool_native::global_kernels and global_kernels_backward:
// a global Deformable Kernel's per-image kernels and their scope-weight and
// offset gradients. Every value is the bilinear sample of its scope plane at
// math::global_kernel_corners, the corners the CUDA kernels
// (native/cuda/deform_kernels.cu) compute per thread; here they are computed
// once per (image, offset group, tap), and each sample is summed over a run
// of channels at once from cell-major scope rows (a per-value loop spent its
// time on index arithmetic: 10-15 ms against 2-3.5 ms for 8 images of
// 256 -> 256 channels, 2-core EPYC). The backward takes each (image, output
// channel) kernel gradient g, a (C_in/groups, K) matrix, against dense (K, S)
// rows of its samples' bilinear weights A: the weight gradient gets g A, the
// offset gradient the slopes against g^T times the scope planes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include <erftool/deform_math.h>
#include <erftool/global_kernels_op.h>

#include "deform_cpu_kernels.h"  // corner_rows, corner_sum(_stream), stream_copy
#include "layout_cpu.h"          // transpose_block
#include "vector_cpu.h"          // Vector64

namespace erftool {
namespace cpu {
namespace {

// Runs of channels of one weight group that share an offset group.
struct ChannelRun {
  int64_t c0, c1, group;
};

std::vector<std::vector<ChannelRun>> channel_runs(const math::GlobalKernelShape& shape) {
  const int64_t per_group = shape.c_out / shape.groups;
  std::vector<std::vector<ChannelRun>> runs(static_cast<size_t>(shape.groups));
  for (int64_t wg = 0; wg < shape.groups; ++wg)
    for (int64_t c = 0; c < shape.cg; ++c) {
      const int64_t g = math::global_kernel_group(shape, wg * per_group, c);
      if (runs[wg].empty() || runs[wg].back().group != g) runs[wg].push_back({c, c, g});
      runs[wg].back().c1 = c + 1;
    }
  return runs;
}

// The corners of every (image, offset group, tap), in that order: the
// offset's layout, two entries per sample.
template <typename acc, typename scalar_t>
std::vector<math::BilinearCorners<acc>> corner_table(const math::GlobalKernelShape& shape,
                                                     const scalar_t* offset) {
  const auto load_offset = [offset](int64_t i) { return static_cast<acc>(offset[i]); };
  const int64_t taps = shape.kh * shape.kw;
  std::vector<math::BilinearCorners<acc>> corners(
      static_cast<size_t>(shape.n * shape.offset_groups * taps));
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t g = 0; g < shape.offset_groups; ++g)
      for (int64_t k = 0; k < taps; ++k)
        corners[(n * shape.offset_groups + g) * taps + k] =
            math::global_kernel_corners<acc>(shape, n, g, k, load_offset);
  return corners;
}

// Output channels per task of both passes. The forward turns its channels'
// scope planes cell-major once, then visits every image, so that consecutive
// channels' kernels (contiguous in both layouts) are read or written in
// turn, not one channel's kernels across every image (72 streams 2 MB
// apart for 8 images and 9 taps, which the prefetchers could not follow).
// Fixed, not per thread, so that the offset gradient's partial sums (one set
// per task, added in task order) do not depend on the thread count.
constexpr int64_t kChannelsPerTask = 8;

// Per-thread buffers of one forward task's channels [o0, o0 + count).
template <typename acc>
struct TaskScratch {
  int64_t plane_size;
  std::vector<acc> plane, cells, row, block;  // (cg, S), per channel (S, cg), (K, cg), (cg, K)
  explicit TaskScratch(const math::GlobalKernelShape& s)
      : plane_size(s.cg * s.scope_h * s.scope_w),
        plane(plane_size),
        cells(kChannelsPerTask * plane_size),
        row(s.cg * s.kh * s.kw),
        block(row.size()) {}

  // Channel o0 + j's scope planes, cell-major: each cell one run over c.
  template <typename scalar_t>
  void load_cells(const math::GlobalKernelShape& s, const scalar_t* weight, int64_t o0,
                  int64_t count) {
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* src = weight + (o0 + j) * plane_size;
      for (int64_t i = 0; i < plane_size; ++i) plane[i] = static_cast<acc>(src[i]);
      transpose_block(plane.data(), s.scope_h * s.scope_w, channel_cells(j), s.cg, 0, s.cg, 0,
                      s.scope_h * s.scope_w);
    }
  }
  acc* channel_cells(int64_t j) { return cells.data() + j * plane_size; }
};

// Image n's kernel row of o, (K, cg), to either layout. Channel-major, the
// (n, o) block is contiguous: transposed in `block`, then streamed out whole
// (8 x 256 -> 256 channels: 1.2-1.6 ms; element by element with plain stores
// 2.8 ms; the tap-major kernels, streamed in place, 0.65-0.9 ms).
template <typename acc, typename scalar_t>
void store_row(const math::GlobalKernelShape& shape, bool tap_major, int64_t n, int64_t o,
               const acc* row, acc* block, scalar_t* out) {
  const int64_t taps = shape.kh * shape.kw;
  if (!tap_major) {
    transpose_block(row, shape.cg, block, taps, 0, taps, 0, shape.cg);
    stream_copy(shape.cg * taps, block, out + math::global_kernel_index(shape, false, n, o, 0, 0));
    return;
  }
  for (int64_t k = 0; k < taps; ++k) {
    scalar_t* dst = out + math::global_kernel_index(shape, tap_major, n, o, 0, k);
    for (int64_t c = 0; c < shape.cg; ++c)
      dst[c] = static_cast<scalar_t>(row[k * shape.cg + c]);
  }
}

// Channels [c, ...) of image n's kernel of o at tap k, in place: tap-major
// kernels of the accumulation type are contiguous over c, so the forward
// writes them directly; null otherwise (a row buffer and store_row).
template <typename acc, typename scalar_t>
acc* in_place_run(const math::GlobalKernelShape& shape, bool tap_major, scalar_t* kernels,
                  int64_t n, int64_t o, int64_t c, int64_t k) {
  if constexpr (std::is_same_v<acc, scalar_t>) {
    if (tap_major) return kernels + math::global_kernel_index(shape, true, n, o, c, k);
  }
  return nullptr;
}

template <typename scalar_t>
void fill_global_kernels(const math::GlobalKernelShape& shape, const scalar_t* weight,
                         const scalar_t* offset, bool tap_major, scalar_t* out) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t taps = shape.kh * shape.kw, cg = shape.cg;
  const auto corners = corner_table<acc>(shape, offset);
  const auto runs = channel_runs(shape);
  const std::vector<acc> zeros(static_cast<size_t>(cg), acc(0));
  const int64_t tasks = (shape.c_out + kChannelsPerTask - 1) / kChannelsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    TaskScratch<acc> scratch(shape);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = task * kChannelsPerTask;
      const int64_t count = std::min(shape.c_out, o0 + kChannelsPerTask) - o0;
      scratch.load_cells(shape, weight, o0, count);
      for (int64_t n = 0; n < shape.n; ++n)
        for (int64_t j = 0; j < count; ++j) {
          const int64_t o = o0 + j;
          for (const ChannelRun& run : runs[o / (shape.c_out / shape.groups)]) {
            const auto* mine = corners.data() + (n * shape.offset_groups + run.group) * taps;
            for (int64_t k = 0; k < taps; ++k) {
              const CornerRows<acc> rows = corner_rows(
                  mine[k], scratch.channel_cells(j) + run.c0, cg, zeros.data());
              if (acc* dst = in_place_run<acc>(shape, tap_major, out, n, o, run.c0, k))
                corner_sum_stream(run.c1 - run.c0, rows, dst);
              else
                corner_sum<false>(run.c1 - run.c0, acc(1), rows,
                                  scratch.row.data() + k * cg + run.c0);
            }
          }
          if (!in_place_run<acc>(shape, tap_major, out, n, o, 0, 0))
            store_row(shape, tap_major, n, o, scratch.row.data(), scratch.block.data(), out);
        }
    }
    stream_fence();
  });
}

// Image n's kernel gradient of o as a (cg, K) row, c-major: in place for
// channel-major kernels of the accumulation type, else gathered into `row`.
template <typename acc, typename scalar_t>
const acc* gradient_row(const math::GlobalKernelShape& shape, bool tap_major, int64_t n,
                        int64_t o, const scalar_t* grad, acc* row) {
  const int64_t taps = shape.kh * shape.kw;
  if constexpr (std::is_same_v<acc, scalar_t>) {
    const scalar_t* first = grad + math::global_kernel_index(shape, tap_major, n, o, 0, 0);
    if (!tap_major) return first;
    // tap-major: K runs over c, one image batch (N * C_out * cg) apart
    transpose_block(first, shape.n * shape.c_out * shape.cg, row, taps, 0, taps, 0, shape.cg);
    return row;
  }
  for (int64_t k = 0; k < taps; ++k) {
    const scalar_t* src = grad + math::global_kernel_index(shape, tap_major, n, o, 0, k);
    const int64_t step = tap_major ? 1 : taps;
    for (int64_t c = 0; c < shape.cg; ++c) row[c * taps + k] = static_cast<acc>(src[c * step]);
  }
  return row;
}

// Every sample's bilinear weights and slopes as dense rows over the scope's
// cells, zero off its (at most four) corners and in the padding of each row
// to `stride` (whole vectors of `lanes`): (samples, stride) each, samples in
// corner_table's order. And per set of K samples (image, offset group) and
// vector of cells, where the scope takes more than one vector, the taps with
// a corner in that vector (a tap's four corners, on two scope rows, mostly
// fall in one vector or two): only those take part in that vector's products.
template <typename acc>
struct DenseCoefficients {
  int64_t vectors;
  std::vector<acc> weight, d_dy, d_dx;
  std::vector<int32_t> tap_list;   // (sets, vectors, taps): the first tap_count used
  std::vector<int32_t> tap_count;  // (sets, vectors); both unused for one vector
  DenseCoefficients(const std::vector<math::BilinearCorners<acc>>& corners, int64_t taps,
                    int64_t stride, int64_t lanes)
      : vectors(stride / lanes), weight(corners.size() * stride, acc(0)),
        d_dy(weight.size(), acc(0)), d_dx(weight.size(), acc(0)),
        tap_list(corners.size() * vectors, 0), tap_count(corners.size() / taps * vectors, 0) {
    for (size_t i = 0; i < corners.size(); ++i) {
      const int64_t set = static_cast<int64_t>(i) / taps, k = static_cast<int64_t>(i) % taps;
      int64_t listed = -1;  // bilinear_corners gives the corners in increasing cell order
      for (int j = 0; j < 4; ++j) {
        const int64_t cell = corners[i].index[j];
        if (cell < 0) continue;
        weight[i * stride + cell] += corners[i].weight[j];
        d_dy[i * stride + cell] += corners[i].d_dy[j];
        d_dx[i * stride + cell] += corners[i].d_dx[j];
        if (vectors > 1 && cell / lanes != listed) {
          listed = cell / lanes;
          int32_t& count = tap_count[set * vectors + listed];
          tap_list[(set * vectors + listed) * taps + count++] = static_cast<int32_t>(k);
        }
      }
    }
  }
};

// One (image, output channel) product, every row `stride` apart and
// zero-padded: g, the kernel gradient (cg, K), its row length `taps`; a, the
// sample set's dense weights (K, S); w, the scope planes (cg, S), and m, the
// products (K, S), null unless the offset gradient is wanted; gw, the weight
// gradient (cg, S), null unless wanted; the set's tap lists (DenseCoefficients).
template <typename acc>
struct ProductRows {
  int64_t taps, stride, vectors;
  const acc* g;
  const acc* a;
  const acc* w;
  acc* gw;
  acc* m;
  const int32_t* tap_list;
  const int32_t* tap_count;
};

// Which taps a block takes: `first` onwards, or (listed) those of tap_list
// from `first`.
struct TapBlock {
  int64_t first;
  bool listed;
};

// Over channels [c0, c1), for the kTaps taps of `block` and the vector of
// cells from `lane`: gw += g A and m += g^T w, with A's rows and the
// products held in vector registers across the channels (a plain loop
// reloaded and stored m per channel, and the next channel waited on those
// stores).
template <typename acc, int kTaps>
void accumulate_tap_block(const ProductRows<acc>& r, int64_t c0, int64_t c1, TapBlock block,
                          int64_t lane) {
  using V = typename Vector64<acc>::type;
  int64_t tap[kTaps];
  for (int k = 0; k < kTaps; ++k)
    tap[k] = block.listed ? r.tap_list[block.first + k] : block.first + k;
  V rows[kTaps], sums[kTaps];
  for (int k = 0; k < kTaps; ++k) {
    rows[k] = load_vector<V>(r.a + tap[k] * r.stride + lane);
    sums[k] = V{};
  }
  for (int64_t c = c0; c < c1; ++c) {
    V grad_row[2] = {V{}, V{}};  // two sums: half the chain of dependent adds
    const V plane_row = r.w ? load_vector<V>(r.w + c * r.stride + lane) : V{};
    const acc* gc = r.g + c * r.taps;
    for (int k = 0; k < kTaps; ++k) {
      const acc gk = gc[tap[k]];
      if (r.gw) grad_row[k % 2] += gk * rows[k];
      if (r.w) sums[k] += gk * plane_row;
    }
    if (r.gw) {
      acc* dst = r.gw + c * r.stride + lane;
      store_vector(dst, load_vector<V>(dst) + (grad_row[0] + grad_row[1]));
    }
  }
  if (r.w)
    for (int k = 0; k < kTaps; ++k) {
      acc* dst = r.m + tap[k] * r.stride + lane;
      store_vector(dst, load_vector<V>(dst) + sums[k]);
    }
}

// accumulate_tap_block for `count` <= kTaps taps, the count a compile-time
// constant (so that the rows and products stay in registers).
template <typename acc, int kTaps>
void accumulate_taps(const ProductRows<acc>& r, int64_t c0, int64_t c1, TapBlock block,
                     int64_t lane, int64_t count) {
  if constexpr (kTaps > 1) {
    if (count < kTaps) return accumulate_taps<acc, kTaps - 1>(r, c0, c1, block, lane, count);
  }
  accumulate_tap_block<acc, kTaps>(r, c0, c1, block, lane);
}

// Channels [c0, c1) of the product: each vector of cells with the taps that
// reach it (every tap where one vector holds the scope: no index loads), in
// blocks of up to 12 (12 rows, 12 sums and a channel's two rows: 28 of
// AVX-512's 32 vector registers in fp32; 3 x 3 taps in one block).
template <typename acc>
void accumulate_products(const ProductRows<acc>& r, int64_t c0, int64_t c1) {
  constexpr int kMostTaps = 12;
  const bool listed = r.vectors > 1;
  for (int64_t v = 0; v < r.vectors; ++v) {
    const int64_t count = listed ? r.tap_count[v] : r.taps;
    for (int64_t k0 = 0; k0 < count; k0 += kMostTaps)
      accumulate_taps<acc, kMostTaps>(r, c0, c1, TapBlock{listed ? v * r.taps + k0 : k0, listed},
                                      v * Vector64<acc>::kLanes,
                                      std::min<int64_t>(kMostTaps, count - k0));
  }
}

// Gradients of fill_global_kernels from that of its output (same layout):
// grad_weight (null: not wanted) of plane (o, c), sum over images and taps of
// the kernel gradient times the sample's weights; grad_offset (null: not
// wanted) of sample (n, g, k), its slopes against the products sum over
// (o, c) of the kernel gradient times the scope plane. Per (image, output
// channel) against dense sample rows (accumulate_products). Against the
// sparse form it replaced (four corner runs per tap: axpy and dot products
// over c from cell-major planes), alternating runs, 8 x 256 -> 256 channels,
// 3 x 3 taps: scope 4 3.0-3.3 ms against 3.4-4.0, scope 3 2.9-3.1 against
// 3.0-3.4, scope 5 4.5 against 4.2-4.5, scope 7 (four vectors of cells)
// 6.5-6.7 against 5.2-5.7 (RESULTS.md).
template <typename scalar_t>
void global_kernels_grads(const math::GlobalKernelShape& shape, const scalar_t* grad,
                          const scalar_t* weight, const scalar_t* offset, bool tap_major,
                          scalar_t* grad_weight, scalar_t* grad_offset) {
  using acc = at::opmath_type<scalar_t>;
  constexpr int64_t kLanes = Vector64<acc>::kLanes;
  const int64_t taps = shape.kh * shape.kw, cg = shape.cg, cells = shape.scope_h * shape.scope_w;
  const int64_t stride = (cells + kLanes - 1) / kLanes * kLanes;  // rows of whole vectors
  const auto corners = corner_table<acc>(shape, offset);
  const DenseCoefficients<acc> dense(corners, taps, stride, kLanes);
  const auto runs = channel_runs(shape);
  const int64_t products = static_cast<int64_t>(corners.size()) * stride;
  const int64_t tasks = (shape.c_out + kChannelsPerTask - 1) / kChannelsPerTask;
  // Per task, so that their sum runs in task order whatever the thread count.
  std::vector<acc> partial(grad_offset ? tasks * products : 0, acc(0));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // This output channel's scope planes and weight gradient, (cg, stride),
    // zero in the padding.
    std::vector<acc> row(cg * taps), w(grad_offset ? cg * stride : 0, acc(0));
    std::vector<acc> gw(grad_weight ? cg * stride : 0);
    for (int64_t task = begin; task < end; ++task) {
      acc* m = grad_offset ? partial.data() + task * products : nullptr;
      const int64_t o1 = std::min(shape.c_out, (task + 1) * kChannelsPerTask);
      for (int64_t o = task * kChannelsPerTask; o < o1; ++o) {
        const scalar_t* plane = weight + o * cg * cells;
        if (grad_offset)
          for (int64_t c = 0; c < cg; ++c)
            for (int64_t s = 0; s < cells; ++s)
              w[c * stride + s] = static_cast<acc>(plane[c * cells + s]);
        std::fill(gw.begin(), gw.end(), acc(0));
        for (int64_t n = 0; n < shape.n; ++n) {
          const acc* g = gradient_row(shape, tap_major, n, o, grad, row.data());
          for (const ChannelRun& run : runs[o / (shape.c_out / shape.groups)]) {
            const int64_t set = n * shape.offset_groups + run.group, sample = set * taps;
            const ProductRows<acc> rows{taps,
                                        stride,
                                        dense.vectors,
                                        g,
                                        dense.weight.data() + sample * stride,
                                        m ? w.data() : nullptr,
                                        grad_weight ? gw.data() : nullptr,
                                        m ? m + sample * stride : nullptr,
                                        dense.tap_list.data() + set * dense.vectors * taps,
                                        dense.tap_count.data() + set * dense.vectors};
            accumulate_products(rows, run.c0, run.c1);
          }
        }
        if (grad_weight)
          for (int64_t c = 0; c < cg; ++c)
            for (int64_t s = 0; s < cells; ++s)
              grad_weight[(o * cg + c) * cells + s] = static_cast<scalar_t>(gw[c * stride + s]);
      }
    }
  });
  if (grad_offset)
    for (int64_t sample = 0; sample < static_cast<int64_t>(corners.size()); ++sample) {
      acc dy = acc(0), dx = acc(0);
      for (int64_t task = 0; task < tasks; ++task) {
        const acc* m = partial.data() + task * products + sample * stride;
        for (int64_t s = 0; s < cells; ++s) {
          dy += m[s] * dense.d_dy[sample * stride + s];
          dx += m[s] * dense.d_dx[sample * stride + s];
        }
      }
      grad_offset[sample * 2] = static_cast<scalar_t>(dy);
      grad_offset[sample * 2 + 1] = static_cast<scalar_t>(dx);
    }
}

at::Tensor global_kernels_cpu(const at::Tensor& weight, const at::Tensor& offset,
                              at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups,
                              bool tap_major) {
  const math::GlobalKernelShape shape =
      global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  const at::Tensor w = weight.contiguous(), off = offset.contiguous();
  at::Tensor out = empty_global_kernels(weight, shape, tap_major);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "global_kernels_cpu", [&] {
    fill_global_kernels<scalar_t>(shape, w.const_data_ptr<scalar_t>(),
                                  off.const_data_ptr<scalar_t>(), tap_major,
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> global_kernels_backward_cpu(
    const at::Tensor& grad_kernels, const at::Tensor& weight, const at::Tensor& offset,
    at::IntArrayRef kernel_size, int64_t groups, int64_t offset_groups, bool tap_major,
    std::array<bool, 2> output_mask) {
  const math::GlobalKernelShape shape =
      global_kernel_shape(weight, offset, kernel_size, groups, offset_groups);
  check_grad_kernels(grad_kernels, weight, shape, tap_major);
  const at::Tensor g = grad_kernels.contiguous(), w = weight.contiguous();
  const at::Tensor off = offset.contiguous();
  at::Tensor grad_weight, grad_offset;
  if (output_mask[0]) grad_weight = at::empty_like(w);
  if (output_mask[1]) grad_offset = at::empty_like(off);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "global_kernels_backward_cpu", [&] {
    global_kernels_grads<scalar_t>(
        shape, g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        off.const_data_ptr<scalar_t>(), tap_major,
        output_mask[0] ? grad_weight.data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? grad_offset.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_weight, grad_offset};
}

}  // namespace
}  // namespace cpu
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CPU, m) {
  m.impl("global_kernels", &erftool::cpu::global_kernels_cpu);
  m.impl("global_kernels_backward", &erftool::cpu::global_kernels_backward_cpu);
}
