#pragma once
// Device code of gla_context: the affinity-weighted context of APCNet's ACM
// for all groups (pool scales) at once (contract: docs/kernels.md). Launch
// geometry, shared-memory sizes and the grouping into launches:
// gla_context_launch.h.
//
//   L = X_g^T W_g^T + bias_g   [pixels x S_g]      A = sigmoid(L)
//   Z_g = P_g A^T              [C x pixels]
//
// Forward: one block per (pixel tile, group, image). The logits of the tile
// are accumulated in registers over channel chunks of X and W staged in shared
// memory, turned into A in shared memory, and Z is produced per output-channel
// chunk and written coalesced along the pixels. A never leaves the block.
//
// Backward: the same blocks (each walking a contiguous range of pixel tiles)
// recompute A, form dA = dZ^T P and dL = dA * A(1-A) per tile, write grad_x
// per tile, and add the tile's grad_weight / grad_pooled / grad_bias
// contributions into a partial slice owned by the block (fp32, in global
// memory). sum_partials_kernel sums the slices in a fixed order. No float
// atomics: results are bitwise reproducible.
//
// All GEMMs are SIMT outer products with register blocking: 8 warps split the
// k (affinity) rows or the output channels, the 32 lanes split the pixels.
// Groups of up to 64 rows keep their k fragment in registers; larger groups
// loop over 64-row chunks, bounded only by the shared-memory A tile
// (kGlaMaxGroupSize). The per-thread k width KJ is a template parameter.
#include <cstdint>

#include "common/activation.h"
#include "common/cuda_helpers.cuh"
#include "common/partials.cuh"
#include "cuda/gla_context_launch.h"

namespace fastctx {

// Named barriers (FASTCTX_SYNC).
enum GlaBarrier : int {
  kSyncGlaLogitStaged = 301,
  kSyncGlaLogitConsumed,
  kSyncGlaAffinityReady,
  kSyncGlaMixStaged,
  kSyncGlaMixConsumed,
  kSyncGlaGradTilesReady,
  kSyncGlaWeightConsumed,
  kSyncGlaWeightStaged,
  kSyncGlaChunkConsumed,
};

// Shared-memory fragment access with the widest aligned vector the length allows
// (callers keep offsets multiples of the fragment length).
template <int K, typename T>
__device__ __forceinline__ void lds(T (&v)[K], const T* p) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  if constexpr (K % kVec == 0) {
#pragma unroll
    for (int i = 0; i < K / kVec; ++i) {
      const Pack<T, kVec> q = reinterpret_cast<const Pack<T, kVec>*>(p)[i];
#pragma unroll
      for (int t = 0; t < kVec; ++t) v[i * kVec + t] = q.v[t];
    }
  } else if constexpr (K % 2 == 0) {
#pragma unroll
    for (int i = 0; i < K / 2; ++i) {
      const Pack<T, 2> q = reinterpret_cast<const Pack<T, 2>*>(p)[i];
      v[2 * i] = q.v[0];
      v[2 * i + 1] = q.v[1];
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = p[i];
  }
}

template <int K, typename T>
__device__ __forceinline__ void sts(T* p, const T (&v)[K]) {
  if constexpr (K == 4 && sizeof(T) == 4) {
    *reinterpret_cast<Pack<T, 4>*>(p) = Pack<T, 4>{{v[0], v[1], v[2], v[3]}};
  } else if constexpr (K % 2 == 0) {
#pragma unroll
    for (int i = 0; i < K / 2; ++i) *reinterpret_cast<Pack<T, 2>*>(p + 2 * i) = Pack<T, 2>{{v[2 * i], v[2 * i + 1]}};
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) p[i] = v[i];
  }
}

// Four consecutive pixels of one row from global memory; `avail` is how many
// exist from p on (may be <= 0). `vec` promises N % 4 == 0 and an aligned
// tensor base, so every quad is aligned and either whole or absent.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void ldg4(acc_t (&v)[4], const scalar_t* __restrict__ p, int64_t avail, bool vec) {
  if (vec && avail >= 4) {
    const Pack<scalar_t, 4> q = *reinterpret_cast<const Pack<scalar_t, 4>*>(p);
#pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = static_cast<acc_t>(q.v[t]);
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t) v[t] = t < avail ? static_cast<acc_t>(p[t]) : acc_t(0);
  }
}

