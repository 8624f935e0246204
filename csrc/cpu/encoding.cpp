// CPU backend of the Encoding layer (see docs/kernels.md, "encoding").
//
// Work unit: a pixel tile of one image (tile_n pixels, all D channels). Each
// tile is copied once into a small per-thread buffer *centred* by m = mean_k c_k
// (x' = x - m; the copy doubles as GEMM packing and keeps the distance free of
// cancellation for large-norm inputs), then everything else runs on cache-
// resident data with BLAS calls on raw pointers:
//   forward   L  = X' C'^T                  [tile_n x K]  -> clamp, scale, softmax = A
//             P += A^T X'                   [K x D]       (the chunk's partial)
//   backward  [X'C'^T | X' dE^T]            [tile_n x 2K] (one GEMM on S = [c'; dE_b])
//             -> A, dA, dL, W = 2 s dL per pixel, stored in place as M = [-W | A]
//             grad_x tile = rowsum(W) x' + M S   (written straight into grad_x)
//             Pc += (-W)^T X'               [K x D]
// Pixel-major [tile_n][K] assignment rows keep each pixel's K values contiguous,
// so the per-pixel maths is the row helpers of common/encoding.h. The softmax
// gradient uses dA shifted by the pixel's winning codeword (no cancellation
// for near one-hot rows).
// Spread codewords: where a pixel sits near a codeword far from the mean m,
// centring does not save that entry's expanded distance (common/encoding.h).
// Such (pixel, codeword) entries, rare and flagged per pixel by
// pixel_distances(), leave the GEMMs: their distance, dA and residual terms
// use r = x - c_k formed from the raw values, as the reference does. NaN and
// inf propagate as in the reference: see encoding_sq_dist /
// encoding_finite_or_zero; the backward evaluates non-finite gradient rows
// term by term through the same direct path.
//
// Determinism: tiles are grouped into chunks (a fixed run of tiles of one image;
// the chunking depends on the shapes only, never on the thread count). Each
// chunk owns a [K, D] partial (plus [K] vectors); partials are summed in chunk
// order afterwards. BLAS runs single-threaded inside a chunk. Results are
// bit-identical run to run and for any torch.set_num_threads.
//
// x is never copied as a whole and [B, N, K] / [B, N, K, D] never exist: extra
// memory is per-thread tile buffers plus chunks x K x D partials (chunks hold
// >= 16 K pixels, so the partials stay below 1/16 of x).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/encoding.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/output.h"
#include "cpu/prefetch.h"

