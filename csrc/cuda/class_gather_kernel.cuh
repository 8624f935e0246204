#pragma once
// Device code of class_gather (contract: docs/kernels.md "class_gather";
// maths: fastctx/ops/class_gather.py), and the pixel-tile primitives that
// class_attention's kernels (class_attention_kernel.cuh) share. Tile geometry
// and launch sizes: class_gather_launch.h; the online-softmax merge rules,
// shared with the CPU backend: common/class_context.h.
//
//   "ocr":   lse_k = log sum_n exp(s p_kn);  w_kn = exp(s p_kn - lse_k);  centre_k = sum_n w_kn F_n
//   "paper": p_n = softmax_k(s p_n);  mass_k = sum_n p_kn;  centre_k = sum_n p_kn F_n / mass_k
//
// A tile is kClassTile pixels of one image with all its classes, padded to KP
// rows (32, 64, 128, 256: one instantiation each). NCHW maps are read as rows
// of pixels, so every global access is coalesced along the pixels; a [KP x
// tile] block of weights exists in shared memory only.
//
// Forward, one block per (channel block, pixel chunk, image), walking the
// chunk's tiles: stage probs [KP x tile] and feats [RED_CB x tile]; turn probs
// into weights ("ocr": online softmax over the pixels, one class row per warp:
// the running max and sum per class live in shared memory and the
// accumulators are rescaled when the max grows; "paper": softmax over the
// classes, one pixel column per warp, class masses in registers); then acc
// [KP x RED_CB] += W F^T in registers (4 classes x 8 channels per thread).
// At the end the block writes its partial slot once. class_gather_merge_kernel
// merges a class's slots in chunk order ("ocr" rescales them onto the largest
// shift, common/class_context.h): deterministic, no atomics.
//
// Backward, one block per tile, no sums across pixels: class_gather_prep_kernel
// forms G' = grad ("ocr") or grad / mass ("paper") and offset_k = G'_k .
// centre_k once per call; the tile kernel recomputes the weights, D = G' F
// (class_rows_gemm), grad_probs ("ocr": s w (D - offset); "paper": the softmax
// backward over the classes of D - offset) and grad_feats = G'^T W
// (class_mix). For an "ocr" grad row that is not finite, the offset is the
// reference's own sum_n w_kn G_k . F_n (as the CPU backend does), so NaN and
// inf come out where the eager maths puts them.
#include <cmath>
#include <cstdint>

#include "common/class_context.h"
#include "common/cuda_helpers.cuh"
#include "cuda/class_gather_launch.h"

namespace fastctx {

// Named barriers (FASTCTX_SYNC) of the class-context kernels: those of the
// shared primitives, class_gather's and class_attention's, in one enum so that
// -DFASTCTX_EMU_DROP_BARRIER=<name> compiles with any of them.
enum ClassBarrier : int {
  kSyncClassGemmStaged = 601,
  kSyncClassGemmConsumed,
  kSyncClassMixStaged,
  kSyncClassMixConsumed,
  kSyncClassReduceStaged,
  kSyncClassReduceConsumed,
  kSyncClassRowSums,
  kSyncGatherTileStaged,
  kSyncGatherWeightsReady,
  kSyncGatherTileConsumed,
  kSyncGatherRowSumsConsumed,
  kSyncAttnScoresReady,
  kSyncAttnScoreGrads,
};

// Minimum resident blocks per SM of the tile kernels' __launch_bounds__. Left
// to itself ptxas cuts some instantiations to 64 or 128 registers and spills
// a few bytes for occupancy; with an explicit 1 it keeps every instantiation
// spill-free (up to 240 registers, the attention backward's query form).
constexpr int kClassMinBlocks = 1;

// ---- scalar pieces --------------------------------------------------------

// scale * v rounded on its own, never contracted into an FMA with what
// follows: the forward's softmax and the backward's recomputed weights see
// the same logit.
template <typename acc_t>
__device__ __forceinline__ acc_t class_scaled(acc_t scale, acc_t v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 8) {
    return __dmul_rn(scale, v);
  } else {
    return __fmul_rn(scale, v);
  }
#else
  return scale * v;
#endif
}

