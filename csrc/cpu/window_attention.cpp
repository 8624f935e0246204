// CPU backend of window_attention (contract: docs/kernels.md, "window_attention";
// maths: fastctx/ops/window_attention.py).
//
// Work unit: one head of one window. A window's tokens are found by index
// arithmetic (common/window_attention.h: padding, cyclic shift, region
// labels); per head, q, k and v are gathered straight from the [B, H, W, 3C]
// token rows into small dense per-thread buffers (q pre-scaled, k transposed),
// and the output is scattered back to the token rows. No padded, rolled or
// partitioned copy of the map, no mask tensor and no [windows, heads, N, N]
// attention exist: the window's scores are one [queries x keys] buffer that
// stays in L1/L2.
//
// Forward, per window and head, for each block of at most kMaxQueryBlock queries:
//   S = (Qs K^T + bias) + mask   Qs = scale q; mask = -100 across shift regions,
//                                -inf on padded keys when pad_qkv is absent
//   online softmax over blocks of at most kMaxKeyBlock keys (one block for
//   every window up to 16x16 tokens): m, l and O = sum exp(S - m) V rescaled
//   as the maximum grows; out = O / l.
// Backward (nothing saved, flash style), per window and head:
//   one key block:  P = softmax(S), dP = dO V^T, D = rowsum(P dP), dS = P (dP - D)
//   several blocks: a first pass recomputes m, l and O (D = dO . O), a second
//                   recomputes P = exp(S - lse) and dP per key block
//   dQ = scale dS K, dK += dS^T Qs, dV += P^T dO (window accumulators across
//   query blocks), written to grad_qkv's token rows.
// The products are register-blocked tile_gemm calls (cpu/class_tiles.h): at
// these sizes (k = d or the window's tokens, 16..256) BLAS would repack both
// operands on every call and MKL runs only its AVX2 code on this CPU family.
//
// The relative position bias is laid out per head as a strip of Ww x (2Wh-1)
// x Ww values in which query t's N biases are N consecutive values (see
// BiasStrips): the scores add it row by row as vectors, and the backward sums
// dS into the same layout, then folds it into the table's rows by diagonals.
//
// grad_table and grad_pad are sums over windows. The backward cuts the windows
// into runs (cpu/parallel.h plan_chunks: shapes only, never the thread count);
// each (run, head) owns a partial of the table column and of pad_qkv's head
// slice; partials are summed in run order, so every result is bit-identical
// for any thread count. A chunk is a run with a group of heads (all of them
// unless windows are few, see BackwardPlan), heads innermost so a window's
// rows are read whole once. Per (run, head), dS of all its windows is first
// summed into a bias strip (vector adds) and folded into the table's rows once.
//
// Swin's masked pairs make subnormal weights, and x86 arithmetic on them takes
// microcode assists; query blocks whose inputs bound every factor such a weight
// meets run with subnormals flushed (kTameBound, cpu::FlushSubnormals).
//
// Outputs past the caches (cpu/output.h) are written with non-temporal stores:
// each line is written whole and never read back here, so its read for
// ownership is saved.
//
// Non-finite values propagate as in the eager maths: the softmax maxima ignore
// NaN but a NaN reaches every sum it is part of; a padded query row (whose
// output is cropped) still passes a NaN of its window to dK, dV, the table and
// pad_qkv through dS = P * 0, as autograd does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/class_context.h"
#include "common/window_attention.h"
#include "cpu/class_tiles.h"
#include "cpu/output.h"
#include "cpu/parallel.h"
#include "cpu/prefetch.h"

namespace fastctx {
namespace {

using cpu::Simd;
using cpu::tile_gemm;

// Block sizes: the [queries x keys] score and dP buffers (128 x 256 fp32 =
// 128 KiB each) stay in L2. Windows of up to 256 tokens are one key block.
constexpr int64_t kMaxQueryBlock = 128;
constexpr int64_t kMaxKeyBlock = 256;
// The bias is laid out as strips (BiasStrips) when they hold at most this many
// elements (1 MiB in fp32; 16x16 windows with 32 heads: 254K); larger windows
// look each logit's bias up in the table.
constexpr int64_t kMaxStripElements = int64_t(1) << 18;

// mmseg's value for pairs of tokens from different shift regions.
constexpr double kRegionMask = -100.0;

// The next window's token rows are prefetched (cpu::SpreadPrefetch) from
// points spread over the units (heads) of the window before it: three between
// a unit's products, and one every kPrefetchRowsPerPoint rows of its gathers
// and stores (a point per row cost Swin-T stage 4, whose rows are in cache,
// 7% of its forward in bookkeeping).
constexpr int64_t kPrefetchPointsBetweenProducts = 3;
constexpr int64_t kPrefetchRowsPerPoint = 4;

// Whether row r of a gather or store is a prefetch point.
bool prefetch_point(int64_t r) { return r % kPrefetchRowsPerPoint == 0; }

// The prefetch points of a unit of N tokens whose gathers and stores are
// `row_loops` loops over them (one key and one query block).
int64_t prefetch_points(int64_t N, int64_t row_loops) {
  return kPrefetchPointsBetweenProducts +
         row_loops * ((N + kPrefetchRowsPerPoint - 1) / kPrefetchRowsPerPoint);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The size of `ceil(n / max)` equal blocks covering n items.
int64_t block_size(int64_t n, int64_t max) {
  const int64_t blocks = (n + max - 1) / max;
  return (n + blocks - 1) / blocks;
}

// ---------------------------------------------------------------------------
// Element-wise row kernels: plain loops that GCC vectorises, inlined into
// FASTCTX_SIMD_CLONES entry points (cpu/parallel.h).
#pragma GCC diagnostic ignored "-Wpsabi"  // see Simd

// s[r, c] += strip[offset[r] + c]
template <typename T>
__attribute__((always_inline)) inline void add_strip_rows_body(T* s, int64_t lds, const T* strip,
                                                               const int64_t* offset, int64_t rows,
                                                               int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * lds;
    const T* br = strip + offset[r];
    for (int64_t c = 0; c < n; ++c) sr[c] += br[c];
  }
}

// strip[offset[r] + c] += d[r, c], rows in order (the runs of rows offset by
// a multiple of Ww overlap: each adds onto the sums of the rows before it).
template <typename T>
__attribute__((always_inline)) inline void accumulate_strip_rows_body(T* strip,
                                                                      const int64_t* offset,
                                                                      const T* d, int64_t ldd,
                                                                      int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* ar = strip + offset[r];
    const T* dr = d + r * ldd;
    for (int64_t c = 0; c < n; ++c) ar[c] += dr[c];
  }
}

// s[r, c] += (label_q[r] != label_k[c] ? -100 : 0) + key_mask[c]: the reference's
// shift mask plus its padded-key mask, added as one value after the bias.
template <typename T>
__attribute__((always_inline)) inline void add_mask_body(T* s, int64_t lds, const int* label_q,
                                                         const int* label_k, const T* key_mask,
                                                         int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * lds;
    const int lq = label_q[r];
    for (int64_t c = 0; c < n; ++c) {
      sr[c] += (label_k[c] != lq ? static_cast<T>(kRegionMask) : T(0)) + key_mask[c];
    }
  }
}

// s[r, c] *= f[r]
template <typename T>
__attribute__((always_inline)) inline void scale_rows_body(T* s, int64_t lds, const T* f,
                                                           int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * lds;
    const T fr = f[r];
    for (int64_t c = 0; c < n; ++c) sr[c] *= fr;
  }
}