namespace fastctx {
namespace {

using cpu::blas_gemm;
using cpu::kN;
using cpu::kT;
using cpu::SingleThreadedBlas;

struct Shape {
  int64_t B, N, K, D;
};

void check_common(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                  bool channels_first, const char* fn) {
  TORCH_CHECK(x.device().is_cpu() && codewords.device().is_cpu() && scale.device().is_cpu(), fn,
              " (cpu): expected CPU tensors, got x on ", x.device(), ", codewords on ",
              codewords.device(), ", scale on ", scale.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, fn,
              " (cpu): expected x of dtype float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(codewords.scalar_type() == x.scalar_type() && scale.scalar_type() == x.scalar_type(),
              fn, ": expected codewords and scale of x's dtype ", x.scalar_type(), ", got ",
              codewords.scalar_type(), " and ", scale.scalar_type());
  if (channels_first) {
    TORCH_CHECK(x.dim() >= 3, fn, ": expected x of shape [B, D, N] (or [B, D, H, W]) when "
                "channels_first, got ", x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 3, fn, ": expected x of shape [B, N, D] when not channels_first, got ",
                x.sizes());
  }
  TORCH_CHECK(x.is_contiguous(), fn, ": expected a contiguous x (", channels_first ? "[B, D, N]" :
              "[B, N, D]", "), got strides ", x.strides());
  TORCH_CHECK(codewords.dim() == 2 && codewords.is_contiguous(), fn,
              ": expected contiguous codewords of shape [K, D], got ", codewords.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous(), fn,
              ": expected contiguous scale of shape [K], got ", scale.sizes());
}

Shape check_inputs(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                   bool channels_first, const char* fn) {
  check_common(x, codewords, scale, channels_first, fn);
  Shape s;
  s.B = x.size(0);
  s.K = codewords.size(0);
  if (channels_first) {
    s.D = x.size(1);
    s.N = 1;
    for (int64_t i = 2; i < x.dim(); ++i) s.N *= x.size(i);
  } else {
    s.N = x.size(1);
    s.D = x.size(2);
  }
  TORCH_CHECK(codewords.size(1) == s.D, fn, ": expected codewords [K, D=", s.D,
              "] to match x's channel count, got ", codewords.sizes());
  TORCH_CHECK(s.K >= 1, fn, ": expected at least one codeword (K >= 1), got ", codewords.sizes());
  TORCH_CHECK(scale.size(0) == s.K, fn, ": expected scale of shape [K=", s.K, "], got ",
              scale.sizes());
  // BLAS takes int dimensions and leading dimensions (N is the ld of a channels_first x).
  TORCH_CHECK(s.N < INT_MAX && s.D < INT_MAX / 2 && 2 * s.K < INT_MAX, fn,
              ": sizes too large for 32-bit BLAS indexing (N=", s.N, ", D=", s.D, ", K=", s.K, ")");
  return s;
}

// ~64K elements per centred tile (256 KiB in fp32): tile + assignment rows +
// BLAS packing stay well inside a 1-2 MiB L2.
constexpr int64_t kTileElems = 1 << 16;
constexpr int64_t kMinTile = 16, kMaxTile = 256;
// Chunks (cpu/parallel.h) hold >= 16 K pixels, so the [K, D] partials stay
// small against x.
constexpr int64_t kMinChunkPixelsPerCode = 16;

struct Tiling {
  int64_t tile_n, n_tiles, tiles_per_chunk, chunks_per_image, n_chunks;
};

Tiling make_tiling(const Shape& s) {
  Tiling t;
  const int64_t fit = kTileElems / std::max<int64_t>(s.D, 1) / kMinTile * kMinTile;
  t.tile_n = std::clamp<int64_t>(fit, kMinTile, kMaxTile);
  t.n_tiles = (s.N + t.tile_n - 1) / t.tile_n;
  const int64_t min_tiles = (kMinChunkPixelsPerCode * s.K + t.tile_n - 1) / t.tile_n;
  const cpu::ChunkPlan plan = cpu::plan_chunks(s.B, t.n_tiles, min_tiles);
  t.tiles_per_chunk = plan.tiles_per_chunk;
  t.chunks_per_image = plan.chunks_per_row;
  t.n_chunks = plan.chunks;
  return t;
}

// Centred codewords c' = c - m, m = mean_k c_k, and ||c'_k||^2. Any m keeps the
// maths exact (translation invariance); the mean puts c' and nearby x' at O(spread).
// A channel whose mean is not finite is not centred (encoding_finite_or_zero).
// c' is a GEMM operand, so it lives in a 64-byte aligned ATen buffer: MKL's
// summation order can depend on operand alignment, which must not vary per call.
template <typename scalar_t>
struct Codebook {
  std::vector<scalar_t> mean, sq;
  at::Tensor centred_buf;
  scalar_t* centred = nullptr;
  const scalar_t* raw = nullptr;  // c itself, for direct residuals x - c_k
};

template <typename scalar_t>
Codebook<scalar_t> make_codebook(const scalar_t* c, int64_t K, int64_t D,
                                 const at::TensorOptions& options) {
  Codebook<scalar_t> cb;
  cb.raw = c;
  cb.mean.assign(D, scalar_t(0));
  cb.centred_buf = at::empty({K, D}, options);
  cb.centred = cb.centred_buf.template mutable_data_ptr<scalar_t>();
  cb.sq.assign(K, scalar_t(0));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t d = 0; d < D; ++d) cb.mean[d] += c[k * D + d];
  for (int64_t d = 0; d < D; ++d)
    cb.mean[d] = encoding_finite_or_zero(cb.mean[d] / static_cast<scalar_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    scalar_t acc = 0;
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t v = c[k * D + d] - cb.mean[d];
      cb.centred[k * D + d] = v;
      acc += v * v;
    }
    cb.sq[k] = acc;
  }
  return cb;
}