template <typename acc_t>
__device__ __forceinline__ acc_t class_neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
__device__ __forceinline__ Pack<acc_t, 4> class_lds4(const acc_t* p) {
  return *reinterpret_cast<const Pack<acc_t, 4>*>(p);
}

template <typename acc_t>
__device__ __forceinline__ void class_sts4(acc_t* p, const acc_t (&v)[4]) {
  *reinterpret_cast<Pack<acc_t, 4>*>(p) = Pack<acc_t, 4>{{v[0], v[1], v[2], v[3]}};
}

// Four consecutive pixels of one row of a global map; `avail` is how many
// exist from p on (may be <= 0). `vec` promises N % 4 == 0 and an aligned map,
// so a quad at a multiple of 4 is aligned and either whole or absent.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void class_load4(acc_t (&v)[4], const scalar_t* __restrict__ p, int64_t avail, bool vec) {
  if (vec && avail >= 4) {
    const Pack<scalar_t, 4> q = *reinterpret_cast<const Pack<scalar_t, 4>*>(p);
#pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = static_cast<acc_t>(q.v[t]);
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = t < avail ? static_cast<acc_t>(p[t]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void class_store4(scalar_t* __restrict__ p, int64_t avail, const acc_t (&v)[4], bool vec) {
  if (vec && avail >= 4) {
    Pack<scalar_t, 4> q;
#pragma unroll
    for (int t = 0; t < 4; ++t) q.v[t] = static_cast<scalar_t>(v[t]);
    *reinterpret_cast<Pack<scalar_t, 4>*>(p) = q;
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (t < avail) p[t] = static_cast<scalar_t>(v[t]);
  }
}

// ---- tile primitives --------------------------------------------------------
// Thread grids (tid = threadIdx.x):
//   gemm    (tk, tp) = (tid / 8, tid % 8): classes tk + 32 i (i < KP / 32), pixels 4 tp + j
//   mix     (tc, tp) = (tid / 8, tid % 8): channels tc + 32 j (j < 4), pixels 4 tp + t
//   reduce  (tk, tc) = (tid / RED_TC, tid % RED_TC): classes tk + RED_TK i (i < 4), channels tc + RED_TC j (j < 8)

// dst[r][j] (row stride kClassLd) <- src[r * N + n0 + j] for r < ROWS,
// j < kClassTile, as acc_t; 0 for rows >= rows_valid and pixels >= N. Each
// row of the tile is one coalesced run.
template <int ROWS, typename scalar_t, typename acc_t>
__device__ __forceinline__ void class_stage_rows(acc_t* __restrict__ dst, const scalar_t* __restrict__ src,
                                                 int64_t N, int64_t n0, int rows_valid, bool vec) {
  constexpr int kQuadsPerRow = kClassTile / 4;
  constexpr int kQuads = ROWS * kQuadsPerRow;
  constexpr int kIters = (kQuads + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int q = it * kThreads + static_cast<int>(threadIdx.x);
    if (kQuads % kThreads == 0 || q < kQuads) {
      const int r = q / kQuadsPerRow, j = q % kQuadsPerRow * 4;
      acc_t v[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      if (r < rows_valid) class_load4(v, src + r * N + n0 + j, N - n0 - j, vec);
      class_sts4(dst + r * kClassLd + j, v);
    }
  }
}

// acc[i][j] += sum_c coef[k][c] x[c][n0 + n] over all C channels, for the
// thread's gemm classes k and pixels n. coef: [rows_valid][C], rows ldc apart
// (rows past rows_valid count as 0); x: the image's [C][N] map. Channels go
// through shared memory CC at a time (coef^T [CC][KP + 1]: conflict-free
// transposing stores; x [CC][kClassLd]), two barriers per chunk (C >= 1: at
// least one, which callers use to order their own shared-memory writes).
template <int KP, typename coef_t, typename scalar_t, typename acc_t>
__device__ __forceinline__ void class_rows_gemm(acc_t (&acc)[KP / 32][4], const coef_t* __restrict__ coef,
                                                int64_t ldc, int rows_valid, const scalar_t* __restrict__ x,
                                                int64_t C, int64_t N, int64_t n0, bool vec, acc_t* smem) {
  using G = ClassTile<KP>;
  constexpr int CC = G::CC, KT = G::GEMM_KT;
  constexpr int kCoef = KP * CC;
  static_assert(kCoef % kThreads == 0, "whole coefficient passes");
  acc_t* cs = smem;                   // coef^T [CC][KP + 1]
  acc_t* xs = smem + CC * (KP + 1);   // x [CC][kClassLd]
  const int tid = threadIdx.x, tk = tid >> 3, tp = tid & 7;
  for (int64_t c0 = 0; c0 < C; c0 += CC) {
    const int cv = C - c0 < CC ? static_cast<int>(C - c0) : CC;
#pragma unroll
    for (int it = 0; it < kCoef / kThreads; ++it) {
      const int e = it * kThreads + tid;
      const int k = e / CC, c = e % CC;  // consecutive threads: consecutive channels of a row
      cs[c * (KP + 1) + k] = k < rows_valid && c < cv ? static_cast<acc_t>(coef[k * ldc + c0 + c]) : acc_t(0);
    }
    class_stage_rows<CC>(xs, x + c0 * N, N, n0, cv, vec);
    FASTCTX_SYNC(kSyncClassGemmStaged);
#pragma unroll 4
    for (int c = 0; c < cv; ++c) {
      const Pack<acc_t, 4> xv = class_lds4(xs + c * kClassLd + 4 * tp);
#pragma unroll
      for (int i = 0; i < KT; ++i) {
        const acc_t a = cs[c * (KP + 1) + tk + 32 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a * xv.v[j];
      }
    }
    FASTCTX_SYNC(kSyncClassGemmConsumed);
  }
}

// out[c][n0 + n] = sum_k coef[k][c] P[k][n] for every channel c < C and the
// tile's pixels inside the image. P: [KP][kClassLd] in shared memory (rows
// rows_valid.. unread); coef: [rows_valid][C], rows ldc apart. Output channels
// kClassMixChannels at a time, coefficient rows through shared memory
// kClassMixRows at a time (ms: [kClassMixRows][kClassMixChannels]). P is
// first read after the first staging barrier, which therefore orders the
// caller's writes of P (rows_valid >= 1).
template <int KP, typename coef_t, typename scalar_t, typename acc_t>
__device__ __forceinline__ void class_mix(scalar_t* __restrict__ out, const coef_t* __restrict__ coef, int64_t ldc,
                                          int rows_valid, const acc_t* P, int64_t C, int64_t N, int64_t n0,
                                          bool vec, acc_t* ms) {
  constexpr int CB = kClassMixChannels, KR = kClassMixRows, CT = CB / 32;
  static_assert(KR * CB % kThreads == 0 && CT == 4, "mix tile");
  const int tid = threadIdx.x, tc = tid >> 3, tp = tid & 7;
  const int64_t n = n0 + 4 * tp;
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    acc_t acc[CT][4];
#pragma unroll
    for (int j = 0; j < CT; ++j)
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[j][t] = acc_t(0);
    for (int k0 = 0; k0 < rows_valid; k0 += KR) {
      const int kv = rows_valid - k0 < KR ? rows_valid - k0 : KR;
#pragma unroll
      for (int it = 0; it < KR * CB / kThreads; ++it) {
        const int e = it * kThreads + tid;
        const int k = e / CB, c = e % CB;
        ms[e] = k < kv && c0 + c < C ? static_cast<acc_t>(coef[(k0 + k) * ldc + c0 + c]) : acc_t(0);
      }
      FASTCTX_SYNC(kSyncClassMixStaged);
#pragma unroll 4
      for (int k = 0; k < kv; ++k) {
        const Pack<acc_t, 4> pv = class_lds4(P + (k0 + k) * kClassLd + 4 * tp);
#pragma unroll
        for (int j = 0; j < CT; ++j) {
          const acc_t m = ms[k * CB + tc + 32 * j];
#pragma unroll
          for (int t = 0; t < 4; ++t) acc[j][t] += m * pv.v[t];
        }
      }
      FASTCTX_SYNC(kSyncClassMixConsumed);
    }
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      const int64_t c = c0 + tc + 32 * j;
      if (c < C) class_store4(out + c * N + n, N - n, acc[j], vec);
    }
  }
}

// acc[i][j] += sum_n P[k][n] X[c][n] over the tile's pixels, for the thread's
// reduce classes k and channels c. P: [KP][kClassLd], X: [RED_CB][kClassLd],
// both in shared memory; at pixels outside the image one of them must be 0
// and both finite.
template <int KP, typename acc_t>
__device__ __forceinline__ void class_pixel_reduce(acc_t (&acc)[4][8], const acc_t* P, const acc_t* X) {
  using G = ClassTile<KP>;
  const int tid = threadIdx.x, tk = tid / G::RED_TC, tc = tid % G::RED_TC;
  // One quad of pixels per step (48 operands next to the 32 accumulators):
  // unrolling further makes ptxas spill the forward kernel.
#pragma unroll 1
  for (int n = 0; n < kClassTile; n += 4) {
    Pack<acc_t, 4> pv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pv[i] = class_lds4(P + (tk + G::RED_TK * i) * kClassLd + n);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const Pack<acc_t, 4> xv = class_lds4(X + (tc + G::RED_TC * j) * kClassLd + n);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int t = 0; t < 4; ++t) acc[i][j] += pv[i].v[t] * xv.v[t];
    }
  }
}

