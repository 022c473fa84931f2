// CPU kernels of erftool_native::deform_forward / deform_backward.
//
// Column form: per chunk of output positions, build the column rows
// T[p][(g, s, c)] = sum_taps coef * value (by runs of positions,
// dense_rows_cpu.h: in registers with kernel offsets and scopes of up to 32
// cells, tap by tap for DC; else the scatter of deform_cpu_kernels.h), then
// one grouped 1x1 convolution (oneDNN) or GEMM against the weight. The
// backward gets G = grad_out W by GEMM, then one fused pass per chunk that
// derives the offset and mask gradients from G and, on a rigid data grid,
// scatters the input gradient in race-free row-block phases, by runs of
// positions (lane_backward_cpu.h), with T rebuilt just before it for the
// weight GEMM. On large maps with a rigid data
// grid the backward runs as a band pipeline instead: each thread takes whole
// bands of output rows through both GEMMs and the fused pass while they are
// in cache.
// Depthwise layers skip the GEMMs: their pass (depthwise_backward_rows) also
// accumulates the weight gradient, and with a few images they run image by
// image, with per-thread channels-last copies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "deform_cpu_kernels.h"
#include "dense_rows_cpu.h"
#include "lane_backward_cpu.h"
#include "lane_sampling_cpu.h"  // RunSampler
#include "layout_cpu.h"

namespace erftool {
namespace cpu {
namespace {

// ------------------------------------------------------------ arguments

struct Options {
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  int64_t groups, offset_groups, data_groups, chunk_bytes;
};

void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "deform (CPU): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "deform (CPU): ", name,
              " must have the input's dtype");
  TORCH_CHECK(t.dim() == dim, "deform (CPU): ", name, " must be ", dim, "-D, got ", t.sizes());
}

void check_offset(const c10::optional<at::Tensor>& t, const at::Tensor& input,
                  const char* name, int64_t channels, int64_t Ho, int64_t Wo) {
  if (!t.has_value() || !t->defined()) return;
  check_tensor(*t, input, name, 4);
  TORCH_CHECK(t->size(0) == input.size(0) && t->size(1) == channels && t->size(2) == Ho &&
                  t->size(3) == Wo,
              "deform (CPU): ", name, " must be (", input.size(0), ", ", channels, ", ", Ho,
              ", ", Wo, "), got ", t->sizes());
}

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

Geometry make_geometry(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& koff,
                       const c10::optional<at::Tensor>& doff,
                       const c10::optional<at::Tensor>& mask, const Options& o) {
  TORCH_CHECK(o.kernel_size.size() == 2 && o.stride.size() == 2 && o.padding.size() == 2 &&
                  o.dilation.size() == 2,
              "deform (CPU): kernel_size, stride, padding and dilation are pairs");
  check_tensor(input, input, "input", 4);
  check_tensor(weight, input, "weight", 4);
  Geometry g;
  g.N = input.size(0), g.C = input.size(1), g.H = input.size(2), g.W = input.size(3);
  g.O = weight.size(0), g.groups = o.groups;
  TORCH_CHECK(g.groups >= 1 && g.C % g.groups == 0 && g.O % g.groups == 0,
              "deform (CPU): groups must divide the input and output channels");
  g.Cg = g.C / g.groups, g.Og = g.O / g.groups;
  TORCH_CHECK(weight.size(1) == g.Cg, "deform (CPU): weight must have C_in/groups = ", g.Cg,
              " input channels, got ", weight.sizes());
  g.Kh = o.kernel_size[0], g.Kw = o.kernel_size[1], g.K = g.Kh * g.Kw;
  g.Sh = weight.size(2), g.Sw = weight.size(3), g.S2 = g.Sh * g.Sw;
  TORCH_CHECK(g.Kh >= 1 && g.Kw >= 1 && g.Kh <= g.Sh && g.Kw <= g.Sw,
              "deform (CPU): kernel_size must be >= 1 and fit in the scope ", weight.sizes());
  g.sh = o.stride[0], g.sw = o.stride[1], g.ph = o.padding[0], g.pw = o.padding[1];
  g.dh = o.dilation[0], g.dw = o.dilation[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "deform (CPU): stride, dilation >= 1 and padding >= 0 required");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.Kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.Kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho >= 0 && g.Wo >= 0 && g.H + 2 * g.ph - g.dh * (g.Kh - 1) - 1 >= 0 &&
                  g.W + 2 * g.pw - g.dw * (g.Kw - 1) - 1 >= 0,
              "deform (CPU): the input is smaller than the dilated kernel");
  g.G = o.offset_groups, g.DG = o.data_groups;
  TORCH_CHECK(g.G >= 1 && g.DG >= 1 && (g.C == 0 || (g.C % g.G == 0 && g.C % g.DG == 0)),
              "deform (CPU): offset groups must divide the input channels");
  check_offset(koff, input, "kernel_offset", 2 * g.G * g.K, g.Ho, g.Wo);
  check_offset(doff, input, "data_offset", 2 * g.DG * g.K, g.Ho, g.Wo);
  check_offset(mask, input, "mask", g.DG * g.K, g.Ho, g.Wo);
  g.has_koff = present(koff), g.has_doff = present(doff), g.has_mask = present(mask);
  g.depthwise = g.groups == g.C && g.O == g.C;
  return g;
}

// Nothing to compute: some dimension is empty.
bool empty_problem(const Geometry& g) {
  return g.N == 0 || g.C == 0 || g.O == 0 || g.Ho == 0 || g.Wo == 0;
}

// ------------------------------------------------------------ effective weight
// Without kernel offsets every tap samples a fixed scope position, so the
// sampled kernel W~ = W A^T (A: K x S2 bilinear coefficients) replaces the
// scope and the op becomes a rigid or deformable convolution with K taps.

at::Tensor centred_coefficients(const Geometry& g, const at::TensorOptions& opts) {
  std::vector<double> a(g.K * g.S2, 0.0);
  for (int64_t ta = 0; ta < g.Kh; ++ta)
    for (int64_t tb = 0; tb < g.Kw; ++tb) {
      const auto c = math::bilinear_corners<double>(
          math::scope_coordinate<double>(ta, g.Kh, g.Sh, 0.0),
          math::scope_coordinate<double>(tb, g.Kw, g.Sw, 0.0), g.Sh, g.Sw);
      for (int i = 0; i < 4; ++i)
        if (c.index[i] >= 0) a[(ta * g.Kw + tb) * g.S2 + c.index[i]] += c.weight[i];
    }
  return at::tensor(a, at::TensorOptions().dtype(at::kDouble)).view({g.K, g.S2}).to(opts);
}

bool scope_is_kernel(const Geometry& g) { return g.Sh == g.Kh && g.Sw == g.Kw; }

