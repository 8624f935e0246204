#pragma once
// Device code of window_attention (contract: docs/kernels.md
// "window_attention"; maths: fastctx/ops/window_attention.py). Launch sizes
// and the shared-memory layout: window_attention_launch.h.
//
// One block per (window, head). The window's tokens are found by the index
// arithmetic of common/window_attention.h (padding, cyclic shift, region
// labels): no padded, rolled or partitioned copy of the map exists. The block
// gathers its head's keys and values from the [B, H, W, 3C] token rows into
// shared memory (acc_t; a padded token takes pad_qkv's slice, or zeros when
// padded keys are excluded), then per block of bq queries:
//   S = Qs K^T + table[index] + (-100 across shift regions) + (-inf on excluded keys)
//   P = softmax(S) row by row in acc_t (8 threads per row, butterfly sums)
//   forward:  O = P V, written straight to the token rows (padded queries are not written)
//   backward: dP = dO V^T;  dS = P (dP - rowsum(P dP));
//             dV += P^T dO, dK += dS^T Qs (acc_t workspace slice of the block),
//             dQ = scale dS K, table gradient += dS gathered by relative offset.
// Every product is window_gemm: 4x4 register tiles over shared-memory
// operands, each thread accumulating its tiles in a fixed k order.
//
// grad_qkv: a real token is in exactly one window, so its q/k/v gradients are
// written once, by that window's block. grad_table and grad_pad are sums over
// windows: each block writes its partial (table entries, then pad_qkv's q, k,
// v slices of its head) to its own slot, and window_attention_sum_kernel adds
// the slots in window order. No atomics: results are bitwise reproducible.
//
// Non-finite values propagate as in the eager maths: the row maxima ignore
// NaN, but a NaN reaches the row's sum through exp, so the row is NaN.
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/class_context.h"
#include "common/cuda_helpers.cuh"
#include "common/window_attention.h"
#include "cuda/window_attention_launch.h"

namespace fastctx {

// Named barriers (FASTCTX_SYNC).
enum WindowBarrier : int {
  kSyncWinKeysStaged = 701,
  kSyncWinQueriesStaged,
  kSyncWinScoresReady,
  kSyncWinProbsReady,
  kSyncWinOutputDone,
  kSyncWinKeyGradsDone,
  kSyncWinPadRowsReady,
  kSyncWinQueryBlockDone,
  kSyncWinBackwardDone,
};

// mmseg's logit offset for token pairs from different shift regions.
constexpr float kWindowRegionMask = -100.0f;

template <typename scalar_t, typename acc_t>
struct WindowAttentionParams {
  const scalar_t* qkv;    // [B*H*W, 3C]
  const scalar_t* table;  // [entries, heads] or nullptr
  const scalar_t* pad;    // [3C] or nullptr (padded keys excluded)
  const scalar_t* grad;   // [B*H*W, C] (backward)
  scalar_t* out;          // [B*H*W, C] (forward)
  scalar_t* grad_qkv;     // [B*H*W, 3C] (backward)
  acc_t* kv;              // backward: [chunk windows * heads][2][NP][DP] dK, dV accumulators
  acc_t* partial;         // backward: [windows][heads][slot]
  WindowGeometry g;
  int64_t C;
  int64_t window_begin;   // backward: first window of this launch
  int heads, d, N, NP, DP, bq, entries, table_slot, slot;
  acc_t scale;
  bool vec;
};

// ---- global memory: four channels of one token ------------------------------

// v = mult * src[c .. c+3] (channels >= d read as 0); src == nullptr: zeros.
// vec: d % 4 == 0 and an aligned base, so the four are one vector.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_load4(acc_t (&v)[4], const scalar_t* __restrict__ src, int c, int d,
                                             acc_t mult, bool vec) {
  if (src == nullptr) {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = acc_t(0);
  } else if (vec) {
    const Pack<scalar_t, 4> q = *reinterpret_cast<const Pack<scalar_t, 4>*>(src + c);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = mult * static_cast<acc_t>(q.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = c + j < d ? mult * static_cast<acc_t>(src[c + j]) : acc_t(0);
  }
}

// dst[c .. c+3] = v for the channels < d.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_store4(scalar_t* __restrict__ dst, int c, int d, const acc_t (&v)[4],
                                              acc_t mult, bool vec) {
  if (vec) {
    Pack<scalar_t, 4> q;
#pragma unroll
    for (int j = 0; j < 4; ++j) q.v[j] = static_cast<scalar_t>(mult * v[j]);
    *reinterpret_cast<Pack<scalar_t, 4>*>(dst + c) = q;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (c + j < d) dst[c + j] = static_cast<scalar_t>(mult * v[j]);
  }
}