// Softmax over the classes, per pixel column, in place on a [KP][kClassLd]
// tile of raw values v: a_kn = exp(s v_kn - shift_n) / sum_k for k < K, with
// shift_n = softmax_shift(max_k s v_kn), the max ignoring NaN; 0 for the
// padding classes and for pixels outside the image (n >= n_valid). Column
// n = tid / 8 is shared by 8 lanes (classes q + 8 i, q = tid % 8), streamed
// through shared memory three times rather than held in registers. Returns
// the column's log-sum-exp (on all 8 lanes). Non-finite values as
// torch.softmax: a NaN or +inf makes the column NaN, and so does a column of
// only -inf (whose log-sum-exp is -inf).
template <int KP, typename acc_t>
__device__ __forceinline__ acc_t class_column_softmax(acc_t* tile, int K, int n_valid, acc_t scale) {
  constexpr int CI = KP / 8;
  const int tid = threadIdx.x, n = tid >> 3, q = tid & 7;
  acc_t* col = tile + q * kClassLd + n;  // class q + 8 i at col[8 i kClassLd]
  const int kv = K - q;                  // classes of this lane: i * 8 < kv
  acc_t m = class_neg_inf<acc_t>();
#pragma unroll 4
  for (int i = 0; i < CI; ++i) {
    const acc_t v = class_scaled(scale, col[8 * i * kClassLd]);
    if (8 * i < kv && v > m) m = v;
  }
  // Every lane's m is NaN-free, so the butterfly leaves the same value in all.
  const acc_t shift = softmax_shift(warp_max<8>(m));
  acc_t sum = acc_t(0);
#pragma unroll 4
  for (int i = 0; i < CI; ++i) {
    acc_t* v = col + 8 * i * kClassLd;
    const acc_t e = 8 * i < kv ? class_exp(class_scaled(scale, *v) - shift) : acc_t(0);
    *v = e;
    sum += e;
  }
  sum = warp_sum<8>(sum);
  const bool in = n < n_valid;
#pragma unroll 4
  for (int i = 0; i < CI; ++i) {
    acc_t* v = col + 8 * i * kClassLd;
    *v = in && 8 * i < kv ? *v / sum : acc_t(0);
  }
  return shift + class_log(sum);
}

