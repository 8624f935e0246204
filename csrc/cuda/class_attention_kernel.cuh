#pragma once
// Device code of class_attention (contract: docs/kernels.md
// "class_attention"; maths: fastctx/ops/class_attention.py). Launch sizes:
// class_attention_launch.h. The pixel-tile primitives (staging, the class x
// channel products, the column softmax) are class_gather's, in
// class_gather_kernel.cuh.
//
//   s_kn = k_k . q_n (query form) or logits_kn;  lse_n = log sum_k exp(scale s_kn)
//   a_kn = exp(scale s_kn - lse_n);  out_n = sum_k a_kn v_k
//   backward: dA_kn = v_k . G_n;  D_n = sum_k a_kn dA_kn (= G_n . out_n);  dS = scale a (dA - D)
//             dv_k = sum_n a_kn G_n;  dq_n = sum_k dS_kn k_k;  dk_k = sum_n dS_kn q_n;  dlogits = dS
//
// Forward, one block per (pixel tile, image): the scores of all KP (padded)
// classes (class_rows_gemm over the query channels, or the logits tile), the
// softmax over the classes per pixel column (lse_n written), out = V^T A
// (class_mix). The [KP x tile] attention lives in shared memory only.
//
// Backward, one block per (contiguous range of pixel tiles, image), per tile:
// A recomputed from lse (flash-attention style); dv += A G^T into the block's
// partial slot; dA = V G (class_rows_gemm) and D from it (the reference's
// softmax backward sums sum_k a dA, so `out` is not read; the recomputed a
// renormalised, see below); dS; grad_logits,
// or grad_query = Keys^T dS (class_mix) and dk += dS Q^T into the slot. The
// slot [K, Cv + Cq] is private to the block and accumulated over its tiles in
// order (a plain read-modify-write, written on its first tile);
// class_attention_sum_kernel adds the slots of an image in a fixed order. No
// atomics: results are bitwise reproducible.
#include <cstdint>

#include "common/class_context.h"
#include "common/cuda_helpers.cuh"
#include "cuda/class_attention_launch.h"
#include "cuda/class_gather_kernel.cuh"

namespace fastctx {

template <typename scalar_t, typename acc_t>
struct ClassAttentionParams {
  const scalar_t* query;   // [B, Cq, N] (query form)
  const scalar_t* keys;    // [B, K, Cq] (query form)
  const scalar_t* values;  // [B, K, Cv]
  const scalar_t* logits;  // [B, K, N] (logits form)
  const scalar_t* grad;    // [B, Cv, N] (backward)
  acc_t* lse;              // [B, N]: written by the forward, read by the backward
  scalar_t* out;           // [B, Cv, N] (forward)
  scalar_t* grad_query;    // [B, Cq, N] (backward, query form)
  scalar_t* grad_logits;   // [B, K, N] (backward, logits form)
  acc_t* slot;             // [B, parts, K, Cv + Cq] (backward): dv | dk partial sums of each block
  int64_t Cq, Cv, N;       // Cq = 0 in the logits form
  int64_t tiles, parts;    // backward: pixel tiles per image, blocks (slots) per image
  int K;
  acc_t scale;
  bool vec;
};

// slot[k][coff + c] (+)= sum_n P[k][n] x[c][n0 + n] for k < K, c < C: a
// tile's contribution to a sum over the pixels, added into the block's own
// partial slot (rows ld apart; written on the block's first tile, `first`).
// x: the image's [C][N] map, staged RED_CB channels at a time into xs. P is
// first read after the first staging barrier, which therefore orders the
// caller's writes of P (C >= 1).
template <int KP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void class_slot_reduce(acc_t* __restrict__ slot, int64_t ld, int64_t coff, const acc_t* P,
                                                  const scalar_t* __restrict__ x, int64_t C, int64_t N, int64_t n0,
                                                  int K, bool first, bool vec, acc_t* xs) {
  using G = ClassTile<KP>;
  constexpr int CB = G::RED_CB;
  const int tid = threadIdx.x, tk = tid / G::RED_TC, tc = tid % G::RED_TC;
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    const int cv = C - c0 < CB ? static_cast<int>(C - c0) : CB;
    class_stage_rows<CB>(xs, x + c0 * N, N, n0, cv, vec);
    FASTCTX_SYNC(kSyncClassReduceStaged);
    acc_t acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);
    class_pixel_reduce<KP>(acc, P, xs);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = tk + G::RED_TK * i;
      if (k < K) {
        acc_t* row = slot + k * ld + coff + c0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = tc + G::RED_TC * j;
          if (c < cv) row[c] = first ? acc[i][j] : row[c] + acc[i][j];
        }
      }
    }
    FASTCTX_SYNC(kSyncClassReduceConsumed);
  }
}