// Returns W~ and switches the geometry to the K-tap scope.
at::Tensor centred_weight(Geometry& g, const at::Tensor& weight, at::Tensor* coeffs) {
  if (scope_is_kernel(g)) return weight;
  *coeffs = centred_coefficients(g, weight.options());
  at::Tensor w = at::mm(weight.reshape({g.O * g.Cg, g.S2}), coeffs->t());
  g.Sh = g.Kh, g.Sw = g.Kw, g.S2 = g.K;
  return w.reshape({g.O, g.Cg, g.Kh, g.Kw});
}

// grad of W from grad of W~.
at::Tensor scope_weight_grad(const at::Tensor& grad_wt, const at::Tensor& coeffs,
                             const at::Tensor& weight) {
  if (!coeffs.defined()) return grad_wt.reshape(weight.sizes());
  const int64_t K = coeffs.size(0);
  return at::mm(grad_wt.reshape({-1, K}), coeffs).reshape(weight.sizes());
}

// ------------------------------------------------------------ chunking

// Output rows [y0, y0 + rows) of images [n0, n0 + nc) (RowBand, layout_cpu.h).
struct Chunk : RowBand {
  int64_t positions(const Geometry& g) const { return nc * rows * g.Wo; }
};

// Each working buffer stays below this even when chunk_bytes allows more:
// glibc keeps freed blocks under 32 MB for reuse, while larger ones are
// unmapped and page-faulted in again on every call (smaller chunks also stay
// in cache between the column build and the GEMM).
constexpr int64_t kBufferCapBytes = 24 << 20;
// The forward GEMM consumes each chunk's columns right after they are built:
// with 4 MB chunks (in cache) instead of 24 MB the DK forward on 56x56x64 was
// 12-40 % faster in 4 of 5 interleaved A/B rounds and 13 % slower in one, and
// faster in both rounds on 14x14x256. The backward keeps the larger chunks
// (its fused pass wants many row blocks per chunk), and so does the depthwise
// forward (no GEMM; smaller chunks were slower there).
constexpr int64_t kForwardGemmBufferCapBytes = 4 << 20;

// Near-equal parts of [0, total), each at most `most` long.
std::vector<std::pair<int64_t, int64_t>> split(int64_t total, int64_t most) {
  const int64_t parts = (total + most - 1) / most, base = total / parts, extra = total % parts;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t i = 0, start = 0; i < parts; ++i) {
    const int64_t len = base + (i < extra ? 1 : 0);
    out.push_back({start, len});
    start += len;
  }
  return out;
}

// Chunks of whole images, or of output rows of one image when a single image
// would overflow the budget: chunk_bytes over all buffers of a position
// (bytes_per_position), kBufferCapBytes for the largest one (largest_per_position).
std::vector<Chunk> plan_chunks(const Geometry& g, int64_t bytes_per_position,
                               int64_t largest_per_position, int64_t chunk_bytes,
                               int64_t buffer_cap = kBufferCapBytes) {
  const int64_t budget = std::max<int64_t>(
      1, std::min(chunk_bytes / std::max<int64_t>(1, bytes_per_position),
                  buffer_cap / std::max<int64_t>(1, largest_per_position)));
  std::vector<Chunk> out;
  const int64_t per_image = g.Ho * g.Wo;
  if (per_image <= budget) {
    for (const auto& part : split(g.N, budget / per_image))
      out.push_back(Chunk{{part.first, part.second, 0, g.Ho}});
  } else {
    const auto rows = split(g.Ho, std::max<int64_t>(1, budget / g.Wo));
    for (int64_t n = 0; n < g.N; ++n)
      for (const auto& part : rows) out.push_back(Chunk{{n, 1, part.first, part.second}});
  }
  return out;
}

int64_t max_positions(const std::vector<Chunk>& chunks, const Geometry& g) {
  int64_t m = 0;
  for (const auto& c : chunks) m = std::max(m, c.positions(g));
  return m;
}

// ------------------------------------------------------------ GEMM
// Forward: oneDNN's 1x1 convolution over channels-last column rows, in fp32,
// for rows of up to 2304 values per weight group: there it ran 1.05-1.36x
// faster than at::mm (five shapes). Above that it fell off a cliff on an earlier
// host (3x slower than at::mm for 256 outputs x 3072 or 4096 inputs, 2-core
// EPYC); on the Zen 4 host it no longer does alone, but the scope-4 DK forward
// on 14x14x256 (rows of 4096) was still 10-15 % slower with it (RESULTS.md),
// so long rows use at::mm; so does fp64, which has no oneDNN kernel.
// ERFTOOL_CPU_GEMM=mm|conv overrides (for measurements).
constexpr int64_t kLongestConvRow = 2304;

bool gemm_by_conv(at::ScalarType dtype, int64_t row_len_per_group) {
  const char* env = std::getenv("ERFTOOL_CPU_GEMM");
  if (env && std::strcmp(env, "mm") == 0) return false;
  if (env && std::strcmp(env, "conv") == 0) return true;
  return dtype == at::kFloat && row_len_per_group <= kLongestConvRow;
}

// col: (nc, rows, Wo, S2*C) rows; wp: (O, S2*Cg, 1, 1). Returns (nc, O, rows, Wo).
at::Tensor gemm_forward(const at::Tensor& col, const at::Tensor& wp, int64_t groups) {
  if (gemm_by_conv(col.scalar_type(), wp.size(1)))
    return at::convolution(col.permute({0, 3, 1, 2}), wp, c10::nullopt, {1, 1}, {0, 0}, {1, 1},
                           false, {0, 0}, groups);
  const int64_t O = wp.size(0), k = wp.size(1);
  const at::Tensor colm = col.reshape({-1, col.size(3)}), w2 = wp.view({O, k});
  std::vector<at::Tensor> parts;
  for (int64_t gi = 0; gi < groups; ++gi)
    parts.push_back(at::mm(colm.narrow(1, gi * k, k), w2.narrow(0, gi * (O / groups), O / groups).t()));
  at::Tensor res = groups == 1 ? parts[0] : at::cat(parts, 1);
  return res.view({col.size(0), col.size(1), col.size(2), O}).permute({0, 3, 1, 2});
}