// ---- class_gather kernels -----------------------------------------------------

template <typename scalar_t, typename acc_t>
struct ClassGatherFwdParams {
  const scalar_t* feats;  // [B, C, N]
  const scalar_t* probs;  // [B, K, N]
  acc_t* part;            // [B, parts, K, C]: weighted feature sums of each pixel chunk
  acc_t* part_sum;        // [B, parts, K]: sums of the weights ("ocr": relative to the shift; "paper": masses)
  acc_t* part_shift;      // [B, parts, K]: "ocr" shifts (softmax_shift of the chunk's max)
  int64_t C, N;
  int64_t tiles, parts, cblocks;
  int K;
  acc_t scale;
  bool ocr;
  bool vec;
};

// One block per (channel block cb, pixel chunk, image): blockIdx.x = chunk *
// cblocks + cb (the blocks sharing a chunk's probs tiles run together),
// blockIdx.y = image. The per-class online-softmax state lives in registers
// of the class's row threads (row layout: class tid / TR, pixels
// [q PPT, (q + 1) PPT) of the tile, q = tid % TR), replicated over its TR
// lanes.
template <typename scalar_t, typename acc_t, int KP>
__global__ void __launch_bounds__(kThreads, kClassMinBlocks) class_gather_fwd_kernel(const ClassGatherFwdParams<scalar_t, acc_t> p) {
  using G = ClassTile<KP>;
  constexpr int CB = G::RED_CB, TR = kThreads / KP, PPT = kClassTile / TR;
  static_assert(PPT % 4 == 0, "row layout reads whole quads");
  acc_t* smem = dynamic_smem<acc_t>();
  acc_t* ws = smem;             // [KP][kClassLd]: probs, then weights
  acc_t* xs = ws + G::TILE;     // [CB][kClassLd]: feats
  acc_t* alpha = xs + G::RED;   // [KP] "ocr": the tile's rescale factor of the accumulators
  const int tid = threadIdx.x, row_k = tid / TR, row_q = tid % TR;
  const int64_t cb = blockIdx.x % p.cblocks, chunk = blockIdx.x / p.cblocks, b = blockIdx.y;
  const int64_t C = p.C, N = p.N;
  const int K = p.K;
  const int64_t c0 = cb * CB;
  const int cv = C - c0 < CB ? static_cast<int>(C - c0) : CB;
  // parts <= tiles: every chunk owns at least one tile and fills its slot.
  const int64_t t0 = tile_split_begin(chunk, p.tiles, p.parts), t1 = tile_split_begin(chunk + 1, p.tiles, p.parts);
  const scalar_t* probs_b = p.probs + b * K * N;
  const scalar_t* feats_b = p.feats + (b * C + c0) * N;
  acc_t* row = ws + row_k * kClassLd + row_q * PPT;

  // Class row_k: "ocr" running max of s probs (NaN ignored) and sum of
  // exp(s probs - softmax_shift(max)); "paper" mass.
  acc_t run_max = class_neg_inf<acc_t>(), run_sum = acc_t(0);
  acc_t acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kClassTile;
    const int n_valid = N - n0 < kClassTile ? static_cast<int>(N - n0) : kClassTile;
    class_stage_rows<KP>(ws, probs_b, N, n0, K, p.vec);
    class_stage_rows<CB>(xs, feats_b, N, n0, cv, p.vec);
    FASTCTX_SYNC(kSyncGatherTileStaged);
    if (p.ocr) {
      // Online softmax over the pixels.
      const int pv = row_k < K ? n_valid - row_q * PPT : 0;  // this thread's pixels in the image
      acc_t m = class_neg_inf<acc_t>();
#pragma unroll
      for (int j = 0; j < PPT; j += 4) {
        const Pack<acc_t, 4> v = class_lds4(row + j);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const acc_t x = class_scaled(p.scale, v.v[u]);
          if (j + u < pv && x > m) m = x;  // ignores NaN (lanes must agree); NaN reaches the sum through exp
        }
      }
      m = warp_max<TR>(m);
      const acc_t new_max = m > run_max ? m : run_max;
      const acc_t shift = softmax_shift(new_max);
      // exp(run_max - shift): 0 while the class has seen only -inf (its sums
      // are 0), <= 1 otherwise, NaN once the max is +inf.
      const acc_t rescale = class_exp(run_max - shift);
      acc_t s = acc_t(0);
#pragma unroll
      for (int j = 0; j < PPT; j += 4) {
        const Pack<acc_t, 4> v = class_lds4(row + j);
        acc_t w[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          w[u] = j + u < pv ? class_exp(class_scaled(p.scale, v.v[u]) - shift) : acc_t(0);
          s += w[u];
        }
        class_sts4(row + j, w);
      }
      run_sum = run_sum * rescale + warp_sum<TR>(s);
      run_max = new_max;
      if (row_q == 0) alpha[row_k] = rescale;
    } else {
      class_column_softmax<KP>(ws, K, n_valid, p.scale);
    }
    FASTCTX_SYNC(kSyncGatherWeightsReady);
    if (p.ocr) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const acc_t f = alpha[tid / G::RED_TC + G::RED_TK * i];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] *= f;
      }
    } else {
      acc_t s = acc_t(0);  // weights outside the image are 0
#pragma unroll
      for (int j = 0; j < PPT; j += 4) {
        const Pack<acc_t, 4> v = class_lds4(row + j);
        s += (v.v[0] + v.v[1]) + (v.v[2] + v.v[3]);
      }
      run_sum += warp_sum<TR>(s);
    }
    class_pixel_reduce<KP>(acc, ws, xs);
    FASTCTX_SYNC(kSyncGatherTileConsumed);
  }

  const int64_t slot = b * p.parts + chunk;
  acc_t* out = p.part + slot * K * C + c0;
  const int tk = tid / G::RED_TC, tc = tid % G::RED_TC;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = tk + G::RED_TK * i;
    if (k < K) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int c = tc + G::RED_TC * j;
        if (c < cv) out[k * C + c] = acc[i][j];
      }
    }
  }
  // Every channel block computed the same per-class sums; the first writes them.
  if (cb == 0 && row_q == 0 && row_k < K) {
    p.part_sum[slot * K + row_k] = run_sum;
    if (p.ocr) p.part_shift[slot * K + row_k] = softmax_shift(run_max);
  }
}