// The d channels of part `part` (0 q, 1 k, 2 v) of head h of a token with row
// `row`: its token row, pad_qkv's slice for a padded token, or nullptr (zeros).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ const scalar_t* window_part(const WindowAttentionParams<scalar_t, acc_t>& p, int64_t row,
                                                      int part, int h) {
  const int64_t offset = static_cast<int64_t>(part) * p.C + static_cast<int64_t>(h) * p.d;
  if (row >= 0) return p.qkv + row * 3 * p.C + offset;
  return p.pad != nullptr ? p.pad + offset : nullptr;
}

// Stages tokens t0 .. t0 + rows - 1 of the window (tokens >= N read as 0):
// dst[r][c] (TRANSPOSED false, row stride DP) or dst[c][r] (true, row stride
// ld), times mult. `src(t)` gives token t's d channels (or nullptr). Threads
// walk the channels fastest: a warp reads consecutive channels of a row.
template <bool TRANSPOSED, typename scalar_t, typename acc_t, typename Source>
__device__ __forceinline__ void window_stage(acc_t* __restrict__ dst, int ld, const int64_t* rows, int t0, int count,
                                             int N, int d, int DP, acc_t mult, bool vec, Source src) {
  const int quads = DP / 4;
  for (int i = threadIdx.x; i < count * quads; i += kThreads) {
    const int r = i / quads, c = (i - r * quads) * 4, t = t0 + r;
    acc_t v[4];
    window_load4(v, t < N ? src(rows[t]) : static_cast<const scalar_t*>(nullptr), c, d, mult, vec);
    if constexpr (TRANSPOSED) {
#pragma unroll
      for (int j = 0; j < 4; ++j) dst[(c + j) * ld + r] = v[j];
    } else {
      *reinterpret_cast<Pack<acc_t, 4>*>(dst + r * DP + c) = Pack<acc_t, 4>{{v[0], v[1], v[2], v[3]}};
    }
  }
}

// ---- shared memory: the products --------------------------------------------

// v[k][i] = X(k0 + k, m0 + i), X(k, m) = x[k * ld + m] (K_MAJOR) or x[m * ld + k].
template <bool K_MAJOR, typename acc_t>
__device__ __forceinline__ void window_lds4x4(acc_t (&v)[4][4], const acc_t* x, int ld, int k0, int m0) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const Pack<acc_t, 4> q = K_MAJOR ? *reinterpret_cast<const Pack<acc_t, 4>*>(x + (k0 + a) * ld + m0)
                                     : *reinterpret_cast<const Pack<acc_t, 4>*>(x + (m0 + a) * ld + k0);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if constexpr (K_MAJOR) {
        v[a][b] = q.v[b];
      } else {
        v[b][a] = q.v[b];
      }
    }
  }
}

// C[m][n] = sum_{k < K} A(k, m) B(k, n) for m < M, n < NN, in 4x4 register
// tiles (M, NN, K multiples of 4; the operands' padding holds zeros), tiles
// dealt to the threads n-fastest; epi(m0, n0, acc) consumes a tile. A thread
// gets the same tiles for the same (M, NN), which the accumulating epilogues
// rely on. The k order is fixed: the results do not depend on the schedule.
template <bool A_K_MAJOR, bool B_K_MAJOR, typename acc_t, typename Epilogue>
__device__ __forceinline__ void window_gemm(const acc_t* a, int lda, const acc_t* b, int ldb, int K, int M, int NN,
                                            Epilogue&& epi) {
  const int tiles_n = NN / 4, tiles = (M / 4) * tiles_n;
  for (int tile = threadIdx.x; tile < tiles; tile += kThreads) {
    const int m0 = tile / tiles_n * 4, n0 = (tile - tile / tiles_n * tiles_n) * 4;
    acc_t acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
    for (int k0 = 0; k0 < K; k0 += 4) {
      acc_t av[4][4], bv[4][4];
      window_lds4x4<A_K_MAJOR>(av, a, lda, k0, m0);
      window_lds4x4<B_K_MAJOR>(bv, b, ldb, k0, n0);
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[k][i] * bv[k][j];
    }
    epi(m0, n0, acc);
  }
}