// A channels_first tile is D short rows N apart: far more streams than the
// hardware prefetchers track, so its loads would stall on memory latency. The
// next tile (and, in the backward, the grad_x tile about to be written) is
// prefetched a few cache lines per pixel from inside the per-pixel loop
// (cpu::SpreadPrefetch), so the misses overlap that compute.

// Sets up prefetching of the tile after `tile` of the same image (channels_first only).
template <typename scalar_t>
void prefetch_next_x_tile(cpu::SpreadPrefetch& pf, const scalar_t* x, const Shape& s, bool cf,
                          int64_t b, int64_t tile, int64_t tile_n, int64_t n_tiles) {
  pf.clear();
  if (!cf || tile + 1 >= n_tiles) return;
  const int64_t n1 = (tile + 1) * tile_n, nc = std::min(tile_n, s.N - n1);
  pf.add_rows(x + b * s.D * s.N + n1, s.D, nc * sizeof(scalar_t), s.N * sizeof(scalar_t), false);
}

// Copies pixels [n0, n0 + nc) of image b into xb as x - m and writes their
// squared norms. channels_first: xb is [D][nc] (column-major [nc x D], ld nc),
// else [nc][D] (column-major [D x nc], ld D): the source layout, so the copy is
// a straight streaming pass and the GEMMs pick the matching transpose flag.
template <typename scalar_t>
void load_centred_tile(const scalar_t* x, const scalar_t* mean, const Shape& s, bool cf, int64_t b,
                       int64_t n0, int64_t nc, scalar_t* xb, scalar_t* xsq) {
  const int64_t D = s.D, N = s.N;
  if (cf) {
    std::fill(xsq, xsq + nc, scalar_t(0));
    const scalar_t* src = x + b * D * N + n0;
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t md = mean[d];
      const scalar_t* r = src + d * N;
      scalar_t* o = xb + d * nc;
      for (int64_t i = 0; i < nc; ++i) {
        const scalar_t v = r[i] - md;
        o[i] = v;
        xsq[i] += v * v;
      }
    }
  } else {
    constexpr int64_t L = 8;  // independent partial sums: a vectorisable, fixed-order reduction
    for (int64_t i = 0; i < nc; ++i) {
      const scalar_t* r = x + (b * N + n0 + i) * D;
      scalar_t* o = xb + i * D;
      scalar_t part[L] = {};
      int64_t d = 0;
      for (; d + L <= D; d += L) {
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t v = r[d + l] - mean[d + l];
          o[d + l] = v;
          part[l] += v * v;
        }
      }
      for (; d < D; ++d) {
        const scalar_t v = r[d] - mean[d];
        o[d] = v;
        part[0] += v * v;
      }
      scalar_t acc = 0;
      for (int64_t l = 0; l < L; ++l) acc += part[l];
      xsq[i] = acc;
    }
  }
}

// The raw pixels of one tile: pixel i's channel d at at(i)[d * chan_step].
template <typename scalar_t>
struct RawTile {
  const scalar_t* base;
  int64_t pixel_step, chan_step;
  RawTile(const scalar_t* x, const Shape& s, bool cf, int64_t b, int64_t n0)
      : base(cf ? x + b * s.D * s.N + n0 : x + (b * s.N + n0) * s.D),
        pixel_step(cf ? 1 : s.D), chan_step(cf ? s.N : 1) {}
  const scalar_t* at(int64_t i) const { return base + i * pixel_step; }
};