template <int TM, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stg(scalar_t* __restrict__ p, int64_t avail, const acc_t (&v)[TM], bool vec) {
  if (vec && avail >= TM) {
    Pack<scalar_t, TM> q;
#pragma unroll
    for (int t = 0; t < TM; ++t) q.v[t] = static_cast<scalar_t>(v[t]);
    *reinterpret_cast<Pack<scalar_t, TM>*>(p) = q;
  } else {
#pragma unroll
    for (int t = 0; t < TM; ++t)
      if (t < avail) p[t] = static_cast<scalar_t>(v[t]);
  }
}

// dst[r][j] (row stride ld) <- src[r * N + n0 + j] for r < ROWS, j < TN;
// rows >= rows_valid and pixels >= N read as 0. Coalesced along pixels.
template <int ROWS, int TN, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_pixels(acc_t* __restrict__ dst, int ld, const scalar_t* __restrict__ src,
                                             int64_t N, int64_t n0, int rows_valid, bool vec) {
  constexpr int kQuadsPerRow = TN / 4;
  constexpr int kQuads = ROWS * kQuadsPerRow;
  static_assert(kQuads % kThreads == 0, "whole passes");
#pragma unroll
  for (int it = 0; it < kQuads / kThreads; ++it) {
    const int q = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = q / kQuadsPerRow;
    const int j = (q % kQuadsPerRow) * 4;
    acc_t v[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (r < rows_valid) ldg4(v, src + r * N + n0 + j, N - n0 - j, vec);
    sts<4>(dst + r * ld + j, v);
  }
}

// Logit coefficients of one channel chunk: dst[r][k] (row stride KS + kGlaPad)
// <- src[r * r_stride + k * k_stride], zero outside rows_valid x k_valid.
// K_FAST walks k across threads (pooled: k is the unit stride), otherwise r
// (weight: the channel is the unit stride), so global reads stay coalesced.
// Indices stay 32-bit: weight and one image's pooled have S_tot * C < 2^31
// elements (checked on the host).
template <int KS, bool K_FAST, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_coef(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int r_stride,
                                           int k_stride, int rows_valid, int k_valid) {
  constexpr int kLd = KS + kGlaPad;
  for (int e = threadIdx.x; e < kGlaChanChunk * KS; e += kThreads) {
    const int r = K_FAST ? e / KS : e % kGlaChanChunk;
    const int k = K_FAST ? e % KS : e / kGlaChanChunk;
    acc_t v = acc_t(0);
    if (r < rows_valid && k < k_valid) v = static_cast<acc_t>(src[r * r_stride + k * k_stride]);
    dst[r * kLd + k] = v;
  }
}

// Mixing coefficients of one output-channel chunk: dst[k][c] (row stride
// kGlaOutChunk + kGlaPad) <- src[k * k_stride + c * c_stride] for k < k_rows,
// zero for c >= c_valid. K_FAST as above.
template <bool K_FAST, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_mix(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int k_stride,
                                          int c_stride, int k_rows, int c_valid) {
  constexpr int kLd = kGlaOutChunk + kGlaPad;
  const int n = k_rows * kGlaOutChunk;
#pragma unroll 2
  for (int e = threadIdx.x; e < n; e += kThreads) {
    const int k = K_FAST ? e % k_rows : e / kGlaOutChunk;
    const int c = K_FAST ? e / k_rows : e % kGlaOutChunk;
    dst[k * kLd + c] = c < c_valid ? static_cast<acc_t>(src[k * k_stride + c * c_stride]) : acc_t(0);
  }
}

// acc[i][j] += sum_r xs[r][lane*TM + i] * cs[r][warp*KJ + j] over one channel chunk.
template <int TM, int KJ, typename acc_t>
__device__ __forceinline__ void logit_mma(acc_t (&acc)[TM][KJ], const acc_t* xs, int ld_x, const acc_t* cs) {
  constexpr int kLd = 8 * KJ + kGlaPad;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t* pa = xs + lane * TM;
  const acc_t* pb = cs + warp * KJ;
#pragma unroll 2
  for (int r = 0; r < kGlaChanChunk; ++r) {
    acc_t a[TM], b[KJ];
    lds(a, pa + r * ld_x);
    lds(b, pb + r * kLd);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < KJ; ++j) acc[i][j] += a[i] * b[j];
  }
}