// Softmax backward along rows: D[r] = sum_c p[r, c] dp[r, c] (per-lane partial
// sums, a fixed order), then dp[r, c] <- p[r, c] (dp[r, c] - D[r]) in place.
template <typename T>
__attribute__((always_inline)) inline void softmax_grad_body(T* dp, int64_t lddp, const T* p,
                                                             int64_t ldp, int64_t rows, int64_t n,
                                                             T* D) {
  using S = Simd<T>;
  using vec = typename S::vec;
  const int64_t n_vec = n - n % S::kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    T* dr = dp + r * lddp;
    const T* pr = p + r * ldp;
    vec acc = {};
    for (int64_t c = 0; c < n_vec; c += S::kLanes) acc += S::load(pr + c) * S::load(dr + c);
    T dot = 0;
    for (int j = 0; j < S::kLanes; ++j) dot += acc[j];
    for (int64_t c = n_vec; c < n; ++c) dot += pr[c] * dr[c];
    D[r] = dot;
    for (int64_t c = 0; c < n; ++c) dr[c] = pr[c] * (dr[c] - dot);
  }
}

// Subnormal numbers and when they may be flushed to zero (FTZ + DAZ,
// cpu::FlushSubnormals). They arise as softmax weights: a -100 masked pair's
// fp32 weight is ~1e-44, and the weights multiply v, dO and dP - D. Flushed, a
// weight w becomes 0, which differs from eager where w times an infinite
// factor is +-inf but 0 * inf is NaN. If the q (scaled), k and v a query block
// is computed from and its dO are all within +-2^40, every such factor is
// finite (|dP|, |D| <= d 2^80), so the flush only drops terms below 2^-126
// times a finite factor: such blocks run flushed, the others in the thread's
// own mode. The check runs on the gathered q, k, v and dO buffers, so windows
// of more than one key block (over 256 tokens; their K and V are gathered a
// block at a time) keep the thread's mode.
//
// The gathers check the values as they copy them (gather_token_rows).
constexpr double kTameBound = 1099511627776.0;  // 2^40

// The rows of a gather (gather_token_rows): dst[r, j] = mult * src_r[j] for
// j < d, rows ld apart, where src_r = base + rows[r] * stride, or `fill` (d
// values; zeros when null) for rows[r] < 0 (a padded token). `ahead` steps at
// the rows that are prefetch points. Returns whether every value written is
// within +-kTameBound (false for NaN and inf). mult = 1 copies the bits (no
// multiply, which DAZ would flush).
template <typename T>
__attribute__((always_inline)) inline bool gather_rows_body(T* dst, int64_t ld, const T* base,
                                                            int64_t stride, const int64_t* rows,
                                                            const T* fill, int64_t n, int64_t d,
                                                            T mult, cpu::SpreadPrefetch& ahead) {
  using S = Simd<T>;
  using vec = typename S::vec;
  const int64_t d_vec = d - d % S::kLanes;
  const bool scaled = mult != T(1);
  const vec bound = vec{} + static_cast<T>(kTameBound), m = vec{} + mult;
  decltype(bound <= bound) wild = {};
  bool wild_tail = false;
  for (int64_t r = 0; r < n; ++r) {
    if (prefetch_point(r)) ahead.step();
    const T* src = rows[r] >= 0 ? base + rows[r] * stride : fill;
    T* out = dst + r * ld;
    if (src == nullptr) {
      std::fill(out, out + d, T(0));
      continue;
    }
    for (int64_t j = 0; j < d_vec; j += S::kLanes) {
      vec v = S::load(src + j);
      if (scaled) v = v * m;
      S::store(out + j, v);
      wild |= ~((v <= bound) & (-v <= bound));
    }
    for (int64_t j = d_vec; j < d; ++j) {
      const T v = scaled ? mult * src[j] : src[j];
      out[j] = v;
      wild_tail |= !(std::fabs(v) <= static_cast<T>(kTameBound));
    }
  }
  for (int j = 0; j < S::kLanes; ++j) wild_tail |= wild[j] != 0;
  return !wild_tail;
}

// out[r, c] = sum_j a[r, j] b[c, j] (j < d): products with a few keys, each a
// dot product of rows, lanes summed as a tree (see products_with_keys).
template <typename T>
__attribute__((always_inline)) inline void row_dots_body(T* out, int64_t ldo, const T* a,
                                                         int64_t lda, const T* b, int64_t ldb,
                                                         int64_t rows, int64_t cols, int64_t d) {
  using S = Simd<T>;
  using W = cpu::softmax_detail::V<T>;
  static_assert(W::kL == S::kLanes, "row_dots: one vector type");
  const int64_t d_vec = d - d % S::kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * lda;
    for (int64_t c = 0; c < cols; ++c) {
      const T* bc = b + c * ldb;
      typename S::vec acc = {};
      for (int64_t j = 0; j < d_vec; j += S::kLanes) acc += S::load(ar + j) * S::load(bc + j);
      T dot = W::sum(acc);
      for (int64_t j = d_vec; j < d; ++j) dot += ar[j] * bc[j];
      out[r * ldo + c] = dot;
    }
  }
}

// The exponentials of a block's last few score columns (the keys past its
// whole vectors, computed as dot products: see kMaxDotKeys), down the
// columns, so that a vector holds one column of L rows instead of one row's
// column or two and 14 or 15 padded lanes; lane by lane the arithmetic of
// exp_rows (cpu/class_tiles.h): s[r, c] = exp(s[r, c] - shift[r]) for
// c < cols; rowsum[r] += s[r, c] in column order when given.
template <typename T>
__attribute__((always_inline)) inline void exp_short_columns_body(T* s, int64_t lds, int64_t rows,
                                                                  int64_t cols, const T* shift,
                                                                  T* rowsum) {
  using W = cpu::softmax_detail::V<T>;
  constexpr int64_t L = W::kL;
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r0 = 0; r0 < rows; r0 += L) {
      const int64_t cnt = std::min<int64_t>(L, rows - r0);
      typename W::vt e = {};
      for (int64_t i = 0; i < cnt; ++i) e[i] = s[(r0 + i) * lds + c];
      e -= W::load(shift + r0, cnt);
      cpu::softmax_detail::exp_inplace<T>(e);
      for (int64_t i = 0; i < cnt; ++i) s[(r0 + i) * lds + c] = e[i];
      if (rowsum != nullptr) W::store(rowsum + r0, W::load(rowsum + r0, cnt) + e, cnt);
    }
  }
}

// The rows of a store (scatter_token_rows): base[rows[r] * stride + j] =
// f_r * src[r, j] for j < d, src's rows ld apart, f_r = row_scale[r] (when
// given) or scale; rows[r] < 0 (a padded token) is skipped. Non-temporal when
// `stream` and the slice allows it (cpu::stream_scaled: 16-byte aligned); else
// f_r = 1 copies the bits. `ahead`, when given, steps at the prefetch points.
template <typename T>
__attribute__((always_inline)) inline void scatter_rows_body(T* base, int64_t stride,
                                                             const int64_t* rows, const T* src,
                                                             int64_t ld, int64_t n, int64_t d,
                                                             const T* row_scale, T scale,
                                                             bool stream,
                                                             cpu::SpreadPrefetch* ahead) {
  using S = Simd<T>;
  using vec = typename S::vec;
  const int64_t d_vec = d - d % S::kLanes;
  for (int64_t r = 0; r < n; ++r) {
    if (ahead != nullptr && prefetch_point(r)) ahead->step();
    if (rows[r] < 0) continue;
    T* out = base + rows[r] * stride;
    const T* in = src + r * ld;
    const T f = row_scale != nullptr ? row_scale[r] : scale;
    if (stream && cpu::stream_scaled(out, in, d, f)) continue;
    if (f == T(1)) {
      for (int64_t j = 0; j < d_vec; j += S::kLanes) S::store(out + j, S::load(in + j));
      for (int64_t j = d_vec; j < d; ++j) out[j] = in[j];
    } else {
      const vec fv = vec{} + f;
      for (int64_t j = 0; j < d_vec; j += S::kLanes) S::store(out + j, S::load(in + j) * fv);
      for (int64_t j = d_vec; j < d; ++j) out[j] = f * in[j];
    }
  }
}