// r = x_i - c_k from the raw values (free of the centring's roundings, which
// are as large as the residual itself for spread codewords); returns ||r||^2,
// summed in a fixed order.
template <typename scalar_t>
scalar_t raw_residual(const RawTile<scalar_t>& tile, int64_t i, const scalar_t* c, int64_t D,
                      scalar_t* r) {
  const scalar_t* x = tile.at(i);
  const int64_t step = tile.chan_step;
  constexpr int64_t L = 8;
  scalar_t part[L] = {};
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t v = x[(d + l) * step] - c[d + l];
      r[d + l] = v;
      part[l] += v * v;
    }
  }
  for (; d < D; ++d) {
    const scalar_t v = x[d * step] - c[d];
    r[d] = v;
    part[0] += v * v;
  }
  scalar_t acc = 0;
  for (int64_t l = 0; l < L; ++l) acc += part[l];
  return acc;
}

// Pixel i's distances dist[0, K) from its dot products x'_i.c'_k. Entries
// whose expansion is too imprecise and whose logit can matter
// (encoding_expansion_imprecise / encoding_logit_floor) are recomputed
// directly: their k goes to `direct`, their residual x_i - c_k to `resid`
// (D values each, in that order). The forward and the backward call this with
// the same values, so they see the same assignment. Clustered codewords never
// take the direct path, so there it costs K comparisons per pixel.
template <typename scalar_t>
void pixel_distances(const scalar_t* dots, scalar_t x_sq, const Codebook<scalar_t>& cb,
                     const scalar_t* scale, int64_t K, int64_t D, const RawTile<scalar_t>& tile,
                     int64_t i, scalar_t* dist, std::vector<int64_t>& direct,
                     std::vector<scalar_t>& resid) {
  direct.clear();
  bool any = false;
  for (int64_t k = 0; k < K; ++k) {
    dist[k] = encoding_sq_dist(x_sq, dots[k], cb.sq[k]);
    any |= encoding_expansion_imprecise(x_sq, cb.sq[k], dist[k]);
  }
  if (!any) return;
  scalar_t row_max = -std::numeric_limits<scalar_t>::infinity(), max_err = 0;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t logit = scale[k] * dist[k], err = encoding_logit_error(x_sq, cb.sq[k], scale[k], D);
    row_max = logit > row_max ? logit : row_max;
    max_err = err > max_err ? err : max_err;
  }
  const scalar_t floor = encoding_logit_floor(row_max, max_err);
  for (int64_t k = 0; k < K; ++k) {
    if (!encoding_expansion_imprecise(x_sq, cb.sq[k], dist[k]) || !(scale[k] * dist[k] >= floor))
      continue;
    direct.push_back(k);
    resid.resize(direct.size() * D);
    dist[k] = raw_residual(tile, i, cb.raw + k * D, D, resid.data() + (direct.size() - 1) * D);
  }
}

template <typename scalar_t>
scalar_t* buffer_ptr(at::Tensor& t) {
  return t.mutable_data_ptr<scalar_t>();
}

