// CPU backend of class_gather (contract: docs/kernels.md, "class_gather"; maths:
// fastctx/ops/class_gather.py).
//
// Work unit: a tile of n pixels of one image. In NCHW, feats' tile is C rows
// of n pixels and probs' tile K rows, rows N = H*W apart. Each feats tile is
// read from memory once, into a dense per-thread buffer F [C x n] that stays
// in L2 (cpu/class_tiles.h pack_rows); probs are read in place. The [K x n]
// weights of a tile live in a per-thread buffer; nothing of size [B, N, K] or
// [B, N, C] exists.
//
// Forward, per chunk (a fixed run of tiles of one image, see below):
//   "ocr"    the chunk's maximum m_k of scale * probs_k (a first read of its
//            probs, which are K/C the size of its feats and stay in cache), then
//            per tile W = exp(scale * probs - shift_k), sum_k += rowsum(W)
//   "paper"  per tile W = softmax over classes, pixel by pixel; mass_k += rowsum(W)
//   both     P^T [C x K] += F W^T    (tile_gemm over the tile's pixels)
// then per (image, class), over the image's chunks in order: "ocr" merges
// the online-softmax partials (common/class_context.h), "paper" adds them
// and divides by the mass. The saved statistic is lse_k ("ocr") or mass_k
// ("paper").
//
// Backward, one local pass per tile (no sums across pixels):
//   W recomputed from the statistic; with Gs = grad ("ocr") or grad_k / mass_k
//   ("paper") and offset_k = Gs_k . centre_k,
//   D = Gs F            [K x n]   (tile_gemm over C)
//   grad_probs          "ocr": scale W (D - offset) row by row; "paper": the
//                       softmax backward over classes of W and D - offset
//   grad_feats tile     Gs^T W    [C x n]   (tile_gemm over K), written in place
// ("ocr": offset_k = G_k . centre_k equals the reference softmax backward's
// sum_n w_kn G_k . F_n without a pass over F; for a grad row that is not
// finite the pixel sum itself is taken, see ocr_offset_direct.)
//
// Determinism: the chunking depends on the shapes only (cpu/parallel.h), each
// chunk owns its partials, and partials are merged in chunk order; every sum
// inside a tile has a fixed order. Results are identical for any thread count.
// Memory beyond inputs and outputs: per-thread tile buffers and the chunks'
// [C, Kp] partials (Kp: K padded to whole vectors); a chunk holds >= 16 Kp
// pixels or a whole image, so the partials stay below 1/16 of feats on maps
// of at least 16 Kp pixels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "common/class_context.h"
#include "cpu/class_tiles.h"
#include "cpu/output.h"
#include "cpu/parallel.h"