// Logits (before bias) of a tile for one k chunk: acc[i][j] =
// sum_c act[c][n0 + lane*TM + i] * coef(c, warp*KJ + j), over all C channels.
template <int TN, int KJ, bool COEF_K_FAST, typename scalar_t, typename acc_t>
__device__ __forceinline__ void logit_pass(acc_t (&acc)[TN / 32][KJ], const scalar_t* act, int64_t N, int64_t n0,
                                           bool vec, const scalar_t* coef, int coef_r_stride,
                                           int coef_k_stride, int C, int k_valid, acc_t* xs, acc_t* cs) {
  constexpr int TM = TN / 32;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < KJ; ++j) acc[i][j] = acc_t(0);
  for (int c0 = 0; c0 < C; c0 += kGlaChanChunk) {
    const int cv = min(kGlaChanChunk, C - c0);
    stage_pixels<kGlaChanChunk, TN>(xs, TN, act + c0 * N, N, n0, cv, vec);
    stage_coef<8 * KJ, COEF_K_FAST>(cs, coef + c0 * coef_r_stride, coef_r_stride, coef_k_stride, cv, k_valid);
    FASTCTX_SYNC(kSyncGlaLogitStaged);
    logit_mma(acc, xs, TN, cs);
    FASTCTX_SYNC(kSyncGlaLogitConsumed);
  }
}

// A^T rows [0, kv) of one pixel tile for kv consecutive affinity rows:
// sigmoid(W x + bias) over all C channels, written to As[k][TN]. The forward
// and the backward (which recomputes A rather than storing it) share it.
template <int TN, int KJ, typename scalar_t, typename acc_t>
__device__ __forceinline__ void affinity_rows(acc_t* As, const scalar_t* xg, int64_t N, int64_t n0, bool vec,
                                              const scalar_t* w_rows, const scalar_t* bias_rows, int C, int kv,
                                              acc_t* xs, acc_t* cs) {
  constexpr int TM = TN / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc_t acc[TM][KJ];
  logit_pass<TN, KJ, false>(acc, xg, N, n0, vec, w_rows, 1, C, C, kv, xs, cs);
#pragma unroll
  for (int j = 0; j < KJ; ++j) {
    const int k = warp * KJ + j;
    if (k < kv) {
      const acc_t bv = static_cast<acc_t>(bias_rows[k]);
      acc_t a[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = stable_sigmoid(acc[i][j] + bv);
      sts(As + k * TN + lane * TM, a);
    }
  }
}

// acc[i][j] += sum_k mix[k][lane*TM + i] * coef[k][warp*8 + j] for k < k_count.
template <int TM, typename acc_t>
__device__ __forceinline__ void mix_rows(acc_t (&acc)[TM][8], const acc_t* mix, int ld_mix, const acc_t* coef,
                                         int k_count) {
  constexpr int kLd = kGlaOutChunk + kGlaPad;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t* pa = mix + lane * TM;
  const acc_t* pb = coef + warp * 8;
#pragma unroll 2
  for (int k = 0; k < k_count; ++k) {
    acc_t a[TM], b[8];
    lds(a, pa + k * ld_mix);
    lds(b, pb + k * kLd);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
  }
}

// r[j][t] = sum_n rows[j][n] * chans[32 t][n] over the TN pixels of a tile:
// the thread's KJ k rows (row stride TN) against channels lane and lane + 32
// (row stride ld_c, pre-offset by lane). Reduces over pixels for the
// grad_weight / grad_pooled contributions.
template <int KJ, int TN, typename acc_t>
__device__ __forceinline__ void pixel_reduce(acc_t (&r)[KJ][2], const acc_t* rows, const acc_t* chans, int ld_c) {
#pragma unroll
  for (int j = 0; j < KJ; ++j) r[j][0] = r[j][1] = acc_t(0);
#pragma unroll 1
  for (int n = 0; n < TN; n += 4) {
    acc_t d[KJ][4], x[2][4];
#pragma unroll
    for (int j = 0; j < KJ; ++j) lds(d[j], rows + j * TN + n);
#pragma unroll
    for (int t = 0; t < 2; ++t) lds(x[t], chans + t * 32 * ld_c + n);
#pragma unroll
    for (int j = 0; j < KJ; ++j)
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int q = 0; q < 4; ++q) r[j][t] += d[j][q] * x[t][q];
  }
}