// G = grad_out W, (positions, S2*Cg*groups), by at::mm: 5.6 ms against 9.6 ms
// for oneDNN's 1x1 convolution backward-data on one 56x56x64 scope-4 chunk in
// isolation, and no transposing copy after it; within noise in a full backward.
// Written into `out`, one buffer for every chunk of a call: a fresh product per
// chunk was page-faulted in again whenever the allocator had handed it back.
// gout: (nc, O, rows, Wo) channels-last; wp: (O, S2*Cg, 1, 1); out: (positions, S2*C).
void gemm_column_grad(const at::Tensor& gout, const at::Tensor& wp, int64_t groups,
                      at::Tensor out) {
  const int64_t O = wp.size(0), k = wp.size(1), Og = O / groups;
  const at::Tensor gm = gout.permute({0, 2, 3, 1}).reshape({-1, O}), w2 = wp.view({O, k});
  for (int64_t gi = 0; gi < groups; ++gi) {
    at::Tensor part = out.narrow(1, gi * k, k);
    at::mm_out(part, gm.narrow(1, gi * Og, Og), w2.narrow(0, gi * Og, Og));
  }
}

// grad of wp += grad_out^T col, accumulated in place as (col^T grad_out)^T:
// at::mm in this orientation matched oneDNN's 1x1 convolution backward-weights
// within noise (interleaved A/B, fp32), and needs no temporary. (On an AVX-512
// host oneDNN's ran 20 % faster in isolation, one thread, 280 positions, but
// called from the band pipeline's threads at once it returned NaNs: ATen's
// oneDNN convolutions are not for concurrent calls inside a parallel region.)
void gemm_weight_grad_add(const at::Tensor& gout, const at::Tensor& col, at::Tensor& gwp,
                          int64_t groups) {
  const int64_t O = gwp.size(0), k = gwp.size(1), Og = O / groups, L = col.size(3);
  const at::Tensor gm = gout.permute({0, 2, 3, 1}).reshape({-1, O});
  const at::Tensor colm = col.reshape({-1, L});
  at::Tensor acc_t = gwp.view({O, k}).t();  // (k, O) view
  for (int64_t gi = 0; gi < groups; ++gi)
    acc_t.narrow(1, gi * Og, Og).addmm_(colm.narrow(1, gi * k, k).t(), gm.narrow(1, gi * Og, Og));
}

// ------------------------------------------------------------ chunk contexts

template <typename T>
struct Tensors {
  at::Tensor x;  // channels-last input
  c10::optional<at::Tensor> koff, doff, mask;
  at::Tensor wt;  // depthwise weight (S2, C)
};

template <typename T>
Ctx<T> make_ctx(const Geometry& g, const std::vector<Segment>& segs, const Tensors<T>& t,
                const Chunk& ch) {
  Ctx<T> c;
  c.g = &g;
  c.segs = segs.data();
  c.nsegs = static_cast<int64_t>(segs.size());
  c.x = t.x.defined() ? t.x.template data_ptr<T>() : nullptr;
  c.koff = g.has_koff ? t.koff->template data_ptr<T>() : nullptr;
  c.doff = g.has_doff ? t.doff->template data_ptr<T>() : nullptr;
  c.mask = g.has_mask ? t.mask->template data_ptr<T>() : nullptr;
  c.wt = t.wt.defined() ? t.wt.template data_ptr<T>() : nullptr;
  c.n0 = ch.n0, c.nc = ch.nc, c.y0 = ch.y0, c.rows = ch.rows;
  return c;
}

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  if (!present(t)) return c10::nullopt;
  return t->contiguous();
}

// The layouts the kernels read: channels-last input (unless image tasks copy
// it image by image), contiguous offsets, and the depthwise weight as (S2, C).
template <typename T>
Tensors<T> make_tensors(const Geometry& g, const at::Tensor& input, const at::Tensor& w,
                        const c10::optional<at::Tensor>& koff,
                        const c10::optional<at::Tensor>& doff,
                        const c10::optional<at::Tensor>& mask, bool channels_last_input) {
  Tensors<T> t;
  if (channels_last_input)
    t.x = input.is_contiguous(at::MemoryFormat::ChannelsLast) ? input : to_channels_last(input);
  t.koff = contiguous_or_none(koff);
  t.doff = contiguous_or_none(doff);
  t.mask = contiguous_or_none(mask);
  if (g.depthwise) t.wt = w.reshape({g.C, g.S2}).t().contiguous();
  return t;
}

// Positions per parallel block: enough work to amortise the dispatch.
int64_t position_grain(const Geometry& g) {
  return std::max<int64_t>(4, 65536 / std::max<int64_t>(1, g.K * g.C));
}

// f(begin, end) over [0, n) in blocks of `block`, handed out dynamically:
// a thread that gets descheduled (a busy shared machine) or lands on slow
// blocks does not hold the others up. Every output element is still written
// by one block in a fixed order, so results do not depend on the schedule.
template <typename F>
void parallel_blocks(int64_t n, int64_t block, const F& f) {
  if (n <= 0) return;
  const int64_t nblocks = (n + block - 1) / block;
  const int64_t workers = std::min<int64_t>(nblocks, at::get_num_threads());
  if (workers <= 1) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1); b < nblocks; b = next.fetch_add(1))
      f(b * block, std::min(n, (b + 1) * block));
  });
}

// Output rows per block of row_block_phases: tall enough that two blocks of
// one phase never read the same input row ((K_h - 1) * d_h rows, at least 1),
// and at most max_blocks blocks per image.
int64_t row_block_height(const Geometry& g, const Chunk& ch, int64_t max_blocks) {
  const int64_t least = std::max<int64_t>(1, (g.Kh - 1) * g.dh);
  return std::max(least, (ch.rows + max_blocks - 1) / max_blocks);
}

int64_t row_blocks(const Geometry& g, const Chunk& ch, int64_t max_blocks) {
  const int64_t height = row_block_height(g, ch, max_blocks);
  return ch.nc * ((ch.rows + height - 1) / height);
}

// f(begin, end, block) over the chunk's positions in blocks of whole output
// rows of one image (block numbers 0 .. row_blocks() - 1), in two phases:
// even blocks, then odd blocks. Blocks of one phase never touch the same
// input row, so a pass may scatter into the input gradient with no atomics,
// and every pixel's sum runs in an order fixed by the geometry.
template <typename F>
void row_block_phases(const Geometry& g, const Chunk& ch, int64_t max_blocks, const F& f) {
  const int64_t height = row_block_height(g, ch, max_blocks);
  const int64_t blocks = (ch.rows + height - 1) / height;
  for (int64_t phase = 0; phase < 2; ++phase) {
    const int64_t per_image = (blocks + 1 - phase) / 2;
    parallel_blocks(ch.nc * per_image, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t ni = t / per_image, blk = 2 * (t % per_image) + phase;
        const int64_t r0 = blk * height, r1 = std::min(ch.rows, r0 + height);
        f((ni * ch.rows + r0) * g.Wo, (ni * ch.rows + r1) * g.Wo, ni * blocks + blk);
      }
    });
  }
}