// centres[b, k, c] = sum_j f_j part[b, j, k, c] / sum_j f_j part_sum[b, j, k]
// over the chunks j in order, f_j = 1 ("paper") or the online-softmax rescale
// onto the largest shift ("ocr", common/class_context.h); stat = the
// log-sum-exp ("ocr") or the mass ("paper"). 1-D grid: kThreads channels of
// one (image, class) per block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) class_gather_merge_kernel(
    const acc_t* __restrict__ part, const acc_t* __restrict__ part_sum, const acc_t* __restrict__ part_shift,
    scalar_t* __restrict__ centres, acc_t* __restrict__ stat, int64_t C, int K, int64_t parts, bool ocr) {
  const int64_t c_blocks = tile_ceil_div(C, kThreads);
  const int64_t row = blockIdx.x / c_blocks;  // b * K + k
  const int64_t c = (blockIdx.x - row * c_blocks) * kThreads + threadIdx.x;
  const int64_t b = row / K, k = row - b * K;
  const acc_t* sums = part_sum + b * parts * K + k;  // chunk j at j * K
  const acc_t* shifts = part_shift + b * parts * K + k;
  const acc_t merged = ocr ? softmax_merge_shift(shifts, sums, parts, K) : acc_t(0);
  acc_t total = acc_t(0), acc = acc_t(0);
  for (int64_t j = 0; j < parts; ++j) {
    // Every chunk is added, also with factor 0: a 0 weight times an infinite
    // feature is NaN in the reference's product too.
    const acc_t f = ocr ? softmax_merge_factor(shifts[j * K], sums[j * K], merged) : acc_t(1);
    total += f * sums[j * K];
    if (c < C) acc += f * part[((b * parts + j) * K + k) * C + c];
  }
  if (c < C) centres[row * C + c] = static_cast<scalar_t>(acc / total);
  if (c == 0) stat[row] = ocr ? merged + class_log(total) : total;
}