// Adds (or, for the block's first tile, stores) r into rows k0 + j < S,
// columns c and c + 32 < C of a [S_g][C] partial slice.
template <int KJ, typename acc_t>
__device__ __forceinline__ void store_partial(acc_t* __restrict__ part, const acc_t (&r)[KJ][2], int k0, int S,
                                              int64_t C, int64_t c, bool first) {
#pragma unroll
  for (int j = 0; j < KJ; ++j) {
    if (k0 + j >= S) break;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int64_t cc = c + 32 * t;
      if (cc < C) {
        acc_t* q = part + (k0 + j) * C + cc;
        *q = first ? r[j][t] : *q + r[j][t];
      }
    }
  }
}

// Resident blocks per SM the float kernels are compiled for: the forward fits
// 80 registers (3 blocks), the backward 128 (2 blocks), without spills. The
// fp64 instantiation exists for completeness and may use more registers
// rather than spill.
template <typename acc_t, int kFloatBlocks>
constexpr int gla_min_blocks() {
  return sizeof(acc_t) > 4 ? 1 : kFloatBlocks;
}

__device__ __forceinline__ int gla_pick(const int (&arr)[kGlaMaxGroups], int idx) {
  int v = arr[0];
#pragma unroll
  for (int i = 1; i < kGlaMaxGroups; ++i)
    if (i == idx) v = arr[i];
  return v;
}

template <typename scalar_t>
struct GlaFwdParams {
  const scalar_t* x;       // [B, G*C, N]
  const scalar_t* weight;  // [S_tot, C]
  const scalar_t* bias;    // [B, S_tot]
  const scalar_t* pooled;  // [B, C, S_tot]
  scalar_t* z;             // [B, G*C, N]
  GroupTable groups;
  int64_t N;
  int G;
  int C;
  int S_tot;
  int rows_alloc;  // rows of the shared affinity tile (gla_padded_rows of the launch's largest group)
  bool vec;        // N % 4 == 0 and 16-byte aligned x / z
};

template <int KJ, typename scalar_t, typename acc_t>
__device__ __forceinline__ void fwd_tile(const GlaFwdParams<scalar_t>& p, int S, int o, const scalar_t* xg,
                                         scalar_t* zg, const scalar_t* bias_b, const scalar_t* pooled_b,
                                         int64_t n0, acc_t* smem) {
  constexpr int TN = kGlaFwdTile, TM = TN / 32, KS = 8 * KJ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.N;
  const int C = p.C;
  acc_t* As = smem;                         // [rows_alloc][TN]: A^T of the tile
  acc_t* stage = smem + p.rows_alloc * TN;  // staging, reused by both phases
  acc_t* xs = stage;                        // [kGlaChanChunk][TN]
  acc_t* cs = stage + kGlaChanChunk * TN;   // [kGlaChanChunk][KS + kGlaPad]
  acc_t* ps = stage;                        // [S][kGlaOutChunk + kGlaPad]

  for (int kb = 0; kb < S; kb += KS) {
    const int kv = min(KS, S - kb);
    affinity_rows<TN, KJ>(As + kb * TN, xg, N, n0, p.vec, p.weight + static_cast<int64_t>(o + kb) * C,
                          bias_b + o + kb, C, kv, xs, cs);
  }
  FASTCTX_SYNC(kSyncGlaAffinityReady);

  for (int c0 = 0; c0 < C; c0 += kGlaOutChunk) {
    const int cv = min(kGlaOutChunk, C - c0);
    stage_mix<true>(ps, pooled_b + static_cast<int64_t>(c0) * p.S_tot + o, 1, p.S_tot, S, cv);
    FASTCTX_SYNC(kSyncGlaMixStaged);
    acc_t acc[TM][8];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);
    mix_rows(acc, As, TN, ps, S);
    const int64_t n = n0 + lane * TM;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = warp * 8 + j;
      if (c < cv) {
        acc_t v[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i) v[i] = acc[i][j];
        stg(zg + (c0 + c) * N + n, N - n, v, p.vec);
      }
    }
    FASTCTX_SYNC(kSyncGlaMixConsumed);
  }
}

// One block per (pixel tile, group of this launch, image).
template <typename scalar_t, typename acc_t, int KJ>
__global__ void __launch_bounds__(kThreads, gla_min_blocks<acc_t, 3>())
    gla_fwd_kernel(const GlaFwdParams<scalar_t> p) {
  acc_t* smem = dynamic_smem<acc_t>();
  const int g = gla_pick(p.groups.group, blockIdx.y);
  const int S = gla_pick(p.groups.size, blockIdx.y);
  const int o = gla_pick(p.groups.offset, blockIdx.y);
  const int64_t b = blockIdx.z;
  const int64_t plane0 = (b * p.G + g) * p.C;  // first channel plane of the group
  const scalar_t* xg = p.x + plane0 * p.N;
  scalar_t* zg = p.z + plane0 * p.N;
  const scalar_t* bias_b = p.bias + b * p.S_tot;
  const scalar_t* pooled_b = p.pooled + b * p.C * p.S_tot;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGlaFwdTile;
  fwd_tile<KJ>(p, S, o, xg, zg, bias_b, pooled_b, n0, smem);
}