at::Tensor chunk_view(const at::Tensor& t, const Chunk& ch) {
  return t.narrow(0, ch.n0, ch.nc).narrow(2, ch.y0, ch.rows);
}

// ------------------------------------------------------------ column rows
// By runs of positions (dense_rows_cpu.h) where that applies: in registers
// with kernel offsets, tap by tap into their cells without (DC); else the
// scatter (build_rows). ERFTOOL_CPU_COLUMN_BUILD=scatter forces the scatter
// (the tests compare the two bit for bit).
enum class ColumnBuild { kScatter, kDense, kTapCells };

ColumnBuild column_build(const Geometry& g) {
  const char* env = std::getenv("ERFTOOL_CPU_COLUMN_BUILD");
  if (env && std::strcmp(env, "scatter") == 0) return ColumnBuild::kScatter;
  if (dense_rows_apply(g)) return ColumnBuild::kDense;
  return g.has_koff ? ColumnBuild::kScatter : ColumnBuild::kTapCells;  // (depthwise: no rows)
}

template <typename T>
void build_columns(ColumnBuild how, const Ctx<T>& c, int64_t p0, int64_t p1, T* col) {
  if (how == ColumnBuild::kDense)
    build_rows_dense<T>(c, p0, p1, col);
  else if (how == ColumnBuild::kTapCells)
    build_rows_tap_cells<T>(c, p0, p1, col);
  else
    build_rows<T>(c, p0, p1, col);
}

// ------------------------------------------------------------ depthwise image tasks
// With enough images the depthwise layers run one image per task: the task
// copies its image (and its grad_out) to channels-last rows in per-thread
// buffers, runs the kernels, and copies its output (or input gradient) back
// to NCHW while it is still in cache, instead of whole-tensor layout copies
// before and after (19 % of the samples of a depthwise DCNv2 forward+backward
// on 8x256x56x56, with their page faults). Whole images also keep the
// input-gradient scatter of concurrent tasks apart, data offsets or not.

// Images from which the depthwise ops run image tasks (fewer would leave
// threads idle). A constant, so the results do not depend on the thread count
// (short of images too large for the per-thread buffers).
constexpr int64_t kMinImageTasks = 4;

bool image_tasks(const Geometry& g, int64_t elt, int64_t chunk_bytes) {
  const int64_t per_task = (2 * g.H * g.W + g.Ho * g.Wo) * g.C * elt;
  return g.depthwise && g.N >= kMinImageTasks &&
         at::get_num_threads() * per_task <= chunk_bytes;
}

// f(n, tid) for every image, handed out dynamically; tid < at::get_num_threads().
template <typename F>
void for_each_image(int64_t N, const F& f) {
  parallel_blocks(N, 1, [&](int64_t b, int64_t e) {
    const int64_t tid = at::get_thread_num();
    for (int64_t n = b; n < e; ++n) f(n, tid);
  });
}

// The context of image n, its input read from xb (channels-last rows).
template <typename T>
Ctx<T> image_ctx(const Geometry& g, const std::vector<Segment>& segs, const Tensors<T>& t,
                 int64_t n, const T* xb) {
  Ctx<T> c = make_ctx(g, segs, t, Chunk{{n, 1, 0, g.Ho}});
  c.x = xb, c.x_n0 = n;
  return c;
}

template <typename T>
void depthwise_forward_images(const Geometry& g, const Tensors<T>& t, const at::Tensor& input,
                              at::Tensor& out) {
  const auto segs = make_segments(g);
  const int64_t threads = at::get_num_threads();
  const int64_t image = g.H * g.W * g.C, rows = g.Ho * g.Wo * g.C;
  // allocated here: buffers allocated in the worker threads are
  // page-faulted in again on every call
  at::Tensor xbuf = at::empty({threads, image}, out.options());
  at::Tensor obuf = at::empty({threads, rows}, out.options());
  const T* x = input.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for_each_image(g.N, [&](int64_t n, int64_t tid) {
    T* xb = xbuf.data_ptr<T>() + tid * image;
    T* ob = obuf.data_ptr<T>() + tid * rows;
    band_rows_into(x, g.C, g.H, g.W, RowBand{n, 1, 0, g.H}, xb);
    const Ctx<T> c = image_ctx(g, segs, t, n, xb);
    depthwise_rows<T>(c, int64_t(0), g.Ho * g.Wo, ob, RunSampler<T>(c));
    rows_into_band(ob, g.O, g.Ho, g.Wo, RowBand{n, 1, 0, g.Ho}, o);
  });
}

// ------------------------------------------------------------ forward

template <typename T>
void forward_impl(const Geometry& g, const Tensors<T>& t, const at::Tensor& w,
                  int64_t chunk_bytes, at::Tensor& out) {
  const auto segs = make_segments(g);
  const int64_t elt = sizeof(T), grain = position_grain(g);
  const int64_t per_pos = g.depthwise ? 2 * g.C * elt : (g.row_len() + g.O) * elt;
  const auto chunks = plan_chunks(g, per_pos, (g.depthwise ? g.C : g.row_len()) * elt, chunk_bytes,
                                  g.depthwise ? kBufferCapBytes : kForwardGemmBufferCapBytes);
  const int64_t width = g.depthwise ? g.C : g.row_len();
  at::Tensor buf = at::empty({max_positions(chunks, g), width}, out.options());
  at::Tensor wp;
  if (!g.depthwise)
    wp = w.reshape({g.O, g.Cg, g.S2}).permute({0, 2, 1}).reshape({g.O, g.S2 * g.Cg, 1, 1}).contiguous();
  T* bp = buf.data_ptr<T>();
  const ColumnBuild how = column_build(g);
  for (const Chunk& ch : chunks) {
    const Ctx<T> c = make_ctx(g, segs, t, ch);
    parallel_blocks(ch.positions(g), grain, [&](int64_t b, int64_t e) {
      if (g.depthwise)
        depthwise_rows<T>(c, b, e, bp, RunSampler<T>(c));
      else
        build_columns<T>(how, c, b, e, bp);
    });
    if (g.depthwise) {
      rows_to_band(buf, ch, out);
    } else {
      const at::Tensor col = buf.narrow(0, 0, ch.positions(g)).view({ch.nc, ch.rows, g.Wo, width});
      const at::Tensor res = gemm_forward(col, wp, g.groups);
      // position-major rows unless oneDNN chose another output layout
      if (res.is_contiguous(at::MemoryFormat::ChannelsLast))
        rows_to_band(res, ch, out);
      else
        chunk_view(out, ch).copy_(res);
    }
  }
}

Options make_options(at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     int64_t offset_groups, int64_t data_groups, int64_t chunk_bytes) {
  return {kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(),
          groups,            offset_groups, data_groups,  chunk_bytes};
}