namespace fastctx {
namespace {

enum class Mode { kOcr, kPaper };

Mode parse_mode(c10::string_view mode) {
  TORCH_CHECK(mode == "ocr" || mode == "paper",
              "class_gather (cpu): mode must be \"ocr\" or \"paper\", got \"", std::string(mode),
              "\"");
  return mode == "ocr" ? Mode::kOcr : Mode::kPaper;
}

struct Dims {
  int64_t B, C, K, N;
};

// The checks the loops' memory accesses rely on; fastctx/ops validates user input before.
Dims check_inputs(const at::Tensor& feats, const at::Tensor& probs, const char* fn) {
  TORCH_CHECK(feats.device().is_cpu() && probs.device().is_cpu(), fn,
              " (cpu): expected CPU tensors, got feats on ", feats.device(), " and probs on ",
              probs.device());
  TORCH_CHECK(feats.scalar_type() == at::kFloat || feats.scalar_type() == at::kDouble, fn,
              " (cpu): expected feats of dtype float32 or float64, got ", feats.scalar_type());
  TORCH_CHECK(probs.scalar_type() == feats.scalar_type(), fn, ": expected probs of feats' dtype ",
              feats.scalar_type(), ", got ", probs.scalar_type());
  TORCH_CHECK(feats.dim() == 4 && probs.dim() == 4, fn,
              ": expected feats [B, C, H, W] and probs [B, K, H, W], got ", feats.sizes(), " and ",
              probs.sizes());
  TORCH_CHECK(feats.is_contiguous() && probs.is_contiguous(), fn,
              ": expected contiguous (NCHW) feats and probs");
  TORCH_CHECK(probs.size(0) == feats.size(0) && probs.size(2) == feats.size(2) &&
                  probs.size(3) == feats.size(3),
              fn, ": feats ", feats.sizes(), " and probs ", probs.sizes(),
              " must share the batch and the spatial size");
  const Dims d{feats.size(0), feats.size(1), probs.size(1), feats.size(2) * feats.size(3)};
  TORCH_CHECK(d.B >= 1 && d.C >= 1 && d.K >= 1 && d.N >= 1, fn,
              ": expected non-empty feats and probs, got ", feats.sizes(), " and ", probs.sizes());
  return d;
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
                const char* fn) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.sizes() == sizes,
              fn, ": expected a contiguous CPU ", name, " of dtype ", dtype, " and shape ", sizes,
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// ~64K feature elements per tile (256 KiB in fp32): the packed feats tile and
// the [K x n] buffers stay in a 1-2 MiB L2. Tiles are multiples of 16 pixels,
// so tile_gemm's rows are whole vectors except at an image's end.
constexpr int64_t kTileElems = 1 << 16;
constexpr int64_t kMinTile = 16, kMaxTile = 512;
// Chunks hold >= 16 Kp pixels (Kp: K padded to whole vectors), so the chunks'
// [C, Kp] partials stay below 1/16 of feats.
constexpr int64_t kMinChunkPixelsPerClass = 16;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct Tiling {
  int64_t tile_n, n_tiles;
  int64_t Kp;  // classes padded to whole vectors (a multiple of 16)
  cpu::ChunkPlan chunks;
};

Tiling make_tiling(const Dims& d) {
  Tiling t;
  t.tile_n = std::clamp<int64_t>(kTileElems / d.C / kMinTile * kMinTile, kMinTile, kMaxTile);
  t.n_tiles = (d.N + t.tile_n - 1) / t.tile_n;
  t.Kp = round_up(d.K, 16);
  const int64_t min_tiles = (kMinChunkPixelsPerClass * t.Kp + t.tile_n - 1) / t.tile_n;
  t.chunks = cpu::plan_chunks(d.B, t.n_tiles, min_tiles);
  return t;
}

// ---------------------------------------------------------------------------
// Forward

template <typename T>
void gather_fwd_impl(const at::Tensor& feats, const at::Tensor& probs, Mode mode, T scale,
                     const Dims& d, at::Tensor& centres, at::Tensor& stat) {
  const Tiling t = make_tiling(d);
  // W^T's padding columns stay 0 and give unused partial columns.
  const int64_t C = d.C, K = d.K, N = d.N, Kp = t.Kp;
  const int64_t n_chunks = t.chunks.chunks;
  const T* fp = feats.const_data_ptr<T>();
  const T* pp = probs.const_data_ptr<T>();
  // Per chunk: P^T [C, Kp] and, per class, the sum of the weights ("ocr": of
  // exp(v - shift); "paper": the mass) and the shift ("ocr").
  auto partial = at::empty({n_chunks, C, Kp}, feats.options());
  auto part_sum = at::empty({n_chunks, K}, feats.options());
  auto part_shift = at::empty({n_chunks, K}, feats.options());
  T* P_all = partial.mutable_data_ptr<T>();
  T* sum_all = part_sum.mutable_data_ptr<T>();
  T* shift_all = part_shift.mutable_data_ptr<T>();

  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    // Zeroed once: the padding of W^T stays 0, and stale values elsewhere are finite.
    std::vector<T> bufs((K + C) * t.tile_n + t.tile_n * Kp, T(0));
    T* w = bufs.data();                 // W [K x tile_n]
    T* ft = w + K * t.tile_n;           // feats tile [C x tile_n]
    T* wt = ft + C * t.tile_n;          // W^T [tile_n x Kp]
    for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
      const int64_t b = chunk / t.chunks.chunks_per_row;
      const int64_t t0 = (chunk % t.chunks.chunks_per_row) * t.chunks.tiles_per_chunk;
      const int64_t t1 = std::min(t0 + t.chunks.tiles_per_chunk, t.n_tiles);
      const int64_t n_begin = t0 * t.tile_n, n_end = std::min(t1 * t.tile_n, N);
      const T* probs_b = pp + b * K * N;
      const T* feats_b = fp + b * C * N;
      T* P = P_all + chunk * C * Kp;  // row-major [C, Kp]
      T* sums = sum_all + chunk * K;
      T* shift = shift_all + chunk * K;
      std::fill(P, P + C * Kp, T(0));
      std::fill(sums, sums + K, T(0));
      if (mode == Mode::kOcr) {
        std::fill(shift, shift + K, -static_cast<T>(INFINITY));
        cpu::row_max(probs_b + n_begin, N, K, n_end - n_begin, scale, shift);
        for (int64_t k = 0; k < K; ++k) shift[k] = softmax_shift(shift[k]);
      }
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n0 = tile * t.tile_n, nc = std::min(t.tile_n, N - n0);
        if (mode == Mode::kOcr) {
          cpu::exp_rows(w, t.tile_n, probs_b + n0, N, K, nc, scale, shift, sums);
        } else {
          cpu::softmax_columns(w, t.tile_n, probs_b + n0, N, K, nc, scale,
                               static_cast<T*>(nullptr));
          cpu::add_row_sums(w, t.tile_n, K, nc, sums);
        }
        cpu::transpose_rows(wt, Kp, w, t.tile_n, K, nc);
        cpu::pack_rows(ft, t.tile_n, feats_b + n0, N, C, nc);
        // P^T [C x Kp] += F [C x nc] W^T [nc x Kp]
        cpu::tile_gemm<T>(C, nc, Kp, ft, t.tile_n, 1, wt, Kp, P, Kp, /*accumulate=*/true);
      }
    }
  });

  // Merge the chunks of each (image, class) in chunk order.
  T* cp = centres.mutable_data_ptr<T>();
  T* sp = stat.mutable_data_ptr<T>();
  const int64_t per_row = t.chunks.chunks_per_row;
  at::parallel_for(0, d.B * K, cpu::task_grain(per_row * C), [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t b = r / K, k = r % K;
      const int64_t first = b * per_row;  // the image's first chunk
      const T* sums = sum_all + first * K + k;
      const T* shift = shift_all + first * K + k;
      T* out = cp + r * C;
      std::fill(out, out + C, T(0));
      const T merged_shift =
          mode == Mode::kOcr ? softmax_merge_shift(shift, sums, per_row, K) : T(0);
      T total = 0;
      for (int64_t j = 0; j < per_row; ++j) {
        // Every chunk is added, also with factor 0: a 0 weight times an
        // infinite feature is NaN in the reference's product too.
        const T f = mode == Mode::kOcr
                        ? softmax_merge_factor(shift[j * K], sums[j * K], merged_shift)
                        : T(1);
        total += f * sums[j * K];
        const T* Pj = P_all + (first + j) * C * Kp + k;  // column k of chunk j's P^T
        for (int64_t c = 0; c < C; ++c) out[c] += f * Pj[c * Kp];
      }
      const T inv = T(1) / total;
      for (int64_t c = 0; c < C; ++c) out[c] *= inv;
      sp[r] = mode == Mode::kOcr ? merged_shift + class_log(total) : total;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> class_gather_fwd(const at::Tensor& feats,
                                                    const at::Tensor& probs,
                                                    c10::string_view mode_name, double scale) {
  const Mode mode = parse_mode(mode_name);
  const Dims d = check_inputs(feats, probs, "class_gather_fwd");
  auto centres = at::empty({d.B, d.K, d.C}, feats.options());
  auto stat = at::empty({d.B, d.K}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "class_gather_fwd", [&] {
    gather_fwd_impl<scalar_t>(feats, probs, mode, static_cast<scalar_t>(scale), d, centres, stat);
  });
  return {centres, stat};
}

// ---------------------------------------------------------------------------
// Backward

// offset = sum_n w_n (g . F_n), w_n = exp(scale * probs_n - lse): the "ocr"
// offset as the reference's softmax backward sums it, over the pixels. Only
// for a grad row g that is not finite, where the shortcut g . centre has
// another non-finite pattern: an infinite g_c gives +-inf for g . centre but
// NaN for the sum when feats' channel c changes sign over the pixels. Rare,
// and slow: a pass over the image's feats per such row.
template <typename T>
T ocr_offset_direct(const T* g, const T* feats_b, const T* probs_k, T lse, T scale, int64_t C,
                    int64_t N) {
  std::vector<T> dots(N, T(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* f = feats_b + c * N;
    for (int64_t n = 0; n < N; ++n) dots[n] += g[c] * f[n];
  }
  T acc = 0;
  for (int64_t n = 0; n < N; ++n) acc += class_exp(scale * probs_k[n] - lse) * dots[n];
  return acc;
}

template <typename T>
void gather_bwd_impl(const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& probs,
                     const at::Tensor& centres, const at::Tensor& stat, Mode mode, T scale,
                     const Dims& d, at::Tensor& grad_feats, at::Tensor& grad_probs) {
  const int64_t C = d.C, K = d.K, N = d.N;
  const Tiling t = make_tiling(d);
  const T* fp = feats.const_data_ptr<T>();
  const T* pp = probs.const_data_ptr<T>();
  const T* sp = stat.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  const T* cp = centres.const_data_ptr<T>();
  T* gfp = grad_feats.mutable_data_ptr<T>();
  T* gpp = grad_probs.mutable_data_ptr<T>();

  // Gs = grad ("ocr") or grad_k / mass_k ("paper"), [B, K, C]; offset_k = Gs_k . centre_k.
  at::Tensor gs_buf = mode == Mode::kOcr ? grad : at::empty({d.B, K, C}, grad.options());
  auto offset_buf = at::empty({d.B, K}, grad.options());
  T* offset = offset_buf.mutable_data_ptr<T>();
  T* gs_scaled = mode == Mode::kOcr ? nullptr : gs_buf.mutable_data_ptr<T>();
  at::parallel_for(0, d.B * K, cpu::task_grain(2 * C), [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const T* g = gp + r * C;
      const T* c = cp + r * C;
      T acc = 0;
      if (mode == Mode::kOcr) {
        T nonfinite = 0;  // NaN iff some g[i] is +-inf or NaN
        for (int64_t i = 0; i < C; ++i) {
          acc += g[i] * c[i];
          nonfinite += g[i] - g[i];
        }
        if (!(nonfinite == T(0))) {
          acc = ocr_offset_direct(g, fp + (r / K) * C * N, pp + r * N, sp[r], scale, C, N);
        }
      } else {
        const T inv_mass = T(1) / sp[r];
        T* gs = gs_scaled + r * C;
        for (int64_t i = 0; i < C; ++i) {
          gs[i] = g[i] * inv_mass;
          acc += gs[i] * c[i];
        }
      }
      offset[r] = acc;
    }
  });
  const T* gs_all = gs_buf.const_data_ptr<T>();

  at::parallel_for(0, d.B * t.n_tiles, 1, [&](int64_t u_begin, int64_t u_end) {
    // Zeroed once: tile_gemm runs whole vectors past a short last tile; what
    // it reads there must be finite (stale values of earlier tiles are).
    std::vector<T> bufs((2 * K + C) * t.tile_n, T(0));
    T* w = bufs.data();                 // W [K x tile_n]
    T* dd = w + K * t.tile_n;           // D [K x tile_n]
    T* ft = dd + K * t.tile_n;          // feats tile [C x tile_n]
    for (int64_t u = u_begin; u < u_end; ++u) {
      const int64_t b = u / t.n_tiles, n0 = (u % t.n_tiles) * t.tile_n;
      const int64_t nc = std::min(t.tile_n, N - n0);
      const T* probs_t = pp + b * K * N + n0;
      const T* gs = gs_all + b * K * C;
      const T* off = offset + b * K;
      if (mode == Mode::kOcr) {
        cpu::exp_rows(w, t.tile_n, probs_t, N, K, nc, scale, sp + b * K, static_cast<T*>(nullptr));
      } else {
        cpu::softmax_columns(w, t.tile_n, probs_t, N, K, nc, scale, static_cast<T*>(nullptr));
      }
      cpu::pack_rows(ft, t.tile_n, fp + b * C * N + n0, N, C, nc);
      // D [K x nc] = Gs [K x C] F [C x nc], on whole vectors (both are tile buffers)
      cpu::tile_gemm<T>(K, C, round_up(nc, 16), gs, C, 1, ft, t.tile_n, dd, t.tile_n, false);
      T* gprobs_t = gpp + b * K * N + n0;
      if (mode == Mode::kOcr) {
        cpu::softmax_grad_rows(gprobs_t, N, w, t.tile_n, dd, t.tile_n, off, K, nc, scale);
      } else {
        cpu::softmax_grad_columns(gprobs_t, N, w, t.tile_n, dd, t.tile_n, off, K, nc, scale);
      }
      // grad_feats tile [C x nc] = Gs^T [C x K] W [K x nc]
      cpu::tile_gemm<T>(C, K, nc, gs, 1, C, w, t.tile_n, gfp + b * C * N + n0, N, false);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> class_gather_bwd(const at::Tensor& grad,
                                                    const at::Tensor& feats,
                                                    const at::Tensor& probs,
                                                    const at::Tensor& centres,
                                                    const at::Tensor& stat,
                                                    c10::string_view mode_name, double scale) {
  const char* fn = "class_gather_bwd";
  const Mode mode = parse_mode(mode_name);
  const Dims d = check_inputs(feats, probs, fn);
  check_like(grad, "grad", {d.B, d.K, d.C}, feats.scalar_type(), fn);
  check_like(centres, "centres", {d.B, d.K, d.C}, feats.scalar_type(), fn);
  check_like(stat, "stat", {d.B, d.K}, feats.scalar_type(), fn);
  auto grad_feats = cpu::empty_output_like(feats);
  auto grad_probs = cpu::empty_output_like(probs);
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "class_gather_bwd", [&] {
    gather_bwd_impl<scalar_t>(grad, feats, probs, centres, stat, mode, static_cast<scalar_t>(scale),
                              d, grad_feats, grad_probs);
  });
  return {grad_feats, grad_probs};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("class_gather_fwd", &fastctx::class_gather_fwd);
  m.impl("class_gather_bwd", &fastctx::class_gather_bwd);
}