template <typename scalar_t, typename acc_t>
struct GlaBwdParams {
  const scalar_t* grad;    // dZ [B, G*C, N]
  const scalar_t* x;       // [B, G*C, N]
  const scalar_t* weight;  // [S_tot, C]
  const scalar_t* bias;    // [B, S_tot]
  const scalar_t* pooled;  // [B, C, S_tot]
  scalar_t* grad_x;        // [B, G*C, N]
  acc_t* part_w;           // [B, nblk, S_tot, C]  grad_weight partials
  acc_t* part_p;           // [B, nblk, S_tot, C]  grad_pooled partials (transposed)
  acc_t* part_b;           // [B, nblk, S_tot]     grad_bias partials
  GroupTable groups;
  int64_t N;
  int64_t tiles;  // pixel tiles per image
  int nblk;       // blocks sharing an image's tiles
  int G;
  int C;
  int S_tot;
  int rows_alloc;
  bool vec;
};

template <int KJ, typename scalar_t, typename acc_t>
__device__ __forceinline__ void bwd_tile(const GlaBwdParams<scalar_t, acc_t>& p, int S, int o, const scalar_t* xg,
                                         const scalar_t* dzg, scalar_t* gxg, const scalar_t* bias_b,
                                         const scalar_t* pooled_b, acc_t* part_w, acc_t* part_p, acc_t* part_b,
                                         int64_t n0, bool first, acc_t* smem) {
  constexpr int TN = kGlaBwdTile, TM = TN / 32, KS = 8 * KJ, kLdT = TN + kGlaPad;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.N;
  const int C = p.C;
  acc_t* As = smem;                        // [rows_alloc][TN]: A^T
  acc_t* dLs = As + p.rows_alloc * TN;     // [rows_alloc][TN]: dL^T
  acc_t* stage = dLs + p.rows_alloc * TN;
  acc_t* xs = stage;                       // logits: [kGlaChanChunk][TN]
  acc_t* cs = stage + kGlaChanChunk * TN;  // logits: [kGlaChanChunk][KS + kGlaPad]
  acc_t* xc = stage;                       // channel chunk of x: [kGlaOutChunk][TN + kGlaPad]
  acc_t* dzc = xc + kGlaOutChunk * kLdT;   // channel chunk of dZ: [kGlaOutChunk][TN + kGlaPad]
  acc_t* ws = dzc + kGlaOutChunk * kLdT;   // weight rows: [<= kGlaMaxKChunk][kGlaOutChunk + kGlaPad]

  // A and dL = (dZ^T P) * A(1-A), per k chunk. Each thread re-reads only the
  // A values it wrote itself, so no barrier is needed between the two passes.
  for (int kb = 0; kb < S; kb += KS) {
    const int kv = min(KS, S - kb);
    affinity_rows<TN, KJ>(As + kb * TN, xg, N, n0, p.vec, p.weight + static_cast<int64_t>(o + kb) * C,
                          bias_b + o + kb, C, kv, xs, cs);
    acc_t acc[TM][KJ];
    logit_pass<TN, KJ, true>(acc, dzg, N, n0, p.vec, pooled_b + o + kb, p.S_tot, 1, C, kv, xs, cs);
#pragma unroll
    for (int j = 0; j < KJ; ++j) {
      const int k = warp * KJ + j;
      if (k < kv) {
        acc_t a[TM], dl[TM];
        lds(a, As + (kb + k) * TN + lane * TM);
#pragma unroll
        for (int i = 0; i < TM; ++i) dl[i] = acc[i][j] * sigmoid_grad_from_output(a[i]);
        sts(dLs + (kb + k) * TN + lane * TM, dl);
      }
    }
  }
  FASTCTX_SYNC(kSyncGlaGradTilesReady);

  // grad_bias: pixels past N have dZ = 0, hence dL = 0, and add nothing.
  for (int k = warp; k < S; k += kWarps) {
    const acc_t v = warp_sum(dLs[k * TN + lane] + dLs[k * TN + lane + 32]);
    if (lane == 0) part_b[k] = first ? v : part_b[k] + v;
  }

  for (int c0 = 0; c0 < C; c0 += kGlaOutChunk) {
    const int cv = min(kGlaOutChunk, C - c0);
    stage_pixels<kGlaOutChunk, TN>(xc, kLdT, xg + c0 * N, N, n0, cv, p.vec);
    stage_pixels<kGlaOutChunk, TN>(dzc, kLdT, dzg + c0 * N, N, n0, cv, p.vec);

    // grad_x[c][n] = sum_k W[k][c] dL[n][k], over 64-row chunks of W.
    acc_t gacc[TM][8];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) gacc[i][j] = acc_t(0);
    for (int kb = 0; kb < S; kb += kGlaMaxKChunk) {
      const int kv = min(kGlaMaxKChunk, S - kb);
      if (kb > 0) FASTCTX_SYNC(kSyncGlaWeightConsumed);  // previous weight rows consumed
      stage_mix<false>(ws, p.weight + static_cast<int64_t>(o + kb) * C + c0, C, 1, kv, cv);
      FASTCTX_SYNC(kSyncGlaWeightStaged);
      mix_rows(gacc, dLs + kb * TN, TN, ws, kv);
    }
    const int64_t n = n0 + lane * TM;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = warp * 8 + j;
      if (c < cv) {
        acc_t v[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i) v[i] = gacc[i][j];
        stg(gxg + (c0 + c) * N + n, N - n, v, p.vec);
      }
    }

    // grad_weight[k][c] += sum_n dL[n][k] x[c][n]; grad_pooled[c][k] += sum_n A[n][k] dZ[c][n].
    // Warps own k rows (KJ each), lanes own channels lane and lane + 32.
    for (int kb = 0; kb < S; kb += KS) {
      const int k0 = kb + warp * KJ;
      if (k0 < S) {  // warp-uniform; rows past S are padding and are discarded
        acc_t r[KJ][2];
        pixel_reduce<KJ, TN>(r, dLs + k0 * TN, xc + lane * kLdT, kLdT);
        store_partial(part_w, r, k0, S, C, c0 + lane, first);
        pixel_reduce<KJ, TN>(r, As + k0 * TN, dzc + lane * kLdT, kLdT);
        store_partial(part_p, r, k0, S, C, c0 + lane, first);
      }
    }
    FASTCTX_SYNC(kSyncGlaChunkConsumed);  // staging consumed before the next chunk or tile
  }
}