at::Tensor deform_forward_cpu(const at::Tensor& input_, const at::Tensor& weight_,
                              const c10::optional<at::Tensor>& koff_,
                              const c10::optional<at::Tensor>& doff_,
                              const c10::optional<at::Tensor>& mask_, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, int64_t offset_groups,
                              int64_t data_groups, int64_t chunk_bytes) {
  const Options o = make_options(kernel_size, stride, padding, dilation, groups, offset_groups,
                                 data_groups, chunk_bytes);
  Geometry g = make_geometry(input_, weight_, koff_, doff_, mask_, o);
  if (empty_problem(g)) return at::zeros({g.N, g.O, g.Ho, g.Wo}, input_.options());
  at::Tensor out = at::empty({g.N, g.O, g.Ho, g.Wo}, input_.options());  // chunks cover it
  const at::Tensor input = input_.contiguous();
  at::Tensor coeffs, w = weight_.contiguous();
  if (!g.has_koff) w = centred_weight(g, w, &coeffs);
  if (!g.has_koff && !g.has_doff && !g.has_mask)  // a rigid convolution
    return at::convolution(input, w, c10::nullopt, o.stride, o.padding, o.dilation, false, {0, 0}, groups);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "erftool_deform_forward_cpu", [&] {
    const bool images = image_tasks(g, sizeof(scalar_t), chunk_bytes);
    const auto t = make_tensors<scalar_t>(g, input, w, koff_, doff_, mask_, !images);
    if (images)
      depthwise_forward_images<scalar_t>(g, t, input, out);
    else
      forward_impl<scalar_t>(g, t, w, chunk_bytes, out);
  });
  return out;
}

// ------------------------------------------------------------ backward

struct Needs {
  bool input, weight, koff, doff, mask;
  bool any_g() const { return input || koff || doff || mask; }
  bool offsets() const { return koff || doff || mask; }
};

template <typename T>
struct Grads {
  at::Tensor input_cl;  // (N, H, W, C) accumulated
  at::Tensor koff, doff, mask;
  OffsetGrads<T> ptrs() const {
    return {koff.defined() ? koff.data_ptr<T>() : nullptr,
            doff.defined() ? doff.data_ptr<T>() : nullptr,
            mask.defined() ? mask.data_ptr<T>() : nullptr};
  }
};

// Row blocks below which a chunk's input gradient is gathered in a pass of
// its own instead of scattered in the fused pass (too few blocks per phase
// to keep the threads busy). A constant, so results do not depend on the
// thread count.
constexpr int64_t kMinScatterBlocks = 8;

// The input gradient in a pass of its own: a gather per input pixel on a
// rigid data grid, a scatter per (image, channel tile) with data offsets.
template <typename T, typename Grad>
void input_grad_pass(const Geometry& g, const Ctx<T>& c, const Grad& gr, T* gin) {
  if (!g.has_doff) {
    const int64_t lo = std::max<int64_t>(0, c.y0 * g.sh - g.ph);
    const int64_t hi = std::min<int64_t>(g.H, (c.y0 + c.rows - 1) * g.sh - g.ph + (g.Kh - 1) * g.dh + 1);
    if (hi <= lo) return;
    parallel_blocks(c.nc * (hi - lo), 1, [&](int64_t b, int64_t e) {
      input_grad_gather<T>(c, gr, lo, hi, b, e, gin);
    });
  } else {
    // Whole-image tasks when there are enough images (the tap corners are
    // recomputed per tile), channel tiles otherwise.
    int64_t tile = g.C;
    while (tile > 16 && c.nc * ((g.C + tile - 1) / tile) < at::get_num_threads()) tile = (tile + 1) / 2;
    const int64_t tasks = c.nc * ((g.C + tile - 1) / tile);
    parallel_blocks(tasks, 1, [&](int64_t b, int64_t e) {
      input_grad_scatter<T>(c, gr, tile, b, e, gin);
    });
  }
}

// One chunk's backward after the column gradient, in row-block phases: the
// column rows for the weight GEMM (col, null: not wanted) and the fused pass
// (lane_backward_cpu.h), writing the input gradient itself on a rigid grid
// when the chunk has enough row blocks, else a separate input pass.
template <typename T>
void backward_chunk(const Geometry& g, const Ctx<T>& c, const Chunk& ch, const DenseGrad<T>& gr,
                    const Needs& need, T* col, Grads<T>& out) {
  T* gin = need.input ? out.input_cl.template data_ptr<T>() : nullptr;
  const bool fused_input = gin && !g.has_doff && row_blocks(g, ch, ch.rows) >= kMinScatterBlocks;
  PassOutputs<T> po;
  po.offsets = out.ptrs();
  po.gin = fused_input ? gin : nullptr;
  const ColumnBuild how = column_build(g);
  if (col || need.offsets() || po.gin)
    row_block_phases(g, ch, ch.rows, [&](int64_t b, int64_t e, int64_t) {
      if (col) build_columns<T>(how, c, b, e, col);
      if (need.offsets() || po.gin) lane_backward_rows<T>(c, gr, po, b, e);
    });
  if (gin && !fused_input) input_grad_pass(g, c, gr, gin);
}

// ------------------------------------------------------------ band pipeline
// On large maps the chunk loop below streams each chunk's column gradient
// and columns (12.8 MB each for one 56x56 image of 64 channels, scope 4)
// through memory between its steps, and both threads meet at a barrier after
// every step. The band pipeline instead hands each thread whole bands of
// output rows (about kBandPositions positions, at most 2 MB of columns) and runs
// a band's column-gradient GEMM, fused pass and weight GEMM on that thread,
// back to back, while its buffers are still in cache. The input gradient is
// scattered race-free by the fused pass: on a rigid data grid with the bands
// in two phases (even bands of every image, then odd ones; a band is at least
// (K_h - 1) * d_h rows tall); with data offsets, whose taps may land anywhere
// in the image, with every image's bands run in order by one thread, or on
// few images into a buffer per run of bands (image_parts).

// Positions per band (fp32, 2 threads, forward+backward, interleaved A/B
// against the chunk loop): 256 positions ran 0.71-0.79x of the chunk loop's
// time on 56x56x64, 512 positions 0.80-0.85x; 0.69-0.73x with 16 or 32
// channels, 0.92x on 28x28x128.
constexpr int64_t kBandPositions = 256;
// Where a band's columns would outgrow this (column rows over 8 KB: 256
// channels at scope 4 in fp32), the chunk loop runs instead: the band
// pipeline was 7 % slower on 56x56x256.
constexpr int64_t kBandColumnBytes = 2 << 20;