template <typename scalar_t>
void encoding_fwd_impl(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                       bool cf, const Shape& s, at::Tensor& out) {
  const int64_t K = s.K, D = s.D;
  const Tiling t = make_tiling(s);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* sp = scale.const_data_ptr<scalar_t>();
  const Codebook<scalar_t> cb =
      make_codebook(codewords.const_data_ptr<scalar_t>(), K, D, x.options());
  const scalar_t* cp = cb.centred;
  // ATen buffers are 64-byte aligned: MKL's summation order can depend on alignment.
  auto partial = at::empty({t.n_chunks, K, D}, x.options());
  scalar_t* pp = buffer_ptr<scalar_t>(partial);

  at::parallel_for(0, t.n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    SingleThreadedBlas blas_guard;
    auto xb_buf = at::empty({t.tile_n * D}, x.options());
    auto a_buf = at::empty({t.tile_n * K}, x.options());
    scalar_t* xb = buffer_ptr<scalar_t>(xb_buf);
    scalar_t* a = buffer_ptr<scalar_t>(a_buf);  // [nc][K], pixel-major
    std::vector<scalar_t> xsq(t.tile_n), colsum(K), dist(K), resid;
    std::vector<int64_t> direct;
    cpu::SpreadPrefetch pf_x;
    for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
      const int64_t b = chunk / t.chunks_per_image;
      const int64_t t0 = (chunk % t.chunks_per_image) * t.tiles_per_chunk;
      const int64_t t1 = std::min(t0 + t.tiles_per_chunk, t.n_tiles);
      scalar_t* P = pp + chunk * K * D;  // [K][D] = column-major [D x K], ld D
      std::fill(P, P + K * D, scalar_t(0));
      std::fill(colsum.begin(), colsum.end(), scalar_t(0));
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n0 = tile * t.tile_n, nc = std::min(t.tile_n, s.N - n0);
        const int64_t ldx = cf ? nc : D;
        load_centred_tile(xp, cb.mean.data(), s, cf, b, n0, nc, xb, xsq.data());
        const RawTile<scalar_t> raw(xp, s, cf, b, n0);
        prefetch_next_x_tile(pf_x, xp, s, cf, b, tile, t.tile_n, t.n_tiles);
        pf_x.plan(nc);
        // a^T [K x nc] = C' X'^T: pixel i's dot products x'_i.c'_k at a[i*K + k].
        blas_gemm<scalar_t>(kT, cf ? kT : kN, K, nc, D, 1, cp, D, xb, ldx, 0, a, K);
        for (int64_t i = 0; i < nc; ++i) {
          pf_x.step();
          scalar_t* row = a + i * K;
          pixel_distances(row, xsq[i], cb, sp, K, D, raw, i, dist.data(), direct, resid);
          for (int64_t k = 0; k < K; ++k) row[k] = sp[k] * dist[k];
          encoding_softmax_row(row, K);
          // Direct entries add A_ik (x_i - c_k) here and leave the GEMM and colsum.
          for (size_t j = 0; j < direct.size(); ++j) {
            const int64_t k = direct[j];
            const scalar_t* r = resid.data() + j * D;
            scalar_t* Pk = P + k * D;
            for (int64_t d = 0; d < D; ++d) Pk[d] += row[k] * r[d];
            row[k] = 0;
          }
          for (int64_t k = 0; k < K; ++k) colsum[k] += row[k];
        }
        // P^T [D x K] += X'^T A
        blas_gemm<scalar_t>(cf ? kT : kN, kT, D, K, nc, 1, xb, ldx, a, K, 1, P, D);
      }
      // E = A^T X' - colsum(A) c' (the same as with uncentred x, c), plus the direct entries.
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t ck = colsum[k];
        for (int64_t d = 0; d < D; ++d) P[k * D + d] -= ck * cp[k * D + d];
      }
    }
  });

  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, s.B * K, 1, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t b = r / K, k = r % K;
      scalar_t* o = op + r * D;
      const scalar_t* src = pp + (b * t.chunks_per_image * K + k) * D;
      std::copy(src, src + D, o);
      for (int64_t j = 1; j < t.chunks_per_image; ++j) {
        const scalar_t* q = src + j * K * D;
        for (int64_t d = 0; d < D; ++d) o[d] += q[d];
      }
    }
  });
}

at::Tensor encoding_fwd(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                        bool channels_first) {
  const Shape s = check_inputs(x, codewords, scale, channels_first, "encoding_fwd");
  auto out = at::zeros({s.B, s.K, s.D}, x.options());
  if (s.B == 0 || s.N == 0 || s.D == 0) return out;  // empty sums
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "encoding_fwd", [&] {
    encoding_fwd_impl<scalar_t>(x, codewords, scale, channels_first, s, out);
  });
  return out;
}