// One block per (pixel tile, image).
template <typename scalar_t, typename acc_t, int KP, bool QUERY>
__global__ void __launch_bounds__(kThreads, kClassMinBlocks) class_attention_fwd_kernel(const ClassAttentionParams<scalar_t, acc_t> p) {
  using G = ClassTile<KP>;
  constexpr int KT = G::GEMM_KT;
  acc_t* smem = dynamic_smem<acc_t>();
  acc_t* ps = smem;              // [KP][kClassLd]: scores, then the attention
  acc_t* stage = ps + G::TILE;   // class_rows_gemm, then class_mix staging
  const int tid = threadIdx.x, tk = tid >> 3, tp = tid & 7;
  const int64_t b = blockIdx.y, n0 = static_cast<int64_t>(blockIdx.x) * kClassTile;
  const int64_t N = p.N, Cq = p.Cq, Cv = p.Cv;
  const int K = p.K;

  if constexpr (QUERY) {
    acc_t s[KT][4];
#pragma unroll
    for (int i = 0; i < KT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = acc_t(0);
    class_rows_gemm<KP>(s, p.keys + b * K * Cq, Cq, K, p.query + b * Cq * N, Cq, N, n0, p.vec, stage);
#pragma unroll
    for (int i = 0; i < KT; ++i) class_sts4(ps + (tk + 32 * i) * kClassLd + 4 * tp, s[i]);
  } else {
    class_stage_rows<KP>(ps, p.logits + b * K * N, N, n0, K, p.vec);
  }
  FASTCTX_SYNC(kSyncAttnScoresReady);
  const int n_valid = N - n0 < kClassTile ? static_cast<int>(N - n0) : kClassTile;
  const acc_t lse = class_column_softmax<KP>(ps, K, n_valid, p.scale);
  if ((tid & 7) == 0 && (tid >> 3) < n_valid) p.lse[b * N + n0 + (tid >> 3)] = lse;
  class_mix<KP>(p.out + b * Cv * N, p.values + b * K * Cv, Cv, K, ps, Cv, N, n0, p.vec, stage);
}

// One block per (contiguous range of pixel tiles = slot, image).
template <typename scalar_t, typename acc_t, int KP, bool QUERY>
__global__ void __launch_bounds__(kThreads, kClassMinBlocks) class_attention_bwd_kernel(const ClassAttentionParams<scalar_t, acc_t> p) {
  using G = ClassTile<KP>;
  constexpr int KT = G::GEMM_KT;
  acc_t* smem = dynamic_smem<acc_t>();
  acc_t* as = smem;              // [KP][kClassLd]: the attention, then dS
  acc_t* stage = as + G::TILE;   // staging of the products, and the column sums
  const int tid = threadIdx.x, tk = tid >> 3, tp = tid & 7;
  const int64_t b = blockIdx.y, part = blockIdx.x;
  const int64_t N = p.N, Cq = p.Cq, Cv = p.Cv;
  const int K = p.K;
  const acc_t scale = p.scale;
  const int64_t ld = Cv + Cq;  // slot row: dv | dk
  acc_t* slot = p.slot + (b * p.parts + part) * K * ld;
  const scalar_t* grad_b = p.grad + b * Cv * N;
  const scalar_t* values_b = p.values + b * K * Cv;
  const scalar_t* query_b = QUERY ? p.query + b * Cq * N : nullptr;
  const scalar_t* keys_b = QUERY ? p.keys + b * K * Cq : nullptr;
  const acc_t* lse_b = p.lse + b * N;
  // parts <= tiles: every block owns at least one tile and fills its slot.
  const int64_t t0 = tile_split_begin(part, p.tiles, p.parts), t1 = tile_split_begin(part + 1, p.tiles, p.parts);

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kClassTile, n = n0 + 4 * tp;
    const bool first = t == t0;

    // a = exp(scale s - lse), 0 for the padding classes and pixels outside the image.
    acc_t s[KT][4];
#pragma unroll
    for (int i = 0; i < KT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = acc_t(0);
    if constexpr (QUERY) {
      class_rows_gemm<KP>(s, keys_b, Cq, K, query_b, Cq, N, n0, p.vec, stage);
    } else {
#pragma unroll
      for (int i = 0; i < KT; ++i) {
        const int k = tk + 32 * i;
        if (k < K) class_load4(s[i], p.logits + (b * K + k) * N + n, N - n, p.vec);
      }
    }
    acc_t lse[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) lse[j] = n + j < N ? lse_b[n + j] : acc_t(0);
#pragma unroll
    for (int i = 0; i < KT; ++i) {
      const int k = tk + 32 * i;
      acc_t a[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        a[j] = k < K && n + j < N ? class_exp(class_scaled(scale, s[i][j]) - lse[j]) : acc_t(0);
      class_sts4(as + k * kClassLd + 4 * tp, a);
    }

    // dv_k += sum_n a_kn G_n.
    class_slot_reduce<KP>(slot, ld, 0, as, grad_b, Cv, N, n0, K, first, p.vec, stage);

    // dA = V G; D_n = sum_k a_kn dA_kn / sum_k a_kn. The recomputed a of a
    // pixel all carry the rounding of its fp32 lse (a factor exp(-delta),
    // |delta| up to ulp(lse) / 2), so they need not sum to 1; dividing by
    // their sum cancels that common factor, which would otherwise enter
    // dA - D, a difference that nearly cancels where a is large. Column sums
    // over the 32 thread rows in a fixed order.
    acc_t da[KT][4];
#pragma unroll
    for (int i = 0; i < KT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) da[i][j] = acc_t(0);
    class_rows_gemm<KP>(da, values_b, Cv, K, grad_b, Cv, N, n0, p.vec, stage);
    Pack<acc_t, 4> a[KT];
    acc_t r[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}, sa[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
    for (int i = 0; i < KT; ++i) {
      a[i] = class_lds4(as + (tk + 32 * i) * kClassLd + 4 * tp);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        r[j] += a[i].v[j] * da[i][j];
        sa[j] += a[i].v[j];
      }
    }
    acc_t* rows_r = stage;                      // [32][kClassLd]
    acc_t* rows_a = stage + G::COLSUM;          // [32][kClassLd]
    class_sts4(rows_r + tk * kClassLd + 4 * tp, r);
    class_sts4(rows_a + tk * kClassLd + 4 * tp, sa);
    FASTCTX_SYNC(kSyncClassRowSums);
    acc_t d[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}, norm[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int q = 0; q < 32; ++q) {
      const Pack<acc_t, 4> vr = class_lds4(rows_r + q * kClassLd + 4 * tp);
      const Pack<acc_t, 4> va = class_lds4(rows_a + q * kClassLd + 4 * tp);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        d[j] += vr.v[j];
        norm[j] += va.v[j];
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      d[j] = d[j] / norm[j];
      norm[j] = acc_t(1) / norm[j];
    }

    // dS = scale a (dA - D), a normalised as above, over the attention in
    // shared memory; the logits form's gradient.
#pragma unroll
    for (int i = 0; i < KT; ++i) {
      const int k = tk + 32 * i;
      acc_t ds[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        ds[j] = k < K && n + j < N ? scale * (a[i].v[j] * norm[j] * (da[i][j] - d[j])) : acc_t(0);
      class_sts4(as + k * kClassLd + 4 * tp, ds);
      if (!QUERY && k < K) class_store4(p.grad_logits + (b * K + k) * N + n, N - n, ds, p.vec);
    }
    FASTCTX_SYNC(kSyncAttnScoreGrads);  // dS complete; the column sums read before `stage` is restaged

    if constexpr (QUERY) {
      // grad_query = Keys^T dS;  dk_k += sum_n dS_kn q_n.
      class_mix<KP>(p.grad_query + b * Cq * N, keys_b, Cq, K, as, Cq, N, n0, p.vec, stage);
      class_slot_reduce<KP>(slot, ld, Cv, as, query_b, Cq, N, n0, K, first, p.vec, stage);
    }
  }
}

// grad_values[b, k, c] (c < Cv) and grad_keys[b, k, c - Cv] (c >= Cv) =
// sum over the image's slots, in order. 1-D grid over B * K * (Cv + Cq).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) class_attention_sum_kernel(const acc_t* __restrict__ slot,
                                                                       scalar_t* __restrict__ grad_values,
                                                                       scalar_t* __restrict__ grad_keys, int64_t B,
                                                                       int64_t K, int64_t Cv, int64_t Cq,
                                                                       int64_t parts) {
  const int64_t ld = Cv + Cq, per_image = K * ld;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * per_image) return;
  const int64_t b = i / per_image, e = i - b * per_image, k = e / ld, c = e - k * ld;
  const acc_t* src = slot + b * parts * per_image + e;
  acc_t s = acc_t(0);
  for (int64_t q = 0; q < parts; ++q) s += src[q * per_image];
  if (c < Cv) {
    grad_values[(b * K + k) * Cv + c] = static_cast<scalar_t>(s);
  } else {
    grad_keys[(b * K + k) * Cq + c - Cv] = static_cast<scalar_t>(s);
  }
}

}  // namespace fastctx