// Band height in output rows, or 0 where the chunk loop serves instead:
// depthwise layers or an image too short to split in two (the pipeline does
// not apply); rows too long (above), too few bands (too few images, with data
// offsets) to share among the threads, or per-thread buffers over the
// chunk_bytes budget.
// With data offsets a band's taps may land anywhere in its image, so the
// slots below take whole images; with fewer images than 2 * threads, each
// image's bands are split into this many runs instead, each slot scattering
// into an input-gradient buffer of its own, added to the image's in slot
// order at the end (buffers within half of chunk_bytes). DK + DC and DC on
// one 56x56x64 image, forward+backward against conv2d: 4.3-4.8x and
// 2.4-2.6x in the chunk loop, 3.1x and 1.8-2.0x so (eight images: 3.0x, 1.7x).
int64_t image_parts(const Geometry& g, int64_t per_image, int64_t elt, int64_t chunk_bytes) {
  const int64_t threads = at::get_num_threads();
  if (!g.has_doff || g.N >= 2 * threads) return 1;
  int64_t parts = std::min(per_image, (2 * threads + g.N - 1) / g.N);
  while (parts > 1 && g.N * parts * g.H * g.W * g.C * elt > chunk_bytes / 2) --parts;
  return parts;
}

// ERFTOOL_CPU_BANDS=0 keeps the chunk loop; =1 takes the pipeline wherever it
// applies, with the thinnest bands (for tests and measurements).
int64_t band_height(const Geometry& g, int64_t elt, int64_t chunk_bytes) {
  const int64_t L = g.row_len();
  const int64_t least = std::max<int64_t>(1, (g.Kh - 1) * g.dh);
  if (g.depthwise || g.Ho <= least) return 0;
  const char* env = std::getenv("ERFTOOL_CPU_BANDS");
  if (env && std::strcmp(env, "0") == 0) return 0;
  if (env && std::strcmp(env, "1") == 0) return least;
  if (kBandPositions * L * elt > kBandColumnBytes) return 0;
  const int64_t height = std::max(least, (kBandPositions + g.Wo - 1) / g.Wo);
  const int64_t per_image = (g.Ho + height - 1) / height;
  const int64_t threads = at::get_num_threads();
  if (g.has_doff ? g.N * image_parts(g, per_image, elt, chunk_bytes) < 2 * threads
                 : per_image < 2 || g.N * (per_image / 2) < 2 * threads)
    return 0;
  if (threads * height * g.Wo * (2 * L + g.O) * elt > chunk_bytes) return 0;
  return height;
}

// grad of wp by bands (see above); the offset and input gradients go to out.
// Each weight-gradient accumulator ("slot") takes a fixed run of bands in a
// fixed order, and the slots are summed in order: the result does not depend
// on which thread ran which slot.
template <typename T>
at::Tensor backward_bands(const Geometry& g, const Tensors<T>& t, const at::Tensor& wp,
                          const at::Tensor& grad_out, int64_t height, const Needs& need,
                          int64_t chunk_bytes, Grads<T>& out) {
  const auto segs = make_segments(g);
  const int64_t L = g.row_len(), threads = at::get_num_threads();
  const int64_t most = height * g.Wo, per_image = (g.Ho + height - 1) / height;
  // By phase; with data offsets one phase, whose slots take whole images or
  // runs of one image's bands (image_parts).
  std::vector<Chunk> bands[2];
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t b = 0; b < per_image; ++b)
      bands[g.has_doff ? 0 : b % 2].push_back(
          Chunk{{n, 1, b * height, std::min(height, g.Ho - b * height)}});
  const int64_t parts = image_parts(g, per_image, sizeof(T), chunk_bytes);
  // Each slot's run of bands, [first, first + count) of its phase's list:
  // <= 4 * threads runs; with data offsets, of whole images, or of one
  // image's bands (parts per image).
  const int64_t most_slots = std::min<int64_t>(
      g.has_doff ? g.N : static_cast<int64_t>(bands[1].size()), 4 * threads);
  std::vector<std::pair<int64_t, int64_t>> runs[2];
  for (int phase = 0; phase < (g.has_doff ? 1 : 2); ++phase) {
    if (parts > 1) {
      for (int64_t n = 0; n < g.N; ++n)
        for (const auto& r : split(per_image, (per_image + parts - 1) / parts))
          runs[phase].push_back({n * per_image + r.first, r.second});
      continue;
    }
    const int64_t unit = g.has_doff ? per_image : 1;
    const int64_t units = static_cast<int64_t>(bands[phase].size()) / unit;
    for (auto r : split(units, (units + most_slots - 1) / most_slots))
      runs[phase].push_back({r.first * unit, r.second * unit});
  }
  const int64_t slots = static_cast<int64_t>(std::max(runs[0].size(), runs[1].size()));
  // Per-thread buffers, allocated here: buffers allocated in the worker
  // threads are page-faulted in again on every call.
  const auto opts = grad_out.options();
  at::Tensor gout_buf = at::empty({threads, most * g.O}, opts);
  at::Tensor gbuf = need.any_g() ? at::empty({threads, most * L}, opts) : at::Tensor();
  at::Tensor col = need.weight ? at::empty({threads, most * L}, opts) : at::Tensor();
  at::Tensor acc = need.weight ? at::zeros({slots, g.O, L / g.groups, 1, 1}, opts) : at::Tensor();
  T* gin = need.input ? out.input_cl.template data_ptr<T>() : nullptr;
  const int64_t image = g.H * g.W * g.C;
  // Each slot's own input gradient when slots share an image (image_parts).
  at::Tensor slot_gin = gin && parts > 1 ? at::zeros({slots, image}, opts) : at::Tensor();
  const T* go = grad_out.template data_ptr<T>();
  const std::vector<T> zeros(g.Cg, T(0));
  const ColumnBuild how = column_build(g);

  auto run_band = [&](const Chunk& ch, int64_t tid, int64_t slot) {
    const Ctx<T> c = make_ctx(g, segs, t, ch);
    const int64_t P = ch.positions(g);
    // The band's grad_out as channels-last rows (P, O).
    T* rows = gout_buf[tid].template data_ptr<T>();
    band_rows_into(go, g.O, g.Ho, g.Wo, ch, rows);
    const at::Tensor gout = at::from_blob(rows, {1, g.O, ch.rows, g.Wo},
                                          {P * g.O, 1, g.Wo * g.O, g.O}, opts);
    if (need.any_g()) gemm_column_grad(gout, wp, g.groups, gbuf[tid].narrow(0, 0, P * L).view({P, L}));
    const DenseGrad<T> gr{need.any_g() ? gbuf[tid].template data_ptr<T>() : nullptr, L,
                          g.sstride(), zeros.data()};
    if (need.weight) build_columns<T>(how, c, int64_t(0), P, col[tid].template data_ptr<T>());
    PassOutputs<T> po;
    po.offsets = out.ptrs();
    po.gin = gin;  // bands of one image run in order on one thread (data offsets)
    if (slot_gin.defined())  // or the image's bands are split among slots
      po.gin = slot_gin[slot].template data_ptr<T>(), po.gin_n0 = ch.n0;
    if (need.offsets() || gin) lane_backward_rows<T>(c, gr, po, int64_t(0), P);
    if (need.weight) {
      at::Tensor acc_slot = acc[slot];
      gemm_weight_grad_add(gout, col[tid].narrow(0, 0, P * L).view({1, ch.rows, g.Wo, L}),
                           acc_slot, g.groups);
    }
  };
  for (int phase = 0; phase < (g.has_doff ? 1 : 2); ++phase) {
    const auto& rs = runs[phase];
    parallel_blocks(static_cast<int64_t>(rs.size()), 1, [&](int64_t b, int64_t e) {
      const int64_t tid = at::get_thread_num();
      for (int64_t slot = b; slot < e; ++slot)
        for (int64_t i = rs[slot].first; i < rs[slot].first + rs[slot].second; ++i)
          run_band(bands[phase][i], tid, slot);
    });
  }
  if (slot_gin.defined()) {  // in slot order: the sums do not depend on the schedule
    at::Tensor images = out.input_cl.view({g.N, image});
    for (int64_t slot = 0; slot < slots; ++slot)
      images[bands[0][runs[0][slot].first].n0].add_(slot_gin[slot]);
  }
  if (!need.weight) return at::Tensor();
  at::Tensor gwp = acc[0].clone();
  for (int64_t s = 1; s < slots; ++s) gwp.add_(acc[s]);
  return gwp;
}