template <typename scalar_t, typename acc_t>
struct ClassGatherBwdParams {
  const scalar_t* grad;     // [B, K, C]
  const scalar_t* feats;    // [B, C, N]
  const scalar_t* probs;    // [B, K, N]
  const scalar_t* centres;  // [B, K, C]
  const acc_t* stat;        // [B, K]: lse ("ocr") or mass ("paper")
  acc_t* gs;                // [B, K, C]: G' = grad ("ocr") or grad / mass ("paper")
  acc_t* offset;            // [B, K]: G'_k . centre_k
  scalar_t* grad_feats;     // [B, C, N]
  scalar_t* grad_probs;     // [B, K, N]
  int64_t B, C, N;
  int K;
  acc_t scale;
  bool ocr;
  bool vec;
};

// G' and offset, one warp per (image, class) row; 1-D grid of kWarps rows per block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) class_gather_prep_kernel(const ClassGatherBwdParams<scalar_t, acc_t> p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.B * p.K) return;  // whole warps
  const int64_t C = p.C;
  const acc_t inv_mass = p.ocr ? acc_t(1) : acc_t(1) / p.stat[row];
  acc_t dot = acc_t(0), nonfinite = acc_t(0);
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t g = static_cast<acc_t>(p.grad[row * C + c]) * inv_mass;
    p.gs[row * C + c] = g;
    dot += g * static_cast<acc_t>(p.centres[row * C + c]);
    nonfinite += g - g;  // NaN iff some g is +-inf or NaN
  }
  dot = warp_sum(dot);
  if (p.ocr && !(warp_sum(nonfinite) == acc_t(0))) {
    // G . centre would put +-inf where the reference's sum over the pixels,
    // sum_n w_n G . F_n, has inf - inf = NaN: take that sum itself (rare and
    // slow: a pass over the image's feats).
    const int64_t N = p.N, b = row / p.K;
    const scalar_t* feats_b = p.feats + b * C * N;
    const scalar_t* probs_k = p.probs + row * N;
    const acc_t lse = p.stat[row];
    acc_t s = acc_t(0);
    for (int64_t n = lane; n < N; n += 32) {
      acc_t d = acc_t(0);
      for (int64_t c = 0; c < C; ++c) d += static_cast<acc_t>(p.grad[row * C + c]) * static_cast<acc_t>(feats_b[c * N + n]);
      s += class_exp(class_scaled(p.scale, static_cast<acc_t>(probs_k[n])) - lse) * d;
    }
    dot = warp_sum(s);
  }
  if (lane == 0) p.offset[row] = dot;
}