template <typename scalar_t>
void encoding_bwd_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& codewords,
                       const at::Tensor& scale, bool cf, const Shape& s, at::Tensor& grad_x,
                       at::Tensor& grad_c, at::Tensor& grad_s) {
  const int64_t K = s.K, D = s.D, K2 = 2 * s.K;
  const Tiling t = make_tiling(s);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* sp = scale.const_data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  const Codebook<scalar_t> cb =
      make_codebook(codewords.const_data_ptr<scalar_t>(), K, D, x.options());
  const scalar_t* cp = cb.centred;

  // Per image: S_b = [c'; dE_b] ([2K][D]) so one GEMM yields both x'.c'_k and
  // x'.dE_k, and one GEMM with M = [-W | A] yields A dE - W c'. dEc = dE_k.c'_k.
  auto stacked = at::empty({s.B, K2, D}, x.options());
  scalar_t* stp = buffer_ptr<scalar_t>(stacked);
  // grad_finite[b*K + k]: whether row dE_k of image b is finite (see below).
  std::vector<scalar_t> dec(s.B * K);
  std::vector<char> grad_finite(s.B * K);
  for (int64_t b = 0; b < s.B; ++b) {
    std::copy(cp, cp + K * D, stp + b * K2 * D);
    std::copy(gp + b * K * D, gp + (b + 1) * K * D, stp + b * K2 * D + K * D);
    for (int64_t k = 0; k < K; ++k) {
      scalar_t acc = 0, sum = 0;
      for (int64_t d = 0; d < D; ++d) {
        acc += gp[(b * K + k) * D + d] * cp[k * D + d];
        sum += gp[(b * K + k) * D + d];
      }
      dec[b * K + k] = acc;
      grad_finite[b * K + k] = encoding_finite_or_zero(sum) == sum;
    }
  }

  auto partial_c = at::empty({t.n_chunks, K, D}, x.options());
  auto partial_s = at::empty({t.n_chunks, K}, x.options());
  scalar_t* pcp = buffer_ptr<scalar_t>(partial_c);
  scalar_t* psp = buffer_ptr<scalar_t>(partial_s);

  at::parallel_for(0, t.n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    SingleThreadedBlas blas_guard;
    auto xb_buf = at::empty({t.tile_n * D}, x.options());
    auto m_buf = at::empty({t.tile_n * K2}, x.options());
    scalar_t* xb = buffer_ptr<scalar_t>(xb_buf);
    scalar_t* mrows = buffer_ptr<scalar_t>(m_buf);  // [nc][2K], pixel-major
    std::vector<scalar_t> xsq(t.tile_n), rowsum_w(t.tile_n), dist(K), col_a(K), col_w(K), resid;
    std::vector<int64_t> direct;
    std::vector<char> is_direct(K, 0);
    // W terms added after the GEMMs with the raw residual x_i - c_k: (pixel, codeword, W_ik).
    struct Term {
      int64_t i, k;
      scalar_t w;
    };
    std::vector<Term> terms;
    std::vector<scalar_t> r(D);
    cpu::SpreadPrefetch pf_x, pf_g;
    for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
      const int64_t b = chunk / t.chunks_per_image;
      const int64_t t0 = (chunk % t.chunks_per_image) * t.tiles_per_chunk;
      const int64_t t1 = std::min(t0 + t.tiles_per_chunk, t.n_tiles);
      const scalar_t* S = stp + b * K2 * D;
      const scalar_t* dE = gp + b * K * D;
      const scalar_t* dEc = dec.data() + b * K;
      const char* dE_finite = grad_finite.data() + b * K;
      scalar_t* Pc = pcp + chunk * K * D;  // [K][D] = column-major [D x K], ld D
      scalar_t* Ps = psp + chunk * K;
      std::fill(Pc, Pc + K * D, scalar_t(0));
      std::fill(Ps, Ps + K, scalar_t(0));
      std::fill(col_a.begin(), col_a.end(), scalar_t(0));
      std::fill(col_w.begin(), col_w.end(), scalar_t(0));
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n0 = tile * t.tile_n, nc = std::min(t.tile_n, s.N - n0);
        const int64_t ldx = cf ? nc : D;
        load_centred_tile(xp, cb.mean.data(), s, cf, b, n0, nc, xb, xsq.data());
        const RawTile<scalar_t> raw(xp, s, cf, b, n0);
        prefetch_next_x_tile(pf_x, xp, s, cf, b, tile, t.tile_n, t.n_tiles);
        if (cf) {
          const int64_t row_bytes = nc * sizeof(scalar_t), stride = s.N * sizeof(scalar_t);
          pf_g.clear();
          pf_g.add_rows(gxp + b * D * s.N + n0, D, row_bytes, stride, true);
        }
        pf_x.plan(nc);
        pf_g.plan(nc);
        // Term by term, with the raw residual x_i - c_k: the direct entries
        // of spread codewords (see pixel_distances), and non-finite values:
        // the expanded forms x'.v - c'_k.v and rowsum(W) x' - W c' give
        // inf - inf = NaN where the reference's sums of terms v_d (x_d - c_kd)
        // are +-inf, so rows dE_k and W_i that are not finite (an infinite
        // upstream gradient) take this path too; finite ones never do.
        const auto residual_dot = [&](const scalar_t* v, int64_t i, int64_t k) {
          raw_residual(raw, i, cb.raw + k * D, D, r.data());
          scalar_t acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += v[d] * r[d];
          return acc;
        };
        terms.clear();
        // rows [2K x nc] = S X'^T: pixel i has x'_i.c'_k at [i*2K + k] and x'_i.dE_k
        // at [i*2K + K + k].
        blas_gemm<scalar_t>(kT, cf ? kT : kN, K2, nc, D, 1, S, D, xb, ldx, 0, mrows, K2);
        for (int64_t i = 0; i < nc; ++i) {
          pf_x.step();
          pf_g.step();
          scalar_t* row = mrows + i * K2;  // [0, K): logits -> A -> -W; [K, 2K): x'.dE -> A
          pixel_distances(row, xsq[i], cb, sp, K, D, raw, i, dist.data(), direct, resid);
          for (int64_t k = 0; k < K; ++k) row[k] = sp[k] * dist[k];
          encoding_softmax_row(row, K);
          // dA_ik = x'.dE_k - dE_k.c'_k (dE_k . (x_i - c_k) for direct entries), shifted
          // by its value at the winning (largest-A, first) codeword: see encoding_softmax_grad.
          for (int64_t k = 0; k < K; ++k) {
            row[K + k] = dE_finite[k] ? row[K + k] - dEc[k] : residual_dot(dE + k * D, i, k);
          }
          for (size_t j = 0; j < direct.size(); ++j) {
            const int64_t k = direct[j];
            const scalar_t* rk = resid.data() + j * D;
            const scalar_t* v = dE + k * D;
            scalar_t acc = 0;
            for (int64_t d = 0; d < D; ++d) acc += v[d] * rk[d];
            row[K + k] = acc;
            is_direct[k] = 1;
          }
          int64_t win = 0;
          for (int64_t k = 1; k < K; ++k) win = row[k] > row[win] ? k : win;
          const scalar_t da_win = encoding_finite_or_zero(row[K + win]);
          scalar_t a_dot_da = 0;
          for (int64_t k = 0; k < K; ++k) {
            row[K + k] -= da_win;
            a_dot_da += row[k] * row[K + k];
          }
          scalar_t rw = 0;
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t ak = row[k];
            const scalar_t dl = encoding_softmax_grad(ak, row[K + k], a_dot_da);
            const scalar_t w = scalar_t(2) * sp[k] * dl;
            Ps[k] += dl * dist[k];
            col_a[k] += ak;
            row[K + k] = ak;
            if (is_direct[k]) {
              terms.push_back({i, k, w});
              row[k] = 0;
            } else {
              rw += w;
              row[k] = -w;
            }
          }
          if (encoding_finite_or_zero(rw) == rw) {
            for (int64_t k = 0; k < K; ++k) col_w[k] -= row[k];
            rowsum_w[i] = rw;
          } else {  // the W terms are added after the GEMMs, term by term
            for (int64_t k = 0; k < K; ++k) {
              if (!is_direct[k]) terms.push_back({i, k, -row[k]});
              row[k] = 0;
            }
            rowsum_w[i] = 0;
          }
          for (const int64_t k : direct) is_direct[k] = 0;
        }
        // grad_x tile = rowsum(W) x' + [-W | A] [c'; dE] (beta = 1 onto the first term).
        if (cf) {
          scalar_t* g = gxp + b * D * s.N + n0;  // column-major [nc x D], ld N
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t* xr = xb + d * nc;
            scalar_t* gr = g + d * s.N;
            for (int64_t i = 0; i < nc; ++i) gr[i] = rowsum_w[i] * xr[i];
          }
          blas_gemm<scalar_t>(kT, kT, nc, D, K2, 1, mrows, K2, S, D, 1, g, s.N);
        } else {
          scalar_t* g = gxp + (b * s.N + n0) * D;  // column-major [D x nc], ld D
          for (int64_t i = 0; i < nc; ++i) {
            const scalar_t r = rowsum_w[i];
            const scalar_t* xr = xb + i * D;
            scalar_t* gr = g + i * D;
            for (int64_t d = 0; d < D; ++d) gr[d] = r * xr[d];
          }
          blas_gemm<scalar_t>(kN, kN, D, nc, K2, 1, S, D, mrows, K2, 1, g, D);
        }
        // Pc^T [D x K] += X'^T (-W)
        blas_gemm<scalar_t>(cf ? kT : kN, kT, D, K, nc, 1, xb, ldx, mrows, K2, 1, Pc, D);
        for (const Term& term : terms) {
          scalar_t* g = cf ? gxp + b * D * s.N + n0 + term.i : gxp + (b * s.N + n0 + term.i) * D;
          const int64_t g_step = cf ? s.N : 1;
          raw_residual(raw, term.i, cb.raw + term.k * D, D, r.data());
          scalar_t* Pk = Pc + term.k * D;
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t v = term.w * r[d];
            g[d * g_step] += v;
            Pk[d] -= v;
          }
        }
      }
      // grad_c_k = -colsum(A)_k dE_k - (W^T X')_k + colsum(W)_k c'_k, this chunk's share.
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t ca = col_a[k], cw = col_w[k];
        for (int64_t d = 0; d < D; ++d) Pc[k * D + d] += cw * cp[k * D + d] - ca * dE[k * D + d];
      }
    }
  });

  scalar_t* gcp = grad_c.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, K, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      scalar_t* o = gcp + k * D;
      std::copy(pcp + k * D, pcp + (k + 1) * D, o);
      for (int64_t j = 1; j < t.n_chunks; ++j) {
        const scalar_t* q = pcp + (j * K + k) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += q[d];
      }
    }
  });
  scalar_t* gsp = grad_s.mutable_data_ptr<scalar_t>();
  for (int64_t k = 0; k < K; ++k) {
    scalar_t acc = 0;
    for (int64_t j = 0; j < t.n_chunks; ++j) acc += psp[j * K + k];
    gsp[k] = acc;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoding_bwd(const at::Tensor& grad,
                                                            const at::Tensor& x,
                                                            const at::Tensor& codewords,
                                                            const at::Tensor& scale,
                                                            bool channels_first) {
  const Shape s = check_inputs(x, codewords, scale, channels_first, "encoding_bwd");
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == x.scalar_type(),
              "encoding_bwd (cpu): expected grad on the CPU with x's dtype ", x.scalar_type(),
              ", got ", grad.scalar_type(), " on ", grad.device());
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == s.B && grad.size(1) == s.K &&
                  grad.size(2) == s.D && grad.is_contiguous(),
              "encoding_bwd: expected a contiguous grad of shape [B=", s.B, ", K=", s.K, ", D=",
              s.D, "], got ", grad.sizes());
  auto grad_x = cpu::empty_output_like(x);  // contiguous, whatever x's layout
  auto grad_c = at::zeros_like(codewords, at::MemoryFormat::Contiguous);
  auto grad_s = at::zeros_like(scale, at::MemoryFormat::Contiguous);
  if (s.B == 0 || s.N == 0 || s.D == 0) {
    grad_x.zero_();
    return {grad_x, grad_c, grad_s};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "encoding_bwd", [&] {
    encoding_bwd_impl<scalar_t>(grad, x, codewords, scale, channels_first, s, grad_x, grad_c,
                                grad_s);
  });
  return {grad_x, grad_c, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("encoding_fwd", &encoding_fwd);
  m.impl("encoding_bwd", &encoding_bwd);
}

}  // namespace fastctx