template <typename T>
at::Tensor backward_general(const Geometry& g, const Tensors<T>& t, const at::Tensor& w,
                            const at::Tensor& grad_out, int64_t chunk_bytes, const Needs& need,
                            Grads<T>& out) {
  const int64_t elt = sizeof(T), L = g.row_len();
  const at::Tensor wp =
      w.reshape({g.O, g.Cg, g.S2}).permute({0, 2, 1}).reshape({g.O, g.S2 * g.Cg, 1, 1}).contiguous();
  auto scope_major_to_weight = [&](const at::Tensor& gwp) {
    return gwp.view({g.O, g.S2, g.Cg}).permute({0, 2, 1}).reshape({g.O, g.Cg, g.Sh, g.Sw});
  };
  if (const int64_t height = band_height(g, elt, chunk_bytes)) {
    at::Tensor gwp = backward_bands<T>(g, t, wp, grad_out, height, need, chunk_bytes, out);
    return need.weight ? scope_major_to_weight(gwp) : at::Tensor();
  }
  const auto segs = make_segments(g);
  const auto chunks = plan_chunks(g, (2 * L + 2 * g.O) * elt, L * elt, chunk_bytes);
  at::Tensor col = at::empty({max_positions(chunks, g), L}, grad_out.options());
  at::Tensor gbuf;
  if (need.any_g()) gbuf = at::empty({max_positions(chunks, g), L}, grad_out.options());
  at::Tensor gwp = need.weight ? at::zeros_like(wp) : at::Tensor();
  const std::vector<T> zeros(g.Cg, T(0));
  for (const Chunk& ch : chunks) {
    const Ctx<T> c = make_ctx(g, segs, t, ch);
    const int64_t P = ch.positions(g);
    const at::Tensor colv = col.narrow(0, 0, P).view({ch.nc, ch.rows, g.Wo, L});
    const at::Tensor gout = band_to_channels_last(grad_out, ch);
    if (need.any_g()) gemm_column_grad(gout, wp, g.groups, gbuf.narrow(0, 0, P));
    const DenseGrad<T> gr{need.any_g() ? gbuf.data_ptr<T>() : nullptr, L, g.sstride(),
                          zeros.data()};
    backward_chunk(g, c, ch, gr, need, need.weight ? col.data_ptr<T>() : nullptr, out);
    if (need.weight) gemm_weight_grad_add(gout, colv, gwp, g.groups);
  }
  return need.weight ? scope_major_to_weight(gwp) : at::Tensor();
}

// Row blocks per image on the depthwise path: bounds the weight-gradient
// partial sums to this many (S2, C) buffers per image of a chunk.
constexpr int64_t kDepthwiseRowBlocks = 16;

// The depthwise backward by image tasks (see depthwise_forward_images): each
// task scatters its image's input gradient itself, into a per-thread buffer.
template <typename T>
at::Tensor depthwise_backward_images(const Geometry& g, const Tensors<T>& t,
                                     const at::Tensor& input, const at::Tensor& grad_out,
                                     const Needs& need, Grads<T>& out, at::Tensor& gi) {
  const auto segs = make_segments(g);
  const int64_t threads = at::get_num_threads();
  const int64_t image = g.H * g.W * g.C, rows = g.Ho * g.Wo * g.C;
  const auto opts = input.options();
  at::Tensor xbuf = at::empty({threads, image}, opts), gbuf = at::empty({threads, rows}, opts);
  at::Tensor ibuf = need.input ? at::empty({threads, image}, opts) : at::Tensor();
  // weight-gradient partial sums per image, reduced in order
  at::Tensor parts = need.weight ? at::zeros({g.N, g.S2, g.C}, opts) : at::Tensor();
  const T* x = input.data_ptr<T>();
  const T* go = grad_out.data_ptr<T>();
  for_each_image(g.N, [&](int64_t n, int64_t tid) {
    T* xb = xbuf.data_ptr<T>() + tid * image;
    T* gb = gbuf.data_ptr<T>() + tid * rows;
    band_rows_into(x, g.C, g.H, g.W, RowBand{n, 1, 0, g.H}, xb);
    band_rows_into(go, g.O, g.Ho, g.Wo, RowBand{n, 1, 0, g.Ho}, gb);
    DepthwiseOutputs<T> po;
    po.offsets = out.ptrs();
    if (need.weight) po.wacc = parts.data_ptr<T>() + n * g.S2 * g.C;
    T* ib = need.input ? ibuf.data_ptr<T>() + tid * image : nullptr;
    if (ib) {
      std::fill(ib, ib + image, T(0));
      po.gin = ib, po.gin_n0 = n;
    }
    const Ctx<T> c = image_ctx(g, segs, t, n, xb);
    depthwise_backward_rows<T>(c, static_cast<const T*>(gb), po, int64_t(0), g.Ho * g.Wo,
                               RunSampler<T>(c));
    if (ib) rows_into_band(ib, g.C, g.H, g.W, RowBand{n, 1, 0, g.H}, gi.data_ptr<T>());
  });
  if (!need.weight) return at::Tensor();
  return parts.sum(0).t().reshape({g.C, 1, g.Sh, g.Sw});
}