// Row softmax of one score row, in place, by the 8 lanes of its row group
// (each walks u = lane, lane + 8, ...): P = exp(S - shift(max)) / sum, and 0
// on a dead row (a query past the window). With `dot` (the backward's dP row)
// it returns D = sum_u P[u] dot[u] to every lane of the group, accumulated as
// each P[u] is written; without it (nullptr, a compile-time choice: a runtime
// test costs the backward spills on sm_90), 0.
template <typename acc_t, typename Dot = std::nullptr_t>
__device__ __forceinline__ acc_t window_softmax_row(acc_t* row, int NP, bool live, Dot dot = nullptr) {
  constexpr bool kDot = !std::is_same_v<Dot, std::nullptr_t>;
  const int lane = threadIdx.x % 8;
  acc_t m = -static_cast<acc_t>(INFINITY);
  for (int u = lane; u < NP; u += 8) m = row[u] > m ? row[u] : m;
  const acc_t shift = softmax_shift(warp_max<8>(m));
  acc_t l = acc_t(0);
  for (int u = lane; u < NP; u += 8) {
    const acc_t e = class_exp(row[u] - shift);
    row[u] = e;
    l += e;
  }
  const acc_t inv = acc_t(1) / warp_sum<8>(l);
  acc_t D = acc_t(0);
  for (int u = lane; u < NP; u += 8) {
    row[u] = live ? row[u] * inv : acc_t(0);
    if constexpr (kDot) D += row[u] * dot[u];
  }
  if constexpr (kDot) D = warp_sum<8>(D);
  return D;
}

// Block start: the window's token rows and region labels into shared memory.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_tokens(const WindowAttentionParams<scalar_t, acc_t>& p, int64_t window,
                                              int64_t* rows, int* labels) {
  for (int t = threadIdx.x; t < p.NP; t += kThreads) {
    if (t < p.N) {
      const WindowToken token = window_token(p.g, window, t);
      rows[t] = token.row;
      labels[t] = token.label;
    } else {
      rows[t] = -1;
      labels[t] = 0;
    }
  }
}

// S [bq][NP] = Qs K^T + bias + masks for queries q0 .. (rows past the window
// hold finite junk the row pass zeroes; columns past the window are -inf).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_scores(const WindowAttentionParams<scalar_t, acc_t>& p, int h, int q0,
                                              const acc_t* qs, const acc_t* kt, const int64_t* rows,
                                              const int* labels, acc_t* s) {
  const int N = p.N, NP = p.NP;
  const acc_t neg_inf = -static_cast<acc_t>(INFINITY);
  window_gemm<false, true>(qs, p.DP, kt, NP, p.DP, p.bq, NP, [&](int m0, int n0, acc_t(&acc)[4][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = q0 + m0 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int u = n0 + j;
        acc_t v = neg_inf;
        if (u < N) {
          v = acc[i][j];
          if (t < N) {
            if (p.table != nullptr)
              v += static_cast<acc_t>(p.table[window_table_index(t, u, p.g.Wh, p.g.Ww) * p.heads + h]);
            if (labels[t] != labels[u]) v += static_cast<acc_t>(kWindowRegionMask);
          }
          if (rows[u] < 0 && p.pad == nullptr) v = neg_inf;  // an excluded padded key
        }
        s[(m0 + i) * NP + u] = v;
      }
    }
  });
}