// One block per (pixel tile, image).
template <typename scalar_t, typename acc_t, int KP>
__global__ void __launch_bounds__(kThreads, kClassMinBlocks) class_gather_bwd_kernel(const ClassGatherBwdParams<scalar_t, acc_t> p) {
  using G = ClassTile<KP>;
  constexpr int KT = G::GEMM_KT;
  acc_t* smem = dynamic_smem<acc_t>();
  acc_t* ws = smem;              // [KP][kClassLd]: probs, then weights
  acc_t* stage = ws + G::TILE;   // class_rows_gemm staging, then column sums, then class_mix staging
  const int tid = threadIdx.x, tk = tid >> 3, tp = tid & 7;
  const int64_t b = blockIdx.y, n0 = static_cast<int64_t>(blockIdx.x) * kClassTile;
  const int64_t C = p.C, N = p.N;
  const int K = p.K;
  const acc_t* gs_b = p.gs + b * K * C;

  class_stage_rows<KP>(ws, p.probs + b * K * N, N, n0, K, p.vec);
  FASTCTX_SYNC(kSyncGatherTileStaged);
  // The weights, recomputed as the forward computed them; 0 outside the image.
  const int n_valid = N - n0 < kClassTile ? static_cast<int>(N - n0) : kClassTile;
  if (p.ocr) {
    // exp(s probs - lse_k): column n = tid / 8, classes q + 8 i.
    const int n = tid >> 3, q = tid & 7;
    for (int k = q; k < KP; k += 8) {
      acc_t* v = ws + k * kClassLd + n;
      *v = k < K && n < n_valid ? class_exp(class_scaled(p.scale, *v) - p.stat[b * K + k]) : acc_t(0);
    }
  } else {
    class_column_softmax<KP>(ws, K, n_valid, p.scale);
  }

  // dp = G' F - offset, [KP x tile] in registers (gemm grid); the gemm's
  // first staging barrier orders the weights before their reads below.
  acc_t dp[KT][4];
#pragma unroll
  for (int i = 0; i < KT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) dp[i][j] = acc_t(0);
  class_rows_gemm<KP>(dp, gs_b, C, K, p.feats + b * C * N, C, N, n0, p.vec, stage);
  Pack<acc_t, 4> w[KT];
#pragma unroll
  for (int i = 0; i < KT; ++i) {
    const int k = tk + 32 * i;
    const acc_t off = k < K ? p.offset[b * K + k] : acc_t(0);
    w[i] = class_lds4(ws + k * kClassLd + 4 * tp);
#pragma unroll
    for (int j = 0; j < 4; ++j) dp[i][j] -= off;
  }
  if (!p.ocr) {
    // Softmax backward over the classes: dp - sum_k w_k dp_k, the column sums
    // over the 32 thread rows in a fixed order.
    acc_t r[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
    for (int i = 0; i < KT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) r[j] += w[i].v[j] * dp[i][j];
    class_sts4(stage + tk * kClassLd + 4 * tp, r);
    FASTCTX_SYNC(kSyncClassRowSums);
    acc_t col[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int t = 0; t < 32; ++t) {
      const Pack<acc_t, 4> v = class_lds4(stage + t * kClassLd + 4 * tp);
#pragma unroll
      for (int j = 0; j < 4; ++j) col[j] += v.v[j];
    }
#pragma unroll
    for (int i = 0; i < KT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dp[i][j] -= col[j];
  }
  const int64_t n = n0 + 4 * tp;
#pragma unroll
  for (int i = 0; i < KT; ++i) {
    const int k = tk + 32 * i;
    if (k < K) {
      acc_t g[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] = p.scale * (w[i].v[j] * dp[i][j]);
      class_store4(p.grad_probs + (b * K + k) * N + n, N - n, g, p.vec);
    }
  }
  FASTCTX_SYNC(kSyncGatherRowSumsConsumed);  // before class_mix restages `stage`

  // grad_feats = G'^T W.
  class_mix<KP>(p.grad_feats + b * C * N, gs_b, C, K, ws, C, N, n0, p.vec, stage);
}

}  // namespace fastctx