// The depthwise backward (depthwise_backward_rows) per chunk, where image
// tasks do not apply. The pass writes the input gradient itself on a rigid
// grid, in row-block phases, when there are enough blocks; elsewhere a
// separate input-gradient pass does.
template <typename T>
at::Tensor backward_depthwise(const Geometry& g, const Tensors<T>& t, const at::Tensor& grad_out,
                              int64_t chunk_bytes, const Needs& need, Grads<T>& out) {
  const auto segs = make_segments(g);
  const int64_t elt = sizeof(T);
  const auto chunks = plan_chunks(g, 2 * g.C * elt, g.C * elt, chunk_bytes);
  at::Tensor gwt = need.weight ? at::zeros({g.S2, g.C}, grad_out.options()) : at::Tensor();
  T* gin = need.input ? out.input_cl.template data_ptr<T>() : nullptr;
  const std::vector<T> zeros(g.C, T(0));
  for (const Chunk& ch : chunks) {
    const Ctx<T> c = make_ctx(g, segs, t, ch);
    const at::Tensor gcl = band_to_channels_last(grad_out, ch);
    const T* go = gcl.data_ptr<T>();
    const int64_t blocks = row_blocks(g, ch, kDepthwiseRowBlocks);
    const bool fused_input = gin && !g.has_doff && blocks >= kMinScatterBlocks;
    // Weight-gradient partial sums per block, reduced in order: the result
    // does not depend on which thread ran which block.
    at::Tensor parts;
    if (need.weight) parts = at::zeros({blocks, g.S2, g.C}, grad_out.options());
    DepthwiseOutputs<T> po;
    po.offsets = out.ptrs();
    po.gin = fused_input ? gin : nullptr;
    auto pass = [&](int64_t b, int64_t e, int64_t block) {
      DepthwiseOutputs<T> mine = po;
      if (need.weight) mine.wacc = parts.template data_ptr<T>() + block * g.S2 * g.C;
      depthwise_backward_rows<T>(c, go, mine, b, e, RunSampler<T>(c));
    };
    if (need.weight || need.offsets() || po.gin) row_block_phases(g, ch, kDepthwiseRowBlocks, pass);
    if (gin && !fused_input)
      input_grad_pass(g, c, DepthwiseGrad<T>{go, c.wt, g.C, zeros.data()}, gin);
    if (need.weight) gwt.add_(parts.sum(0));
  }
  if (!need.weight) return at::Tensor();
  return gwt.t().reshape({g.C, 1, g.Sh, g.Sw});
}

using GradTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

GradTuple deform_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& input_,
                              const at::Tensor& weight_, const c10::optional<at::Tensor>& koff_,
                              const c10::optional<at::Tensor>& doff_,
                              const c10::optional<at::Tensor>& mask_, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, int64_t offset_groups,
                              int64_t data_groups, int64_t chunk_bytes,
                              std::array<bool, 5> output_mask) {
  const Options o = make_options(kernel_size, stride, padding, dilation, groups, offset_groups,
                                 data_groups, chunk_bytes);
  Geometry g = make_geometry(input_, weight_, koff_, doff_, mask_, o);
  check_tensor(grad_out_, input_, "grad_output", 4);
  TORCH_CHECK(grad_out_.size(0) == g.N && grad_out_.size(1) == g.O && grad_out_.size(2) == g.Ho &&
                  grad_out_.size(3) == g.Wo,
              "deform (CPU): grad_output must be (", g.N, ", ", g.O, ", ", g.Ho, ", ", g.Wo,
              "), got ", grad_out_.sizes());
  const Needs need{output_mask[0], output_mask[1], output_mask[2] && g.has_koff,
                   output_mask[3] && g.has_doff, output_mask[4] && g.has_mask};
  at::Tensor gi, gw, gk, gd, gm;
  if (need.koff) gk = at::zeros_like(*koff_, at::MemoryFormat::Contiguous);
  if (need.doff) gd = at::zeros_like(*doff_, at::MemoryFormat::Contiguous);
  if (need.mask) gm = at::zeros_like(*mask_, at::MemoryFormat::Contiguous);
  if (empty_problem(g)) {
    if (need.input) gi = at::zeros_like(input_, at::MemoryFormat::Contiguous);
    if (need.weight) gw = at::zeros_like(weight_, at::MemoryFormat::Contiguous);
    return {gi, gw, gk, gd, gm};
  }
  const at::Tensor input = input_.contiguous(), grad_out = grad_out_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  at::Tensor coeffs, w = weight;
  if (!g.has_koff) w = centred_weight(g, w, &coeffs);
  if (!g.has_koff && !g.has_doff && !g.has_mask) {  // a rigid convolution
    auto r = at::convolution_backward(grad_out, input, w, c10::nullopt, o.stride, o.padding,
                                      o.dilation, false, {0, 0}, groups,
                                      {need.input, need.weight, false});
    if (need.input) gi = std::get<0>(r).contiguous();
    if (need.weight) gw = scope_weight_grad(std::get<1>(r), coeffs, weight);
    return {gi, gw, gk, gd, gm};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "erftool_deform_backward_cpu", [&] {
    const bool images = image_tasks(g, sizeof(scalar_t), chunk_bytes);
    const auto t = make_tensors<scalar_t>(g, input, w, koff_, doff_, mask_, !images);
    Grads<scalar_t> out;
    out.koff = gk, out.doff = gd, out.mask = gm;
    at::Tensor gwk;
    if (images) {
      if (need.input) gi = at::empty_like(input, at::MemoryFormat::Contiguous);
      gwk = depthwise_backward_images<scalar_t>(g, t, input, grad_out, need, out, gi);
    } else {
      if (need.input) out.input_cl = at::zeros({g.N, g.H, g.W, g.C}, input.options());
      gwk = g.depthwise ? backward_depthwise<scalar_t>(g, t, grad_out, chunk_bytes, need, out)
                        : backward_general<scalar_t>(g, t, w, grad_out, chunk_bytes, need, out);
      if (need.input) gi = nhwc_to_nchw(out.input_cl);
    }
    if (need.weight) gw = scope_weight_grad(gwk, coeffs, weight);
  });
  return {gi, gw, gk, gd, gm};
}

}  // namespace
}  // namespace cpu
}  // namespace erftool

TORCH_LIBRARY_IMPL(erftool_native, CPU, m) {
  m.impl("deform_forward", &erftool::cpu::deform_forward_cpu);
  m.impl("deform_backward", &erftool::cpu::deform_backward_cpu);
}