// One block per (window, head); grid.x = windows * heads, heads fastest.
// The explicit minimum of 1 block per SM: without it ptxas for sm_90 caps
// the fp32 instantiation at 64 registers and spills 8 bytes (89 used with it).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) window_attention_fwd_kernel(const WindowAttentionParams<scalar_t, acc_t> p) {
  const WindowSmemLayout L = window_smem_layout(false, p.NP, p.DP, p.bq, p.entries, sizeof(acc_t));
  unsigned char* smem = dynamic_smem<unsigned char>();
  int64_t* rows = reinterpret_cast<int64_t*>(smem + L.rows);
  int* labels = reinterpret_cast<int*>(smem + L.labels);
  acc_t* kt = reinterpret_cast<acc_t*>(smem + L.k);  // [DP][NP]
  acc_t* vs = reinterpret_cast<acc_t*>(smem + L.v);  // [NP][DP]
  acc_t* qs = reinterpret_cast<acc_t*>(smem + L.q);  // [bq][DP]
  acc_t* ps = reinterpret_cast<acc_t*>(smem + L.p);  // [bq][NP]
  const int h = static_cast<int>(blockIdx.x % p.heads);
  const int64_t window = blockIdx.x / p.heads;
  const int N = p.N, NP = p.NP, DP = p.DP, d = p.d, bq = p.bq, tid = threadIdx.x;

  window_tokens(p, window, rows, labels);
  FASTCTX_SYNC(kSyncWinKeysStaged);
  window_stage<true, scalar_t>(kt, NP, rows, 0, NP, N, d, DP, acc_t(1), p.vec,
                               [&](int64_t row) { return window_part(p, row, 1, h); });
  window_stage<false, scalar_t>(vs, DP, rows, 0, NP, N, d, DP, acc_t(1), p.vec,
                                [&](int64_t row) { return window_part(p, row, 2, h); });

  for (int q0 = 0; q0 < N; q0 += bq) {
    window_stage<false, scalar_t>(qs, DP, rows, q0, bq, N, d, DP, p.scale, p.vec,
                                  [&](int64_t row) { return window_part(p, row, 0, h); });
    FASTCTX_SYNC(kSyncWinQueriesStaged);
    window_scores(p, h, q0, qs, kt, rows, labels, ps);
    FASTCTX_SYNC(kSyncWinScoresReady);
    // Row softmax, 8 threads per row; a warp holds 4 whole rows (bq % 4 == 0).
    for (int r = tid / 8; r < bq; r += kThreads / 8) window_softmax_row(ps + r * NP, NP, q0 + r < N);
    FASTCTX_SYNC(kSyncWinProbsReady);
    // O = P V, straight to the token rows of the window's real queries.
    window_gemm<false, true>(ps, NP, vs, DP, NP, bq, DP, [&](int m0, int c0, acc_t(&acc)[4][4]) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = q0 + m0 + i;
        if (t < N && rows[t] >= 0 && c0 < d)
          window_store4(p.out + rows[t] * p.C + static_cast<int64_t>(h) * d, c0, d, acc[i], acc_t(1), p.vec);
      }
    });
    FASTCTX_SYNC(kSyncWinOutputDone);  // qs and ps are restaged next
  }
}