// One block per (tile range nb, group of this launch, image).
template <typename scalar_t, typename acc_t, int KJ>
__global__ void __launch_bounds__(kThreads, gla_min_blocks<acc_t, 2>())
    gla_bwd_kernel(const GlaBwdParams<scalar_t, acc_t> p) {
  acc_t* smem = dynamic_smem<acc_t>();
  const int g = gla_pick(p.groups.group, blockIdx.y);
  const int S = gla_pick(p.groups.size, blockIdx.y);
  const int o = gla_pick(p.groups.offset, blockIdx.y);
  const int64_t b = blockIdx.z;
  const int64_t nb = blockIdx.x;
  const int64_t plane0 = (b * p.G + g) * p.C;
  const int64_t slice = b * p.nblk + nb;  // this block's partial slice
  acc_t* part_w = p.part_w + (slice * p.S_tot + o) * p.C;
  acc_t* part_p = p.part_p + (slice * p.S_tot + o) * p.C;
  acc_t* part_b = p.part_b + slice * p.S_tot + o;
  // nblk <= tiles, so every block owns at least one tile and fills its slice.
  const int64_t t0 = tile_split_begin(nb, p.tiles, p.nblk);
  const int64_t t1 = tile_split_begin(nb + 1, p.tiles, p.nblk);
  const scalar_t* xg = p.x + plane0 * p.N;
  const scalar_t* dzg = p.grad + plane0 * p.N;
  scalar_t* gxg = p.grad_x + plane0 * p.N;
  const scalar_t* bias_b = p.bias + b * p.S_tot;
  const scalar_t* pooled_b = p.pooled + b * p.C * p.S_tot;
  for (int64_t t = t0; t < t1; ++t)
    bwd_tile<KJ>(p, S, o, xg, dzg, gxg, bias_b, pooled_b, part_w, part_p, part_b, t * kGlaBwdTile, t == t0, smem);
}

}  // namespace fastctx