#define FASTCTX_WINDOW_ROW_KERNELS(T)                                                             \
  FASTCTX_SIMD_CLONES bool gather_token_rows(T* dst, int64_t ld, const T* base, int64_t stride,  \
                                             const int64_t* rows, const T* fill, int64_t n,      \
                                             int64_t d, T mult, cpu::SpreadPrefetch& ahead) {    \
    return gather_rows_body(dst, ld, base, stride, rows, fill, n, d, mult, ahead);               \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void scatter_token_rows(T* base, int64_t stride, const int64_t* rows,      \
                                              const T* src, int64_t ld, int64_t n, int64_t d,    \
                                              const T* row_scale, T scale, bool stream,          \
                                              cpu::SpreadPrefetch* ahead) {                      \
    scatter_rows_body(base, stride, rows, src, ld, n, d, row_scale, scale, stream, ahead);       \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void row_dots(T* out, int64_t ldo, const T* a, int64_t lda, const T* b,    \
                                    int64_t ldb, int64_t rows, int64_t cols, int64_t d) {        \
    row_dots_body(out, ldo, a, lda, b, ldb, rows, cols, d);                                      \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void exp_short_columns(T* s, int64_t lds, int64_t rows, int64_t cols,      \
                                             const T* shift, T* rowsum) {                        \
    exp_short_columns_body(s, lds, rows, cols, shift, rowsum);                                   \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void add_strip_rows(T* s, int64_t lds, const T* strip,                    \
                                          const int64_t* offset, int64_t rows, int64_t n) {      \
    add_strip_rows_body(s, lds, strip, offset, rows, n);                                         \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void accumulate_strip_rows(T* strip, const int64_t* offset, const T* d,    \
                                                 int64_t ldd, int64_t rows, int64_t n) {         \
    accumulate_strip_rows_body(strip, offset, d, ldd, rows, n);                                  \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void add_mask(T* s, int64_t lds, const int* label_q, const int* label_k,   \
                                    const T* key_mask, int64_t rows, int64_t n) {                \
    add_mask_body(s, lds, label_q, label_k, key_mask, rows, n);                                  \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void scale_rows(T* s, int64_t lds, const T* f, int64_t rows, int64_t n) {  \
    scale_rows_body(s, lds, f, rows, n);                                                         \
  }                                                                                              \
  FASTCTX_SIMD_CLONES void softmax_grad(T* dp, int64_t lddp, const T* p, int64_t ldp,            \
                                        int64_t rows, int64_t n, T* D) {                         \
    softmax_grad_body(dp, lddp, p, ldp, rows, n, D);                                             \
  }
FASTCTX_WINDOW_ROW_KERNELS(float)
FASTCTX_WINDOW_ROW_KERNELS(double)
#undef FASTCTX_WINDOW_ROW_KERNELS

// ---------------------------------------------------------------------------
// The relative position bias as strips.
//
// Query t = (qy, qx) and key u = (ky, kx) of a window use table row
// (qy - ky + Wh - 1)(2Ww - 1) + (qx - kx + Ww - 1). A head's strip holds, per
// query column qx, a (2Wh - 1) x Ww block whose value (e, kx) is the entry of
// key (ky, kx) with ky = qy + e - (Wh - 1): the same for every qy. Query t's N
// biases, keys in order, are then the strip's N consecutive values from
// offset(t) = (qx (2Wh - 1) + Wh - 1 - qy) Ww, so they are added to a score row
// as one vector run, and a head's bias costs Ww^2 (2Wh - 1) values (637 for 7x7
// windows) to lay out, not the N^2 (2401) of an expanded [N, N] matrix: at Swin-T
// stage 4 (two windows, 24 heads) building the expanded matrices was a tenth of
// the forward. The backward sums dS into the same layout (rows in order; the runs
// of queries of one column overlap) and folds each head's strip into its table
// column by diagonals once per run of windows, where scattering an [N, N] sum
// to table rows one scalar at a time was a tenth of the backward.
struct BiasStrips {
  int64_t Wh = 0, Ww = 0, size = 0;  // size: values per head
  BiasStrips() = default;
  BiasStrips(int64_t wh, int64_t ww) : Wh(wh), Ww(ww), size(ww * (2 * wh - 1) * ww) {}
  int64_t offset(int64_t t) const { return ((t % Ww) * (2 * Wh - 1) + Wh - 1 - t / Ww) * Ww; }
  // The table row of the strip values (qx, e, kx) with qx - kx = dx.
  int64_t entry(int64_t e, int64_t dx) const { return (2 * Wh - 2 - e) * (2 * Ww - 1) + dx + Ww - 1; }
  // column[entry] += the strip's values of that entry (all of them lie on one
  // diagonal qx - kx of one row e of the blocks), each entry summed in qx order.
  template <typename T>
  void fold(const T* strip, T* column) const {
    for (int64_t e = 0; e < 2 * Wh - 1; ++e) {
      for (int64_t dx = 1 - Ww; dx < Ww; ++dx) {  // dx = qx - kx
        T sum = 0;
        for (int64_t qx = std::max<int64_t>(0, dx); qx < std::min(Ww, Ww + dx); ++qx) {
          sum += strip[(qx * (2 * Wh - 1) + e) * Ww + qx - dx];
        }
        column[entry(e, dx)] += sum;
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Problem description and the per-window token table

template <typename T>
struct Problem {
  const T* qkv;        // [B*H*W, 3C]
  const T* pad;        // [3C] or nullptr (padded keys excluded)
  const T* strips;     // [heads, strip_layout.size]: the bias as BiasStrips, or nullptr
  const T* table_col;  // [heads, entries]: the table's columns (large windows), or nullptr
  const int64_t* strip_offset;  // [N]: query t's offset in its head's strip, with strips
  WindowGeometry g;
  BiasStrips strip_layout;  // with strips
  int64_t heads, d, C, N, windows, entries;
  T scale;
  // Blocking: query and key block sizes, the score buffers' row stride.
  int64_t bq, bk, ldk;
  bool one_key_block() const { return bk == N; }
};

// Where a window's tokens live, and what its scores need added besides the bias.
template <typename T>
struct WindowTokens {
  std::vector<int64_t> row;  // token row in qkv / out, -1 for a padded token
  std::vector<int> label;    // shift region label
  std::vector<T> key_mask;   // -inf for a padded key without pad_qkv, else 0
  bool masked = false;       // some label differs, or some key is excluded

  explicit WindowTokens(int64_t N) : row(N), label(N), key_mask(N) {}

  void build(const Problem<T>& p, int64_t window) {
    masked = false;
    for (int64_t t = 0; t < p.N; ++t) {
      const WindowToken token = window_token(p.g, window, t);
      row[t] = token.row;
      label[t] = token.label;
      key_mask[t] = token.row < 0 && p.pad == nullptr ? -std::numeric_limits<T>::infinity() : T(0);
      masked = masked || label[t] != label[0] || key_mask[t] != T(0);
    }
  }
};

// The token tables of the window being computed (`now`) and of one built
// ahead (`ahead`) so that its rows can be prefetched while `now` is computed.
template <typename T>
struct WindowCursor {
  WindowTokens<T> now, ahead;
  int64_t now_window = -1, ahead_window = -1;
  explicit WindowCursor(int64_t N) : now(N), ahead(N) {}

  // Makes `now` window w's (taking `ahead` if it was built for w); whether it changed.
  bool move_to(const Problem<T>& p, int64_t w) {
    if (w == now_window) return false;
    if (w == ahead_window) {
      std::swap(now, ahead);
      ahead_window = now_window;
    } else {
      now.build(p, w);
    }
    now_window = w;
    return true;
  }
  // Window w's tokens, for a prefetch: `now`, or `ahead` built for w.
  const WindowTokens<T>& peek(const Problem<T>& p, int64_t w) {
    if (w == now_window) return now;
    if (w != ahead_window) {
      ahead.build(p, w);
      ahead_window = w;
    }
    return ahead;
  }
};

// Adds to `pf` (cpu::SpreadPrefetch, or cpu::PrefetchNow to fetch them at
// once) the lines heads [h0, h0 + nh) of a window read and write: their
// q, k and v of the window's tokens (whole qkv rows when nh is every head); of
// `grad` (read) and `out` (written) their slices ([rows, C] tensors) and of
// `grad_qkv` (written) their q, k and v slices, when given.
template <typename T, typename Prefetch>
void add_heads(Prefetch& pf, const Problem<T>& p, const WindowTokens<T>& win,
               int64_t h0, int64_t nh, const T* grad, const T* out, const T* grad_qkv) {
  const int64_t offset = h0 * p.d, count = nh * p.d, row_size = 3 * p.C;
  constexpr int64_t kSize = sizeof(T);
  for (const int64_t row : win.row) {
    if (row < 0) continue;
    if (nh == p.heads) {
      pf.add(p.qkv + row * row_size, row_size * kSize, false);
    } else {
      for (int part = 0; part < 3; ++part) {
        pf.add(p.qkv + row * row_size + part * p.C + offset, count * kSize, false);
      }
    }
    if (grad != nullptr) pf.add(grad + row * p.C + offset, count * kSize, false);
    if (out != nullptr) pf.add(out + row * p.C + offset, count * kSize, true);
    if (grad_qkv != nullptr) {
      for (int part = 0; part < 3; ++part) {
        pf.add(grad_qkv + row * row_size + part * p.C + offset, count * kSize, true);
      }
    }
  }
}

// dst[r, j] = mult * part's channel j of token t0 + r (pad_qkv's, or zeros,
// for a padded token), rows ld apart; whether all are tame (see kTameBound).
template <typename T>
bool gather_rows(T* dst, int64_t ld, const Problem<T>& p, const WindowTokens<T>& win, int part,
                 int64_t h, int64_t t0, int64_t n, T mult, cpu::SpreadPrefetch& ahead) {
  const int64_t offset = part * p.C + h * p.d;
  return gather_token_rows(dst, ld, p.qkv + offset, 3 * p.C, win.row.data() + t0,
                           p.pad != nullptr ? p.pad + offset : nullptr, n, p.d, mult, ahead);
}

// dst[j, c] = part's channel j of token t0 + c (transposed: tokens along rows),
// through rows [n x d]: the token rows are copied whole (independent loads the
// core overlaps), then transposed inside L1; whether all are tame.
template <typename T>
bool gather_cols(T* dst, int64_t ld, const Problem<T>& p, const WindowTokens<T>& win, int part,
                 int64_t h, int64_t t0, int64_t n, T* rows, cpu::SpreadPrefetch& ahead) {
  const bool tame = gather_rows(rows, p.d, p, win, part, h, t0, n, T(1), ahead);
  cpu::transpose_rows(dst, ld, rows, p.d, n, p.d);
  return tame;
}

// Keys past a block's whole vectors (of the widest ISA: 16 fp32) are computed
// as dot products of rows, and go through the softmax down the columns, when
// at most this many: a padded vector's 16 lanes would compute mostly padding,
// in the products and in every softmax pass (7x7 windows: 49 keys, 48 in
// vectors and 1 by dots; Swin-T stage 1, AVX-512 EPYC: the scores' product
// took 27% of a forward unit, and the softmax down the columns made the
// forward 2.7% faster).
constexpr int64_t kMaxDotKeys = 2;

// How a key block's nk score columns are computed: `vectors` columns as whole
// vectors by rows, then `dots` (<= kMaxDotKeys) columns by dot products and
// down the columns. Without dots, `vectors` is nk rounded up to whole vectors
// within the buffers' row stride, and the columns past nk are set to -inf
// (scores), so the softmax passes give them weight exactly 0; products over
// keys still stop at nk.
struct KeyColumns {
  int64_t vectors, dots;
};

template <typename T>
KeyColumns key_columns(const Problem<T>& p, int64_t nk) {
  const int64_t tail = nk % 16;
  if (tail > 0 && tail <= kMaxDotKeys) return {nk - tail, tail};
  return {std::min(round_up(nk, 16), p.ldk), 0};
}

// out [nq x nk] = a [nq x d] b^T for the block's nk keys, b their rows [nk x d]
// and bt their transpose [d x ldk] (see KeyColumns; padded columns hold
// whatever bt holds there).
template <typename T>
void products_with_keys(const Problem<T>& p, const T* a, const T* bt, const T* b, int64_t nq,
                        int64_t nk, T* out) {
  const KeyColumns cols = key_columns(p, nk);
  tile_gemm<T>(nq, p.d, cols.vectors, a, p.d, 1, bt, p.ldk, out, p.ldk, false);
  if (cols.dots > 0) {
    row_dots(out + cols.vectors, p.ldk, a, p.d, b + cols.vectors * p.d, p.d, nq, cols.dots, p.d);
  }
}

// m[r] = max(m[r], s[r, c]) over the block's nk columns, ignoring NaN (as
// row_max: a NaN never compares greater); the dot columns one scalar a row.
template <typename T>
void block_row_max(const Problem<T>& p, const T* s, int64_t nq, int64_t nk, T* m) {
  const KeyColumns cols = key_columns(p, nk);
  cpu::row_max(s, p.ldk, nq, cols.vectors, T(1), m);
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t c = cols.vectors; c < cols.vectors + cols.dots; ++c) {
      if (s[r * p.ldk + c] > m[r]) m[r] = s[r * p.ldk + c];
    }
  }
}

// s[r, c] = exp(s[r, c] - shift[r]) over the block's nk columns (and its
// padded ones, to 0); rowsum[r] += their sum when given.
template <typename T>
void block_exp(const Problem<T>& p, T* s, int64_t nq, int64_t nk, const T* shift, T* rowsum) {
  const KeyColumns cols = key_columns(p, nk);
  cpu::exp_rows(s, p.ldk, s, p.ldk, nq, cols.vectors, T(1), shift, rowsum);
  if (cols.dots > 0) exp_short_columns(s + cols.vectors, p.ldk, nq, cols.dots, shift, rowsum);
}

// S [nq x nk] = (Qs K^T + bias) + mask for queries q0.. and keys k0.. of head h,
// from K's rows k and their transpose kt.
template <typename T>
void scores(const Problem<T>& p, const WindowTokens<T>& win, int64_t h, const T* qs, const T* kt,
            const T* k, int64_t q0, int64_t nq, int64_t k0, int64_t nk, T* s) {
  const int64_t nkp = key_columns(p, nk).vectors;  // past nk: padding, -inf below
  products_with_keys(p, qs, kt, k, nq, nk, s);
  if (p.strips != nullptr) {
    add_strip_rows(s, p.ldk, p.strips + h * p.strip_layout.size + k0, p.strip_offset + q0, nq, nk);
  } else if (p.table_col != nullptr) {
    const T* col = p.table_col + h * p.entries;
    for (int64_t r = 0; r < nq; ++r) {
      for (int64_t c = 0; c < nk; ++c) {
        s[r * p.ldk + c] += col[window_table_index(q0 + r, k0 + c, p.g.Wh, p.g.Ww)];
      }
    }
  }
  if (win.masked) {
    add_mask(s, p.ldk, win.label.data() + q0, win.label.data() + k0, win.key_mask.data() + k0, nq,
             nk);
  }
  if (nkp > nk) {
    for (int64_t r = 0; r < nq; ++r) {
      std::fill(s + r * p.ldk + nk, s + r * p.ldk + nkp, -std::numeric_limits<T>::infinity());
    }
  }
}

// Online softmax state of a query block: running maximum m, the shift the
// exponentials were taken at (m, or 0 while m = -inf; common/class_context.h)
// and their row sums l.
template <typename T>
struct OnlineSoftmax {
  std::vector<T> m, shift, l, factor, block_sum;
  explicit OnlineSoftmax(int64_t bq) : m(bq), shift(bq), l(bq), factor(bq), block_sum(bq) {}

  // s [nq x nk] -> exp(s - shift) in place, for key block `first` or a later
  // one; o [nq x d] (+)= exp(s - shift) v after rescaling o to the new shift.
  void step(const Problem<T>& p, T* s, int64_t nq, int64_t nk, bool first, const T* v, T* o) {
    if (first) std::fill(m.begin(), m.begin() + nq, -std::numeric_limits<T>::infinity());
    block_row_max(p, s, nq, nk, m.data());
    for (int64_t r = 0; r < nq; ++r) {
      const T next = softmax_shift(m[r]);
      factor[r] = first ? T(0) : softmax_merge_factor(shift[r], l[r], next);
      shift[r] = next;
      block_sum[r] = 0;
    }
    block_exp(p, s, nq, nk, shift.data(), block_sum.data());
    for (int64_t r = 0; r < nq; ++r) l[r] = first ? block_sum[r] : l[r] * factor[r] + block_sum[r];
    if (o == nullptr) return;
    if (!first) scale_rows(o, p.d, factor.data(), nq, p.d);
    tile_gemm<T>(nq, nk, p.d, s, p.ldk, 1, v, p.d, o, p.d, !first);
  }
};

// ---------------------------------------------------------------------------
// Checks: the ones the loops' memory accesses rely on; fastctx/ops validates
// user input (and says what was expected) before.

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& qkv,
                  const char* fn) {
  TORCH_CHECK(t.device().is_cpu(), fn, " (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), fn, ": ", name, " must be a contiguous ", dim,
              "-D tensor, got shape ", t.sizes(), " and strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == qkv.scalar_type(), fn, ": ", name, " has dtype ", t.scalar_type(),
              " but qkv has ", qkv.scalar_type());
}

struct Shape {
  WindowGeometry g;
  int64_t B, C, heads, d, N, entries;
};

Shape check_inputs(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                   const std::optional<at::Tensor>& pad_qkv, int64_t heads, at::IntArrayRef window,
                   at::IntArrayRef shift, const char* fn) {
  check_tensor(qkv, "qkv", 4, qkv, fn);
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble, fn,
              " (cpu): qkv must be float32 or float64, got ", qkv.scalar_type());
  TORCH_CHECK(window.size() == 2 && shift.size() == 2, fn,
              ": window and shift must be pairs, got ", window, " and ", shift);
  TORCH_CHECK(window[0] >= 1 && window[1] >= 1 && shift[0] >= 0 && shift[1] >= 0 &&
                  shift[0] < window[0] && shift[1] < window[1],
              fn, ": expected window >= 1 and 0 <= shift < window, got window ", window,
              " and shift ", shift);
  Shape s{};
  s.B = qkv.size(0);
  const int64_t channels3 = qkv.size(3);
  TORCH_CHECK(heads >= 1 && channels3 % 3 == 0 && (channels3 / 3) % heads == 0 && channels3 > 0,
              fn, ": qkv's last dimension must be 3C with C divisible by heads = ", heads, ", got ",
              channels3);
  TORCH_CHECK(qkv.size(1) >= 1 && qkv.size(2) >= 1, fn, ": qkv must have H, W >= 1, got shape ",
              qkv.sizes());
  s.C = channels3 / 3;
  s.heads = heads;
  s.d = s.C / heads;
  s.g = window_geometry(qkv.size(1), qkv.size(2), window[0], window[1], shift[0], shift[1]);
  s.N = window[0] * window[1];
  TORCH_CHECK(s.N <= (int64_t(1) << 24), fn, " (cpu): windows of ", s.N,
              " tokens are beyond the kernels (their index arithmetic)");
  s.entries = (2 * window[0] - 1) * (2 * window[1] - 1);
  if (bias_table.has_value()) {
    check_tensor(*bias_table, "bias_table", 2, qkv, fn);
    TORCH_CHECK(bias_table->size(0) == s.entries && bias_table->size(1) == heads, fn,
                ": bias_table must be [(2Wh-1)(2Ww-1), heads] = [", s.entries, ", ", heads,
                "], got ", bias_table->sizes());
  }
  if (pad_qkv.has_value()) {
    check_tensor(*pad_qkv, "pad_qkv", 1, qkv, fn);
    TORCH_CHECK(pad_qkv->size(0) == channels3, fn, ": pad_qkv must be [3C] = [", channels3,
                "], got ", pad_qkv->sizes());
  }
  return s;
}

// The Problem of a call, with the bias as strips (most windows) or the table's
// columns (large ones) in `storage`, and the queries' strip offsets in
// `index_storage`.
template <typename T>
Problem<T> make_problem(const Shape& s, const at::Tensor& qkv,
                        const std::optional<at::Tensor>& bias_table,
                        const std::optional<at::Tensor>& pad_qkv, double scale,
                        at::Tensor& storage, at::Tensor& index_storage) {
  Problem<T> p{};
  p.qkv = qkv.const_data_ptr<T>();
  p.pad = pad_qkv.has_value() ? pad_qkv->const_data_ptr<T>() : nullptr;
  p.g = s.g;
  p.heads = s.heads;
  p.d = s.d;
  p.C = s.C;
  p.N = s.N;
  p.entries = s.entries;
  p.windows = s.B * s.g.nWh * s.g.nWw;
  p.scale = static_cast<T>(scale);
  p.bq = block_size(s.N, kMaxQueryBlock);
  p.bk = block_size(s.N, kMaxKeyBlock);
  p.ldk = round_up(p.bk, 16);
  if (!bias_table.has_value()) return p;
  const int64_t N = s.N, heads = s.heads;
  const BiasStrips strips(s.g.Wh, s.g.Ww);
  if (heads * strips.size <= kMaxStripElements) {
    index_storage = at::empty({N}, qkv.options().dtype(at::kLong));
    int64_t* offset = index_storage.mutable_data_ptr<int64_t>();
    for (int64_t t = 0; t < N; ++t) offset[t] = strips.offset(t);
    const T* table = bias_table->const_data_ptr<T>();
    storage = at::empty({heads, strips.size}, qkv.options());
    T* strip = storage.mutable_data_ptr<T>();
    // Position by position, all heads: the table's rows are read in order.
    int64_t i = 0;
    for (int64_t qx = 0; qx < strips.Ww; ++qx) {
      for (int64_t e = 0; e < 2 * strips.Wh - 1; ++e) {
        for (int64_t kx = 0; kx < strips.Ww; ++kx, ++i) {
          const T* row = table + strips.entry(e, qx - kx) * heads;
          for (int64_t h = 0; h < heads; ++h) strip[h * strips.size + i] = row[h];
        }
      }
    }
    p.strips = strip;
    p.strip_offset = offset;
    p.strip_layout = strips;
  } else {
    storage = bias_table->t().contiguous();  // [heads, entries]
    p.table_col = storage.const_data_ptr<T>();
  }
  return p;
}

// ---------------------------------------------------------------------------
// Forward

template <typename T>
void forward(const Problem<T>& p, T* out, bool stream) {
  const int64_t N = p.N, d = p.d, bq = p.bq, bk = p.bk;
  at::parallel_for(0, p.windows * p.heads, cpu::task_grain(4 * N * d), [&](int64_t begin,
                                                                           int64_t end) {
    std::vector<T> qs(bq * d), kt(d * p.ldk), k(bk * d), v(bk * d), s(bq * p.ldk), o(bq * d),
        inv_l(bq);
    WindowCursor<T> cursor(N);
    const WindowTokens<T>& win = cursor.now;
    OnlineSoftmax<T> softmax(bq);
    cpu::FlushSubnormals flush;
    // The lines of the next window, spread over this one's units: whole qkv
    // rows (one head's slices are short runs on many pages) and, unless
    // streamed past the caches, the output's slices for writing.
    cpu::SpreadPrefetch ahead;
    const T* none = nullptr;
    const T* out_lines = stream ? nullptr : out;
    for (int64_t u = begin; u < end; ++u) {
      // Heads innermost: a window's token rows stay in cache across its heads.
      const int64_t w = u / p.heads, h = u % p.heads;
      if (cursor.move_to(p, w)) {
        // At the task's first window, its own lines, all issued just below.
        if (u == begin) add_heads(ahead, p, win, 0, p.heads, none, out_lines, none);
        ahead.issue_rest();
        ahead.clear();
        if ((w + 1) * p.heads < end) {
          add_heads(ahead, p, cursor.peek(p, w + 1), 0, p.heads, none, out_lines, none);
          const int64_t units = std::min(end, (w + 1) * p.heads) - u;
          ahead.plan(units * prefetch_points(N, 4));  // gathers K, V, Q; stores O
        }
      }
      ahead.step();
      bool kv_tame = false;  // see kTameBound
      if (p.one_key_block()) {
        const bool k_tame = gather_cols(kt.data(), p.ldk, p, win, 1, h, 0, N, k.data(), ahead);
        kv_tame = gather_rows(v.data(), d, p, win, 2, h, 0, N, T(1), ahead) && k_tame;
      }
      for (int64_t q0 = 0; q0 < N; q0 += bq) {
        const int64_t nq = std::min(bq, N - q0);
        const bool q_tame = gather_rows(qs.data(), d, p, win, 0, h, q0, nq, p.scale, ahead);
        flush.set(kv_tame && q_tame);
        for (int64_t k0 = 0; k0 < N; k0 += bk) {
          const int64_t nk = std::min(bk, N - k0);
          if (!p.one_key_block()) {
            gather_cols(kt.data(), p.ldk, p, win, 1, h, k0, nk, k.data(), ahead);
            gather_rows(v.data(), d, p, win, 2, h, k0, nk, T(1), ahead);
          }
          scores(p, win, h, qs.data(), kt.data(), k.data(), q0, nq, k0, nk, s.data());
          ahead.step();
          softmax.step(p, s.data(), nq, nk, k0 == 0, v.data(), o.data());
          ahead.step();
        }
        for (int64_t r = 0; r < nq; ++r) inv_l[r] = T(1) / softmax.l[r];
        // a padded token's row: cropped
        scatter_token_rows(out + h * d, p.C, win.row.data() + q0, o.data(), d, nq, d,
                           inv_l.data(), T(1), stream, &ahead);
      }
    }
    if (stream) cpu::stream_fence();
  });
}

at::Tensor window_attention_fwd(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                                const std::optional<at::Tensor>& pad_qkv, int64_t heads,
                                at::IntArrayRef window, at::IntArrayRef shift, double scale) {
  const Shape s =
      check_inputs(qkv, bias_table, pad_qkv, heads, window, shift, "window_attention_fwd");
  auto out = cpu::empty_output({s.B, s.g.H, s.g.W, s.C}, qkv.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_fwd", [&] {
    at::Tensor storage, index_storage;
    const Problem<scalar_t> p =
        make_problem<scalar_t>(s, qkv, bias_table, pad_qkv, scale, storage, index_storage);
    forward(p, out.mutable_data_ptr<scalar_t>(), cpu::streams_past_caches(out));
  });
  return out;
}

// ---------------------------------------------------------------------------
// Backward

template <typename T>
struct BackwardScratch {
  std::vector<T> qs, dout, kt, k, v, vt, s, dp, dq, dk, dv, table_acc, lse, D, inv_l;
  OnlineSoftmax<T> softmax;
  cpu::SpreadPrefetch ahead;  // the next window's rows
  BackwardScratch(const Problem<T>& p, int64_t strip_heads)
      : qs(p.bq * p.d), dout(p.bq * p.d), kt(p.d * p.ldk), k(p.bk * p.d), v(p.bk * p.d),
        vt(p.d * p.ldk), s(p.bq * p.ldk), dp(p.bq * p.ldk), dq(p.bq * p.d), dk(p.N * p.d),
        dv(p.N * p.d), table_acc(strip_heads * p.strip_layout.size), lse(p.bq), D(p.bq),
        inv_l(p.bq), softmax(p.bq) {}
};

template <typename T>
struct BackwardOut {
  const T* grad;   // [B*H*W, C]
  T* grad_qkv;     // [B*H*W, 3C]
  T* table_part;   // [runs * heads, entries] or nullptr (BackwardPlan)
  T* pad_part;     // [runs * heads, 3d] or nullptr
  bool stream;     // grad_qkv through non-temporal stores (see scatter_rows_body)
};

// Gradients of one head of one window; table gradient into table_acc
// (head h's strip of sums, see BiasStrips, or nullptr) or table_part (the run's column of
// the table for head h), pad_qkv's into pad_part (the run's q, k, v slices of
// head h). Each query block runs with subnormals flushed when its inputs
// allow it (see kTameBound).
template <typename T>
void window_backward(const Problem<T>& p, const WindowTokens<T>& win, int64_t h,
                     const BackwardOut<T>& g, BackwardScratch<T>& x, T* table_acc, T* table_part,
                     T* pad_part, cpu::FlushSubnormals& flush) {
  const int64_t N = p.N, d = p.d, bq = p.bq, bk = p.bk, ldk = p.ldk;
  std::fill(x.dk.begin(), x.dk.end(), T(0));
  std::fill(x.dv.begin(), x.dv.end(), T(0));
  // K and V of keys k0.., as rows (x.k, x.v) and K transposed (x.kt); V
  // transposed too (x.vt) unless for_forward (the recomputed forward of pass 1
  // needs V only as rows).
  // Returns whether they are tame (see kTameBound).
  auto gather_keys = [&](int64_t k0, int64_t nk, bool for_forward = false) {
    const bool k_tame = gather_cols(x.kt.data(), ldk, p, win, 1, h, k0, nk, x.k.data(), x.ahead);
    const bool v_tame =
        for_forward ? gather_rows(x.v.data(), d, p, win, 2, h, k0, nk, T(1), x.ahead)
                    : gather_cols(x.vt.data(), ldk, p, win, 2, h, k0, nk, x.v.data(), x.ahead);
    return k_tame && v_tame;
  };
  // dS [nq x nk] in x.dp and P in x.s: dQ (+)= dS K, dK += dS^T Qs, dV += P^T dO, d(table) += dS.
  auto accumulate = [&](int64_t q0, int64_t nq, int64_t k0, int64_t nk) {
    tile_gemm<T>(nq, nk, d, x.dp.data(), ldk, 1, x.k.data(), d, x.dq.data(), d, k0 > 0);
    tile_gemm<T>(nk, nq, d, x.dp.data(), 1, ldk, x.qs.data(), d, x.dk.data() + k0 * d, d, true);
    tile_gemm<T>(nk, nq, d, x.s.data(), 1, ldk, x.dout.data(), d, x.dv.data() + k0 * d, d, true);
    if (table_acc != nullptr) {
      accumulate_strip_rows(table_acc + k0, p.strip_offset + q0, x.dp.data(), ldk, nq, nk);
    } else if (table_part != nullptr) {
      for (int64_t r = 0; r < nq; ++r) {
        for (int64_t c = 0; c < nk; ++c) {
          table_part[window_table_index(q0 + r, k0 + c, p.g.Wh, p.g.Ww)] += x.dp[r * ldk + c];
        }
      }
    }
  };

  bool kv_tame = false;  // see kTameBound
  if (p.one_key_block()) kv_tame = gather_keys(0, N);
  for (int64_t q0 = 0; q0 < N; q0 += bq) {
    const int64_t nq = std::min(bq, N - q0);
    const bool q_tame = gather_rows(x.qs.data(), d, p, win, 0, h, q0, nq, p.scale, x.ahead);
    // dO: zero on padded (cropped) rows
    const bool dout_tame = gather_token_rows(x.dout.data(), d, g.grad + h * d, p.C,
                                             win.row.data() + q0, static_cast<const T*>(nullptr),
                                             nq, d, T(1), x.ahead);
    flush.set(kv_tame && q_tame && dout_tame);
    if (p.one_key_block()) {
      scores(p, win, h, x.qs.data(), x.kt.data(), x.k.data(), q0, nq, 0, N, x.s.data());
      x.softmax.step(p, x.s.data(), nq, N, true, nullptr, nullptr);
      x.ahead.step();
      for (int64_t r = 0; r < nq; ++r) x.inv_l[r] = T(1) / x.softmax.l[r];
      scale_rows(x.s.data(), ldk, x.inv_l.data(), nq, N);  // P
      // dP = dO V^T; its columns past N are never read.
      products_with_keys(p, x.dout.data(), x.vt.data(), x.v.data(), nq, N, x.dp.data());
      softmax_grad(x.dp.data(), ldk, x.s.data(), ldk, nq, N, x.D.data());
      x.ahead.step();
      accumulate(q0, nq, 0, N);
      x.ahead.step();
    } else {
      // Pass 1: the forward's m, l and O (in x.dq, free until pass 2); D = dO . O,
      // lse = shift + log l.
      for (int64_t k0 = 0; k0 < N; k0 += bk) {
        const int64_t nk = std::min(bk, N - k0);
        gather_keys(k0, nk, true);
        scores(p, win, h, x.qs.data(), x.kt.data(), x.k.data(), q0, nq, k0, nk, x.s.data());
        x.softmax.step(p, x.s.data(), nq, nk, k0 == 0, x.v.data(), x.dq.data());
        x.ahead.step();
      }
      for (int64_t r = 0; r < nq; ++r) {
        T dot = 0;
        for (int64_t j = 0; j < d; ++j) dot += x.dout[r * d + j] * x.dq[r * d + j];
        x.D[r] = dot / x.softmax.l[r];
        x.lse[r] = x.softmax.shift[r] + class_log(x.softmax.l[r]);
      }
      // Pass 2: P = exp(S - lse), dS = P (dO V^T - D), per key block.
      for (int64_t k0 = 0; k0 < N; k0 += bk) {
        const int64_t nk = std::min(bk, N - k0);
        gather_keys(k0, nk);
        scores(p, win, h, x.qs.data(), x.kt.data(), x.k.data(), q0, nq, k0, nk, x.s.data());
        block_exp(p, x.s.data(), nq, nk, x.lse.data(), static_cast<T*>(nullptr));
        products_with_keys(p, x.dout.data(), x.vt.data(), x.v.data(), nq, nk, x.dp.data());
        cpu::softmax_grad_rows(x.dp.data(), ldk, x.s.data(), ldk, x.dp.data(), ldk, x.D.data(), nq,
                               nk, T(1));
        x.ahead.step();
        accumulate(q0, nq, k0, nk);
        x.ahead.step();
      }
    }
    // grad_q = scale dQ; a padded token's into pad_part
    const int64_t* rows = win.row.data() + q0;
    scatter_token_rows(g.grad_qkv + h * d, 3 * p.C, rows, x.dq.data(), d, nq, d,
                       static_cast<const T*>(nullptr), p.scale, g.stream, &x.ahead);
    for (int64_t r = 0; r < nq && pad_part != nullptr; ++r) {
      if (rows[r] >= 0) continue;
      for (int64_t j = 0; j < d; ++j) pad_part[j] += p.scale * x.dq[r * d + j];
    }
  }
  // grad_k, grad_v (the prefetch steps over the pair, as planned); a padded token's into pad_part
  T* grad_k = g.grad_qkv + p.C + h * d;
  scatter_token_rows(grad_k, 3 * p.C, win.row.data(), x.dk.data(), d, N, d,
                     static_cast<const T*>(nullptr), T(1), g.stream, &x.ahead);
  scatter_token_rows(grad_k + p.C, 3 * p.C, win.row.data(), x.dv.data(), d, N, d,
                     static_cast<const T*>(nullptr), T(1), g.stream,
                     static_cast<cpu::SpreadPrefetch*>(nullptr));
  for (int64_t t = 0; t < N && pad_part != nullptr; ++t) {
    if (win.row[t] >= 0) continue;
    for (int64_t j = 0; j < d; ++j) {
      pad_part[d + j] += x.dk[t * d + j];
      pad_part[2 * d + j] += x.dv[t * d + j];
    }
  }
}

// The backward's work split, from the shapes only: runs of windows
// (plan_chunks over the windows) x groups of heads, so that there are about
// cpu::kTargetChunks chunks (heads are split only when windows are few). A
// chunk computes its heads over its run's windows, window by window with heads
// innermost, so a window's token rows are read whole once and stay in cache
// across its heads. Each (run, head) owns one partial of the table column and
// of pad_qkv's slices, summed over the run's windows in order: results do not
// depend on the grouping or on the thread count.
struct BackwardPlan {
  int64_t windows, heads, windows_per_run, runs, heads_per_group, groups, chunks;
  BackwardPlan(int64_t windows_, int64_t heads_) : windows(windows_), heads(heads_) {
    const cpu::ChunkPlan plan = cpu::plan_chunks(1, windows);
    windows_per_run = plan.tiles_per_chunk;
    runs = plan.chunks;
    const int64_t wanted = std::clamp<int64_t>(cpu::kTargetChunks / runs, 1, heads);
    heads_per_group = (heads + wanted - 1) / wanted;
    groups = (heads + heads_per_group - 1) / heads_per_group;
    chunks = runs * groups;
  }
  // Chunk c: run `run`, windows [w0, w1), heads [h0, h1).
  struct Span {
    int64_t run, w0, w1, h0, h1;
  };
  Span span(int64_t c) const {
    Span s;
    s.run = c / groups;
    s.h0 = c % groups * heads_per_group;
    s.h1 = std::min(s.h0 + heads_per_group, heads);
    s.w0 = s.run * windows_per_run;
    s.w1 = std::min(s.w0 + windows_per_run, windows);
    return s;
  }
};

template <typename T>
void backward(const Problem<T>& p, const BackwardOut<T>& g, const BackwardPlan& plan) {
  const int64_t N = p.N, d = p.d, hg = plan.heads_per_group;
  const bool strip_table = p.strips != nullptr;
  // The lines of the group's heads in the next window, spread over this
  // window's units; grad_qkv's for writing unless streamed past the caches.
  const T* written = g.stream ? nullptr : g.grad_qkv;
  const T* none = nullptr;
  const cpu::PrefetchNow now;
  // gathers K, V, Q, dO; stores dQ, dK and dV
  const int64_t unit_points = prefetch_points(N, 6);
  at::parallel_for(0, plan.chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    BackwardScratch<T> x(p, strip_table ? hg : 0);
    WindowCursor<T> cursor(N);
    cpu::FlushSubnormals flush;
    for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
      const BackwardPlan::Span c = plan.span(chunk);
      const int64_t run = c.run, h0 = c.h0, h1 = c.h1, w0 = c.w0, w1 = c.w1;
      // Head h's partials of this run.
      auto table_part = [&](int64_t h) {
        return g.table_part != nullptr ? g.table_part + (run * p.heads + h) * p.entries : nullptr;
      };
      auto pad_part = [&](int64_t h) {
        return g.pad_part != nullptr ? g.pad_part + (run * p.heads + h) * 3 * d : nullptr;
      };
      for (int64_t h = h0; h < h1; ++h) {
        if (g.table_part != nullptr) std::fill(table_part(h), table_part(h) + p.entries, T(0));
        if (g.pad_part != nullptr) std::fill(pad_part(h), pad_part(h) + 3 * d, T(0));
      }
      std::fill(x.table_acc.begin(), x.table_acc.end(), T(0));
      for (int64_t w = w0; w < w1; ++w) {
        cursor.move_to(p, w);
        // At the task's first window, its own lines, all issued just below,
        // when it has heads after the first to compute while they arrive (a
        // single head's own gathers fetch them as fast).
        if (chunk == c_begin && w == w0 && h1 - h0 > 1) {
          add_heads(x.ahead, p, cursor.now, h0, h1 - h0, g.grad, none, written);
        }
        x.ahead.issue_rest();
        x.ahead.clear();
        // The task's next window: this chunk's next, or the next chunk's first
        // (with few windows, the same window's next group of heads).
        if (w + 1 < w1) {
          add_heads(x.ahead, p, cursor.peek(p, w + 1), h0, h1 - h0, g.grad, none, written);
        } else if (chunk + 1 < c_end) {
          const BackwardPlan::Span next = plan.span(chunk + 1);
          add_heads(x.ahead, p, cursor.peek(p, next.w0), next.h0, next.h1 - next.h0, g.grad, none,
                    written);
        }
        x.ahead.plan((h1 - h0) * unit_points);
        for (int64_t h = h0; h < h1; ++h) {
          // The next head's slices of this window, into L1 while this one
          // computes (they are in L2 after the first head, as whole lines).
          if (h + 1 < h1) add_heads(now, p, cursor.now, h + 1, 1, g.grad, none, written);
          T* acc = strip_table ? x.table_acc.data() + (h - h0) * p.strip_layout.size : nullptr;
          window_backward(p, cursor.now, h, g, x, acc, table_part(h), pad_part(h), flush);
        }
      }
      if (strip_table) {
        for (int64_t h = h0; h < h1; ++h) {
          p.strip_layout.fold(x.table_acc.data() + (h - h0) * p.strip_layout.size, table_part(h));
        }
      }
    }
    if (g.stream) cpu::stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad, const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& pad_qkv, int64_t heads, at::IntArrayRef window,
    at::IntArrayRef shift, double scale) {
  const char* fn = "window_attention_bwd";
  const Shape s = check_inputs(qkv, bias_table, pad_qkv, heads, window, shift, fn);
  check_tensor(grad, "grad", 4, qkv, fn);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({s.B, s.g.H, s.g.W, s.C}), fn,
              ": grad must be [B, H, W, C] = ", at::IntArrayRef({s.B, s.g.H, s.g.W, s.C}),
              ", got ", grad.sizes());
  auto grad_qkv = cpu::empty_output_like(qkv);
  auto grad_table = bias_table.has_value() ? at::zeros_like(*bias_table) : qkv.new_empty({0});
  auto grad_pad = pad_qkv.has_value() ? at::zeros_like(*pad_qkv) : qkv.new_empty({0});
  if (qkv.numel() == 0) return {grad_qkv, grad_table, grad_pad};
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_bwd", [&] {
    using T = scalar_t;
    at::Tensor storage, index_storage;
    const Problem<T> p =
        make_problem<T>(s, qkv, bias_table, pad_qkv, scale, storage, index_storage);
    // One partial per (run, head).
    const BackwardPlan plan(p.windows, s.heads);
    const int64_t partials = plan.runs * s.heads;
    auto table_part = bias_table.has_value() ? at::empty({partials, s.entries}, qkv.options())
                                             : at::Tensor();
    auto pad_part =
        pad_qkv.has_value() ? at::empty({partials, 3 * s.d}, qkv.options()) : at::Tensor();
    BackwardOut<T> g{grad.const_data_ptr<T>(), grad_qkv.mutable_data_ptr<T>(),
                     table_part.defined() ? table_part.mutable_data_ptr<T>() : nullptr,
                     pad_part.defined() ? pad_part.mutable_data_ptr<T>() : nullptr,
                     cpu::streams_past_caches(grad_qkv)};
    backward(p, g, plan);

    // Fixed-order reductions of the partials: run 0, 1, ... for each head.
    const int64_t runs = plan.runs, d = s.d;
    if (g.table_part != nullptr) {
      T* out = grad_table.mutable_data_ptr<T>();  // [entries, heads]
      for (int64_t run = 0; run < runs; ++run) {
        for (int64_t h = 0; h < s.heads; ++h) {
          const T* part = g.table_part + (run * s.heads + h) * s.entries;
          for (int64_t e = 0; e < s.entries; ++e) out[e * s.heads + h] += part[e];
        }
      }
    }
    if (g.pad_part != nullptr) {
      T* out = grad_pad.mutable_data_ptr<T>();  // [3C]: part * C + h * d + j
      for (int64_t run = 0; run < runs; ++run) {
        for (int64_t h = 0; h < s.heads; ++h) {
          const T* part = g.pad_part + (run * s.heads + h) * 3 * d;
          for (int64_t q = 0; q < 3; ++q) {
            for (int64_t j = 0; j < d; ++j) out[q * s.C + h * d + j] += part[q * d + j];
          }
        }
      }
    }
  });
  return {grad_qkv, grad_table, grad_pad};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("window_attention_fwd", &fastctx::window_attention_fwd);
  m.impl("window_attention_bwd", &fastctx::window_attention_bwd);
}