// One block per (window, head) of windows [window_begin, window_begin + gridDim.x / heads).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) window_attention_bwd_kernel(const WindowAttentionParams<scalar_t, acc_t> p) {
  const WindowSmemLayout L = window_smem_layout(true, p.NP, p.DP, p.bq, p.entries, sizeof(acc_t));
  unsigned char* smem = dynamic_smem<unsigned char>();
  int64_t* rows = reinterpret_cast<int64_t*>(smem + L.rows);
  int* labels = reinterpret_cast<int*>(smem + L.labels);
  acc_t* kt = reinterpret_cast<acc_t*>(smem + L.k);        // [DP][NP]
  acc_t* vt = reinterpret_cast<acc_t*>(smem + L.v);        // [DP][NP]
  acc_t* qs = reinterpret_cast<acc_t*>(smem + L.q);        // [bq][DP]; then padded queries' dQ
  acc_t* dos = reinterpret_cast<acc_t*>(smem + L.dout);    // [bq][DP]
  acc_t* ps = reinterpret_cast<acc_t*>(smem + L.p);        // [bq][NP]
  acc_t* dss = reinterpret_cast<acc_t*>(smem + L.ds);      // [bq][NP]: dP, then dS
  acc_t* pad_q = reinterpret_cast<acc_t*>(smem + L.pad_q); // [DP]
  acc_t* table = reinterpret_cast<acc_t*>(smem + L.table); // [entries]
  const int h = static_cast<int>(blockIdx.x % p.heads);
  const int64_t local = blockIdx.x / p.heads, window = p.window_begin + local;
  const int N = p.N, NP = p.NP, DP = p.DP, d = p.d, bq = p.bq, tid = threadIdx.x;
  const int64_t C = p.C, hd = static_cast<int64_t>(h) * d;
  const bool has_table = p.table != nullptr, has_pad = p.pad != nullptr;
  acc_t* dk = p.kv + (local * p.heads + h) * 2 * NP * DP;  // [NP][DP]
  acc_t* dv = dk + NP * DP;                                 // [NP][DP]

  window_tokens(p, window, rows, labels);
  // Accumulators owned by one thread each from here to the end.
  for (int c = tid; c < DP; c += kThreads) pad_q[c] = acc_t(0);
  for (int e = tid; e < p.entries; e += kThreads) table[e] = acc_t(0);
  FASTCTX_SYNC(kSyncWinKeysStaged);
  window_stage<true, scalar_t>(kt, NP, rows, 0, NP, N, d, DP, acc_t(1), p.vec,
                               [&](int64_t row) { return window_part(p, row, 1, h); });
  window_stage<true, scalar_t>(vt, NP, rows, 0, NP, N, d, DP, acc_t(1), p.vec,
                               [&](int64_t row) { return window_part(p, row, 2, h); });

  for (int q0 = 0; q0 < N; q0 += bq) {
    const bool first = q0 == 0;
    window_stage<false, scalar_t>(qs, DP, rows, q0, bq, N, d, DP, p.scale, p.vec,
                                  [&](int64_t row) { return window_part(p, row, 0, h); });
    // dO: zero on padded (cropped) queries.
    window_stage<false, scalar_t>(dos, DP, rows, q0, bq, N, d, DP, acc_t(1), p.vec, [&](int64_t row) {
      return row >= 0 ? p.grad + row * C + hd : static_cast<const scalar_t*>(nullptr);
    });
    FASTCTX_SYNC(kSyncWinQueriesStaged);
    window_scores(p, h, q0, qs, kt, rows, labels, ps);
    window_gemm<false, true>(dos, DP, vt, NP, DP, bq, NP, [&](int m0, int n0, acc_t(&acc)[4][4]) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) dss[(m0 + i) * NP + n0 + j] = acc[i][j];
    });
    FASTCTX_SYNC(kSyncWinScoresReady);
    // P = softmax(S); dS = P (dP - sum P dP), autograd's softmax backward.
    for (int r = tid / 8; r < bq; r += kThreads / 8) {
      acc_t* row = ps + r * NP;
      acc_t* drow = dss + r * NP;
      const bool live = q0 + r < N;
      const acc_t D = window_softmax_row(row, NP, live, drow);
      for (int u = tid % 8; u < NP; u += 8) drow[u] = live ? row[u] * (drow[u] - D) : acc_t(0);
    }
    FASTCTX_SYNC(kSyncWinProbsReady);
    // dV += P^T dO, dK += dS^T Qs: the block's workspace slices, each element
    // read and written by the thread that owns its tile.
    window_gemm<true, true>(ps, NP, dos, DP, bq, NP, DP, [&](int n0, int c0, acc_t(&acc)[4][4]) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc_t* x = dv + (n0 + i) * DP + c0 + j;
          *x = first ? acc[i][j] : *x + acc[i][j];
        }
    });
    window_gemm<true, true>(dss, NP, qs, DP, bq, NP, DP, [&](int n0, int c0, acc_t(&acc)[4][4]) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc_t* x = dk + (n0 + i) * DP + c0 + j;
          *x = first ? acc[i][j] : *x + acc[i][j];
        }
    });
    // Table gradient: entry e collects dS of the pairs at its relative offset, queries in order.
    if (has_table) {
      const int Wh = static_cast<int>(p.g.Wh), Ww = static_cast<int>(p.g.Ww);
      const int rows_live = N - q0 < bq ? N - q0 : bq;
      for (int e = tid; e < p.entries; e += kThreads) {
        const int di = e / (2 * Ww - 1) - (Wh - 1), dj = e % (2 * Ww - 1) - (Ww - 1);
        acc_t sum = table[e];
        for (int r = 0; r < rows_live; ++r) {
          const int t = q0 + r, ui = t / Ww - di, uj = t % Ww - dj;
          if (ui >= 0 && ui < Wh && uj >= 0 && uj < Ww) sum += dss[r * NP + ui * Ww + uj];
        }
        table[e] = sum;
      }
    }
    FASTCTX_SYNC(kSyncWinKeyGradsDone);  // qs is free: it takes the padded queries' dQ
    // dQ = scale dS K: real queries to grad_qkv, padded ones (pad_qkv's q) to qs.
    window_gemm<false, false>(dss, NP, kt, NP, NP, bq, DP, [&](int m0, int c0, acc_t(&acc)[4][4]) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = q0 + m0 + i;
        if (t >= N) continue;
        if (rows[t] >= 0) {
          if (c0 < d) window_store4(p.grad_qkv + rows[t] * 3 * C + hd, c0, d, acc[i], p.scale, p.vec);
        } else if (has_pad) {
#pragma unroll
          for (int j = 0; j < 4; ++j) qs[(m0 + i) * DP + c0 + j] = p.scale * acc[i][j];
        }
      }
    });
    if (has_pad) {
      FASTCTX_SYNC(kSyncWinPadRowsReady);
      const int rows_live = N - q0 < bq ? N - q0 : bq;
      for (int c = tid; c < d; c += kThreads) {
        acc_t sum = pad_q[c];
        for (int r = 0; r < rows_live; ++r)
          if (rows[q0 + r] < 0) sum += qs[r * DP + c];
        pad_q[c] = sum;
      }
    }
    FASTCTX_SYNC(kSyncWinQueryBlockDone);  // qs, dos, ps, dss are restaged next
  }

  // dK, dV of the real tokens to grad_qkv; the partials of the cross-window sums to the block's slot.
  const int quads = DP / 4;
  for (int i = tid; i < N * quads; i += kThreads) {
    const int t = i / quads, c = (i - t * quads) * 4;
    if (rows[t] < 0 || c >= d) continue;
    scalar_t* dst = p.grad_qkv + rows[t] * 3 * C + hd;
    const Pack<acc_t, 4> k4 = *reinterpret_cast<const Pack<acc_t, 4>*>(dk + t * DP + c);
    const Pack<acc_t, 4> v4 = *reinterpret_cast<const Pack<acc_t, 4>*>(dv + t * DP + c);
    const acc_t kv[2][4] = {{k4.v[0], k4.v[1], k4.v[2], k4.v[3]}, {v4.v[0], v4.v[1], v4.v[2], v4.v[3]}};
    window_store4(dst + C, c, d, kv[0], acc_t(1), p.vec);
    window_store4(dst + 2 * C, c, d, kv[1], acc_t(1), p.vec);
  }
  acc_t* slot = p.partial + (window * p.heads + h) * p.slot;
  if (has_table)
    for (int e = tid; e < p.entries; e += kThreads) slot[e] = table[e];
  if (has_pad) {
    acc_t* pad_slot = slot + p.table_slot;
    for (int c = tid; c < d; c += kThreads) {
      acc_t sk = acc_t(0), sv = acc_t(0);
      for (int t = 0; t < N; ++t) {
        if (rows[t] >= 0) continue;
        sk += dk[t * DP + c];
        sv += dv[t * DP + c];
      }
      pad_slot[c] = pad_q[c];
      pad_slot[d + c] = sk;
      pad_slot[2 * d + c] = sv;
    }
  }
}

// grad_table[e, h] and grad_pad[part * C + h * d + j]: the slots of every
// window summed in window order. 1-D grid over heads * slot.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) window_attention_sum_kernel(const acc_t* __restrict__ partial,
                                                                        scalar_t* __restrict__ grad_table,
                                                                        scalar_t* __restrict__ grad_pad,
                                                                        int64_t windows, int64_t heads, int64_t slot,
                                                                        int64_t table_slot, int64_t d, int64_t C) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= heads * slot) return;
  const int64_t h = i / slot, s = i - h * slot;
  const acc_t* src = partial + i;  // (window 0, head h, s)
  acc_t sum = acc_t(0);
  for (int64_t w = 0; w < windows; ++w) sum += src[w * heads * slot];
  if (s < table_slot) {
    grad_table[s * heads + h] = static_cast<scalar_t>(sum);
  } else {
    const int64_t k = s - table_slot, part = k / d, j = k - part * d;
    grad_pad[part * C + h * d + j] = static_cast<scalar_t>(sum);
  }
}

}  // namespace fastctx
