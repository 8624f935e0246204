// CUDA backend of gla_context: the affinity-weighted context of APCNet's ACM
// for all groups (pool scales) at once (contract: docs/kernels.md).
//
//   L = X_g^T W_g^T + bias_g   [pixels x S_g]      A = sigmoid(L)
//   Z_g = P_g A^T              [C x pixels]
//
// Forward: one block per (pixel tile, group, batch). The logits of the tile
// are accumulated in registers over channel chunks of X and W staged in shared
// memory, turned into A in shared memory, and Z is produced per output-channel
// chunk and written coalesced along the pixels. A never leaves the block.
//
// Backward: the same blocks (each walking a contiguous range of pixel tiles)
// recompute A, form dA = dZ^T P and dL = dA * A(1-A) per tile, write grad_x
// per tile, and add the tile's grad_weight / grad_pooled / grad_bias
// contributions into a partial slice owned by the block (fp32, in global
// memory). A second kernel sums the slices in a fixed order. No float atomics:
// results are bitwise reproducible.
//
// All GEMMs are SIMT outer products with register blocking: 8 warps split the
// k (affinity) rows or the output channels, the 32 lanes split the pixels.
// Groups of up to 64 rows keep their k fragment in registers; larger groups
// loop over 64-row chunks, bounded only by the shared-memory A tile
// (kMaxGroupSize). The per-thread k width is a template parameter; groups
// with the same width share one launch (three launches for scales 1, 2, 3, 6).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/activation.h"
#include "common/tile_math.h"

namespace fastctx {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroups = 16;
// Largest S_g: the [S_g x tile] affinity (and, backward, its gradient) live in
// shared memory; 192 rows fit the sm_80 per-block limit in fp32.
constexpr int kMaxGroupSize = 192;
constexpr int kChanChunk = 32;   // channels staged per step of the logit GEMMs
constexpr int kOutChunk = 64;    // output channels per step of the mixing GEMMs (8 warps x 8)
constexpr int kMaxKChunk = 64;   // k rows per chunk (8 warps x at most 8)
constexpr int kFwdTile = 128;    // pixels per forward tile (4 per lane)
constexpr int kBwdTile = 64;     // pixels per backward tile (2 per lane)
constexpr int kPad = 4;          // row padding of tiles read across lanes (keeps 16-byte alignment)
constexpr size_t kDefaultSmem = 48 * 1024;

static_assert(kOutChunk == 8 * kWarps && kMaxKChunk == 8 * kWarps, "warp split of the GEMMs");

template <typename T, int K>
struct alignas(sizeof(T) * K < 16 ? sizeof(T) * K : 16) Pack {
  T v[K];
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

// Logit coefficients of one channel chunk: dst[r][k] (row stride KS + kPad)
// <- src[r * r_stride + k * k_stride], zero outside rows_valid x k_valid.
// K_FAST walks k across threads (pooled: k is the unit stride), otherwise r
// (weight: the channel is the unit stride), so global reads stay coalesced.
// Indices stay 32-bit: weight and one image's pooled have S_tot * C < 2^31
// elements (checked on the host).
template <int KS, bool K_FAST, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_coef(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int r_stride,
                                           int k_stride, int rows_valid, int k_valid) {
  constexpr int kLd = KS + kPad;
  for (int e = threadIdx.x; e < kChanChunk * KS; e += kThreads) {
    const int r = K_FAST ? e / KS : e % kChanChunk;
    const int k = K_FAST ? e % KS : e / kChanChunk;
    acc_t v = acc_t(0);
    if (r < rows_valid && k < k_valid) v = static_cast<acc_t>(src[r * r_stride + k * k_stride]);
    dst[r * kLd + k] = v;
  }
}

// Mixing coefficients of one output-channel chunk: dst[k][c] (row stride
// kOutChunk + kPad) <- src[k * k_stride + c * c_stride] for k < k_rows,
// zero for c >= c_valid. K_FAST as above.
template <bool K_FAST, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_mix(acc_t* __restrict__ dst, const scalar_t* __restrict__ src, int k_stride,
                                          int c_stride, int k_rows, int c_valid) {
  constexpr int kLd = kOutChunk + kPad;
  const int n = k_rows * kOutChunk;
#pragma unroll 2
  for (int e = threadIdx.x; e < n; e += kThreads) {
    const int k = K_FAST ? e % k_rows : e / kOutChunk;
    const int c = K_FAST ? e / k_rows : e % kOutChunk;
    dst[k * kLd + c] = c < c_valid ? static_cast<acc_t>(src[k * k_stride + c * c_stride]) : acc_t(0);
  }
}

// acc[i][j] += sum_r xs[r][lane*TM + i] * cs[r][warp*KJ + j] over one channel chunk.
template <int TM, int KJ, typename acc_t>
__device__ __forceinline__ void logit_mma(acc_t (&acc)[TM][KJ], const acc_t* xs, int ld_x, const acc_t* cs) {
  constexpr int kLd = 8 * KJ + kPad;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t* pa = xs + lane * TM;
  const acc_t* pb = cs + warp * KJ;
#pragma unroll 2
  for (int r = 0; r < kChanChunk; ++r) {
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
  for (int c0 = 0; c0 < C; c0 += kChanChunk) {
    const int cv = min(kChanChunk, C - c0);
    stage_pixels<kChanChunk, TN>(xs, TN, act + c0 * N, N, n0, cv, vec);
    stage_coef<8 * KJ, COEF_K_FAST>(cs, coef + c0 * coef_r_stride, coef_r_stride, coef_k_stride, cv, k_valid);
    __syncthreads();
    logit_mma(acc, xs, TN, cs);
    __syncthreads();
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
  constexpr int kLd = kOutChunk + kPad;
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

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The groups of one launch (one k blocking), by launch slot = blockIdx.y.
// Lives in kernel-argument space and is only read with compile-time indices
// (pick), so nothing is copied to local memory.
struct GroupTable {
  int count;
  int group[kMaxGroups];   // group index g (its channel slice of x / z)
  int size[kMaxGroups];    // S_g
  int offset[kMaxGroups];  // o_g: first row in weight / bias / pooled
};

// Resident blocks per SM the float kernels are compiled for: the forward fits
// 80 registers (3 blocks), the backward 128 (2 blocks), without spills. The
// fp64 instantiation exists for completeness and may use more registers
// rather than spill.
template <typename acc_t, int kFloatBlocks>
constexpr int min_blocks() {
  return sizeof(acc_t) > 4 ? 1 : kFloatBlocks;
}

__device__ __forceinline__ int pick(const int (&arr)[kMaxGroups], int idx) {
  int v = arr[0];
#pragma unroll
  for (int i = 1; i < kMaxGroups; ++i)
    if (i == idx) v = arr[i];
  return v;
}

template <typename scalar_t>
struct FwdParams {
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
__device__ __forceinline__ void fwd_tile(const FwdParams<scalar_t>& p, int S, int o, const scalar_t* xg,
                                         scalar_t* zg, const scalar_t* bias_b, const scalar_t* pooled_b,
                                         int64_t n0, acc_t* smem) {
  constexpr int TN = kFwdTile, TM = TN / 32, KS = 8 * KJ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.N;
  const int C = p.C;
  acc_t* As = smem;                           // [rows_alloc][TN]: A^T of the tile
  acc_t* stage = smem + p.rows_alloc * TN;    // staging, reused by both phases
  acc_t* xs = stage;                          // [kChanChunk][TN]
  acc_t* cs = stage + kChanChunk * TN;        // [kChanChunk][KS + kPad]
  acc_t* ps = stage;                          // [S][kOutChunk + kPad]

  for (int kb = 0; kb < S; kb += KS) {
    const int kv = min(KS, S - kb);
    affinity_rows<TN, KJ>(As + kb * TN, xg, N, n0, p.vec, p.weight + static_cast<int64_t>(o + kb) * C,
                          bias_b + o + kb, C, kv, xs, cs);
  }
  __syncthreads();

  for (int c0 = 0; c0 < C; c0 += kOutChunk) {
    const int cv = min(kOutChunk, C - c0);
    stage_mix<true>(ps, pooled_b + static_cast<int64_t>(c0) * p.S_tot + o, 1, p.S_tot, S, cv);
    __syncthreads();
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
    __syncthreads();
  }
}

// One block per (pixel tile, group of this launch, image).
template <typename scalar_t, typename acc_t, int KJ>
__global__ void __launch_bounds__(kThreads, min_blocks<acc_t, 3>()) gla_fwd_kernel(const FwdParams<scalar_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int g = pick(p.groups.group, blockIdx.y);
  const int S = pick(p.groups.size, blockIdx.y);
  const int o = pick(p.groups.offset, blockIdx.y);
  const int64_t b = blockIdx.z;
  const int64_t plane0 = (b * p.G + g) * p.C;  // first channel plane of the group
  const scalar_t* xg = p.x + plane0 * p.N;
  scalar_t* zg = p.z + plane0 * p.N;
  const scalar_t* bias_b = p.bias + b * p.S_tot;
  const scalar_t* pooled_b = p.pooled + b * p.C * p.S_tot;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kFwdTile;
  fwd_tile<KJ>(p, S, o, xg, zg, bias_b, pooled_b, n0, smem);
}

template <typename scalar_t, typename acc_t>
struct BwdParams {
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
__device__ __forceinline__ void bwd_tile(const BwdParams<scalar_t, acc_t>& p, int S, int o, const scalar_t* xg,
                                         const scalar_t* dzg, scalar_t* gxg, const scalar_t* bias_b,
                                         const scalar_t* pooled_b, acc_t* part_w, acc_t* part_p, acc_t* part_b,
                                         int64_t n0, bool first, acc_t* smem) {
  constexpr int TN = kBwdTile, TM = TN / 32, KS = 8 * KJ, kLdT = TN + kPad;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.N;
  const int C = p.C;
  acc_t* As = smem;                         // [rows_alloc][TN]: A^T
  acc_t* dLs = As + p.rows_alloc * TN;      // [rows_alloc][TN]: dL^T
  acc_t* stage = dLs + p.rows_alloc * TN;
  acc_t* xs = stage;                        // logits: [kChanChunk][TN]
  acc_t* cs = stage + kChanChunk * TN;      // logits: [kChanChunk][KS + kPad]
  acc_t* xc = stage;                        // channel chunk of x: [kOutChunk][TN + kPad]
  acc_t* dzc = xc + kOutChunk * kLdT;       // channel chunk of dZ: [kOutChunk][TN + kPad]
  acc_t* ws = dzc + kOutChunk * kLdT;       // weight rows: [<= kMaxKChunk][kOutChunk + kPad]

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
  __syncthreads();

  // grad_bias: pixels past N have dZ = 0, hence dL = 0, and add nothing.
  for (int k = warp; k < S; k += kWarps) {
    const acc_t v = warp_sum(dLs[k * TN + lane] + dLs[k * TN + lane + 32]);
    if (lane == 0) part_b[k] = first ? v : part_b[k] + v;
  }

  for (int c0 = 0; c0 < C; c0 += kOutChunk) {
    const int cv = min(kOutChunk, C - c0);
    stage_pixels<kOutChunk, TN>(xc, kLdT, xg + c0 * N, N, n0, cv, p.vec);
    stage_pixels<kOutChunk, TN>(dzc, kLdT, dzg + c0 * N, N, n0, cv, p.vec);

    // grad_x[c][n] = sum_k W[k][c] dL[n][k], over 64-row chunks of W.
    acc_t gacc[TM][8];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) gacc[i][j] = acc_t(0);
    for (int kb = 0; kb < S; kb += kMaxKChunk) {
      const int kv = min(kMaxKChunk, S - kb);
      if (kb > 0) __syncthreads();  // previous weight rows consumed
      stage_mix<false>(ws, p.weight + static_cast<int64_t>(o + kb) * C + c0, C, 1, kv, cv);
      __syncthreads();
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
    __syncthreads();  // staging consumed before the next chunk or tile
  }
}

// One block per (tile range nb, group of this launch, image).
template <typename scalar_t, typename acc_t, int KJ>
__global__ void __launch_bounds__(kThreads, min_blocks<acc_t, 2>()) gla_bwd_kernel(const BwdParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int g = pick(p.groups.group, blockIdx.y);
  const int S = pick(p.groups.size, blockIdx.y);
  const int o = pick(p.groups.offset, blockIdx.y);
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
    bwd_tile<KJ>(p, S, o, xg, dzg, gxg, bias_b, pooled_b, part_w, part_p, part_b, t * kBwdTile, t == t0, smem);
}

// out[o][i] = sum_j part[o][j][i] for j < J in a fixed order: 8 thread rows
// take fixed j ranges of 32 adjacent columns (coalesced), then one row adds
// the 8 results in order. With `transpose`, column i = r * cols + c of the
// [rows][cols] inner block is written at c * rows + r.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* __restrict__ part,
                                                                scalar_t* __restrict__ out, int64_t J,
                                                                int64_t inner, int64_t rows, int64_t cols,
                                                                bool transpose) {
  __shared__ acc_t red[kWarps][33];
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + lx;
  const int64_t o = blockIdx.y;
  acc_t s = acc_t(0);
  if (i < inner) {
    const acc_t* src = part + o * J * inner + i;
    const int64_t j1 = tile_split_begin(ly + 1, J, kWarps);
    for (int64_t j = tile_split_begin(ly, J, kWarps); j < j1; ++j) s += src[j * inner];
  }
  red[ly][lx] = s;
  __syncthreads();
  if (ly == 0 && i < inner) {
#pragma unroll
    for (int y = 1; y < kWarps; ++y) s += red[y][lx];
    const int64_t dst = transpose ? (i % cols) * rows + i / cols : i;
    out[o * inner + dst] = static_cast<scalar_t>(s);
  }
}

// Shared memory (elements) of a forward block whose largest group has s rows:
// the affinity tile plus the larger of the two staging layouts (see fwd_tile).
int64_t fwd_smem_elems(int64_t s) {
  return gla_padded_rows(s) * kFwdTile +
         std::max<int64_t>(kChanChunk * (kFwdTile + gla_k_chunk(s) + kPad), s * (kOutChunk + kPad));
}

// Same for the backward: A and dL tiles plus staging (see bwd_tile).
int64_t bwd_smem_elems(int64_t s) {
  return 2 * gla_padded_rows(s) * kBwdTile +
         std::max<int64_t>(kChanChunk * (kBwdTile + gla_k_chunk(s) + kPad),
                           2 * kOutChunk * (kBwdTile + kPad) + std::min<int64_t>(s, kMaxKChunk) * (kOutChunk + kPad));
}

// ---------------------------------------------------------------- host side

// Groups sharing a k blocking (gla_k_per_thread) share a launch: one kernel
// instantiation per blocking keeps the register allocation of each tight
// (a kernel switching between all blockings at run time needs about twice
// the registers of any one of them). The default scales (1, 2, 3, 6) take
// three launches; they run concurrently (run_concurrently), largest first.
struct Launch {
  int kj;
  int64_t max_size;  // largest S_g of the launch: sizes its shared memory
  GroupTable table;
};

struct Groups {
  int64_t count;  // G
  int64_t total;  // S_tot
  std::vector<Launch> launches;
};

Groups make_groups(at::IntArrayRef sizes, const char* op) {
  const int64_t G = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(G >= 1 && G <= kMaxGroups, op, ": expected between 1 and ", kMaxGroups, " groups, got ", G);
  std::vector<int64_t> offset(G);
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s = sizes[g];
    TORCH_CHECK(s >= 1, op, ": expected group sizes >= 1, got ", s, " for group ", g);
    TORCH_CHECK(s <= kMaxGroupSize, op, ": group ", g, " has ", s, " rows; the CUDA kernel keeps a group's [rows x ",
                "pixel tile] affinity in shared memory and supports at most ", kMaxGroupSize,
                " rows per group (use the cpu or triton backend for larger groups)");
    offset[g] = total;
    total += s;
  }
  Groups gr;
  gr.count = G;
  gr.total = total;
  for (const int kj : {8, 5, 4, 2, 1}) {
    std::vector<int> members;
    for (int g = 0; g < G; ++g)
      if (gla_k_per_thread(sizes[g]) == kj) members.push_back(g);
    if (members.empty()) continue;
    // Largest groups first within a launch: blocks are scheduled in
    // blockIdx.y order, so the long ones start early.
    std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return sizes[a] > sizes[b]; });
    Launch l{};
    l.kj = kj;
    l.table.count = static_cast<int>(members.size());
    for (size_t i = 0; i < members.size(); ++i) {
      const int g = members[i];
      l.table.group[i] = g;
      l.table.size[i] = static_cast<int>(sizes[g]);
      l.table.offset[i] = static_cast<int>(offset[g]);
      l.max_size = std::max<int64_t>(l.max_size, sizes[g]);
    }
    gr.launches.push_back(l);
  }
  return gr;
}

void check_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

struct Shape {
  int64_t B, G, C, N, S_tot;
};

// Validates the contract shared by forward and backward and returns the sizes.
Shape check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& pooled,
                   const Groups& gr, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x to be a CUDA tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected float32, float16 or bfloat16 data, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape [B, G*C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": expected x to be contiguous");
  Shape s;
  s.B = x.size(0);
  s.G = gr.count;
  TORCH_CHECK(x.size(1) % s.G == 0 && x.size(1) > 0, op, ": expected x's channel count ", x.size(1),
              " to be a positive multiple of the ", s.G, " groups");
  s.C = x.size(1) / s.G;
  s.N = x.size(2) * x.size(3);
  s.S_tot = gr.total;
  check_tensor(weight, x, op, "weight", {s.S_tot, s.C});
  check_tensor(bias, x, op, "bias", {s.B, s.S_tot});
  check_tensor(pooled, x, op, "pooled", {s.B, s.C, s.S_tot});
  TORCH_CHECK(s.B <= 65535, op, ": expected batch size <= 65535 (grid z), got ", s.B);
  TORCH_CHECK(s.S_tot * s.C <= INT_MAX, op, ": expected S_tot * C < 2^31, got ", s.S_tot * s.C);
  return s;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename Kernel>
void set_dynamic_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= kDefaultSmem) return;
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, op, ": the largest group needs ", bytes, " bytes of shared memory per block, the ",
              "device allows ", limit, " (use smaller groups, or float32 instead of float64)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Calls launch(i, stream) for i < n: launch 0 on the current stream, the
// others on pool streams forked from it and joined back before returning, so
// the launches overlap on the GPU as a single grid would, and everything
// enqueued later on the current stream is ordered after all of them.
template <typename F>
void run_concurrently(size_t n, const F& launch) {
  const c10::cuda::CUDAStream main = at::cuda::getCurrentCUDAStream();
  if (n == 0) return;
  c10::cuda::CUDAEvent fork;
  if (n > 1) fork.record(main);
  launch(size_t{0}, main);
  std::vector<c10::cuda::CUDAEvent> joins(n - 1);
  for (size_t i = 1; i < n; ++i) {
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
    fork.block(side);
    launch(i, side);
    joins[i - 1].record(side);
  }
  for (auto& e : joins) e.block(main);
}

template <typename scalar_t, typename acc_t, int KJ>
void launch_fwd_kj(const FwdParams<scalar_t>& p, dim3 grid, size_t smem, cudaStream_t stream, const char* op) {
  auto kernel = gla_fwd_kernel<scalar_t, acc_t, KJ>;
  set_dynamic_smem(kernel, smem, op);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int KJ>
void launch_bwd_kj(const BwdParams<scalar_t, acc_t>& p, dim3 grid, size_t smem, cudaStream_t stream,
                   const char* op) {
  auto kernel = gla_bwd_kernel<scalar_t, acc_t, KJ>;
  set_dynamic_smem(kernel, smem, op);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gla_context_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& pooled, at::IntArrayRef group_sizes) {
  constexpr const char* op = "gla_context_fwd (CUDA)";
  const Groups gr = make_groups(group_sizes, op);
  const Shape s = check_inputs(x, weight, bias, pooled, gr, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor z = at::empty_like(x);
  if (z.numel() == 0) return z;
  const int64_t tiles = tile_ceil_div(s.N, kFwdTile);
  TORCH_CHECK(tiles <= INT_MAX, op, ": ", tiles, " pixel tiles exceed the grid limit");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gla_context_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdParams<scalar_t> p;
    p.x = x.data_ptr<scalar_t>();
    p.weight = weight.data_ptr<scalar_t>();
    p.bias = bias.data_ptr<scalar_t>();
    p.pooled = pooled.data_ptr<scalar_t>();
    p.z = z.data_ptr<scalar_t>();
    p.N = s.N;
    p.G = static_cast<int>(s.G);
    p.C = static_cast<int>(s.C);
    p.S_tot = static_cast<int>(s.S_tot);
    p.vec = s.N % 4 == 0 && aligned16(x) && aligned16(z);
    run_concurrently(gr.launches.size(), [&](size_t i, cudaStream_t stream) {
      const Launch& l = gr.launches[i];
      FwdParams<scalar_t> lp = p;
      lp.groups = l.table;
      lp.rows_alloc = static_cast<int>(gla_padded_rows(l.max_size));
      const size_t smem = sizeof(acc_t) * static_cast<size_t>(fwd_smem_elems(l.max_size));
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(l.table.count),
                      static_cast<unsigned>(s.B));
      switch (l.kj) {
        case 1: launch_fwd_kj<scalar_t, acc_t, 1>(lp, grid, smem, stream, op); break;
        case 2: launch_fwd_kj<scalar_t, acc_t, 2>(lp, grid, smem, stream, op); break;
        case 4: launch_fwd_kj<scalar_t, acc_t, 4>(lp, grid, smem, stream, op); break;
        case 5: launch_fwd_kj<scalar_t, acc_t, 5>(lp, grid, smem, stream, op); break;
        default: launch_fwd_kj<scalar_t, acc_t, 8>(lp, grid, smem, stream, op); break;
      }
    });
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gla_context_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& pooled, at::IntArrayRef group_sizes) {
  constexpr const char* op = "gla_context_bwd (CUDA)";
  const Groups gr = make_groups(group_sizes, op);
  const Shape s = check_inputs(x, weight, bias, pooled, gr, op);
  check_tensor(grad, x, op, "grad", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty_like(bias);
  at::Tensor grad_pooled = at::empty_like(pooled);
  if (x.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    grad_pooled.zero_();
    return {grad_x, grad_weight, grad_bias, grad_pooled};
  }

  const int64_t tiles = tile_ceil_div(s.N, kBwdTile);
  // Blocks per image and group: enough for a few waves; each walks a
  // contiguous range of tiles, so partial memory stays ~B * nblk * S_tot * C.
  // nblk <= tiles keeps every block's range (and partial slice) non-empty.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t nblk = std::min<int64_t>(tiles, std::max<int64_t>(1, tile_ceil_div(8 * sms, s.G * s.B)));
  TORCH_CHECK(nblk <= INT_MAX, op, ": grid too large");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gla_context_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor part_w = at::empty({s.B, nblk, s.S_tot, s.C}, acc_opts);
    at::Tensor part_p = at::empty({s.B, nblk, s.S_tot, s.C}, acc_opts);
    at::Tensor part_b = at::empty({s.B, nblk, s.S_tot}, acc_opts);
    BwdParams<scalar_t, acc_t> p;
    p.grad = grad.data_ptr<scalar_t>();
    p.x = x.data_ptr<scalar_t>();
    p.weight = weight.data_ptr<scalar_t>();
    p.bias = bias.data_ptr<scalar_t>();
    p.pooled = pooled.data_ptr<scalar_t>();
    p.grad_x = grad_x.data_ptr<scalar_t>();
    p.part_w = part_w.data_ptr<acc_t>();
    p.part_p = part_p.data_ptr<acc_t>();
    p.part_b = part_b.data_ptr<acc_t>();
    p.N = s.N;
    p.tiles = tiles;
    p.nblk = static_cast<int>(nblk);
    p.G = static_cast<int>(s.G);
    p.C = static_cast<int>(s.C);
    p.S_tot = static_cast<int>(s.S_tot);
    p.vec = s.N % 4 == 0 && aligned16(x) && aligned16(grad) && aligned16(grad_x);
    run_concurrently(gr.launches.size(), [&](size_t i, cudaStream_t stream) {
      const Launch& l = gr.launches[i];
      BwdParams<scalar_t, acc_t> lp = p;
      lp.groups = l.table;
      lp.rows_alloc = static_cast<int>(gla_padded_rows(l.max_size));
      const size_t smem = sizeof(acc_t) * static_cast<size_t>(bwd_smem_elems(l.max_size));
      const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(l.table.count), static_cast<unsigned>(s.B));
      switch (l.kj) {
        case 1: launch_bwd_kj<scalar_t, acc_t, 1>(lp, grid, smem, stream, op); break;
        case 2: launch_bwd_kj<scalar_t, acc_t, 2>(lp, grid, smem, stream, op); break;
        case 4: launch_bwd_kj<scalar_t, acc_t, 4>(lp, grid, smem, stream, op); break;
        case 5: launch_bwd_kj<scalar_t, acc_t, 5>(lp, grid, smem, stream, op); break;
        default: launch_bwd_kj<scalar_t, acc_t, 8>(lp, grid, smem, stream, op); break;
      }
    });

    // All launches have joined the current stream; every (b, nb, k, c) of
    // the partials has been written by exactly one block.
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t wc = s.S_tot * s.C;
    const auto blocks = [](int64_t inner) { return static_cast<unsigned>(tile_ceil_div(inner, 32)); };
    // grad_weight[k][c]: sum over every (b, nb) slice.
    sum_partials_kernel<scalar_t, acc_t><<<dim3(blocks(wc), 1), kThreads, 0, stream>>>(
        p.part_w, grad_weight.data_ptr<scalar_t>(), s.B * nblk, wc, s.S_tot, s.C, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_pooled[b][c][k]: sum over nb; the [k][c] slices are written transposed.
    sum_partials_kernel<scalar_t, acc_t><<<dim3(blocks(wc), static_cast<unsigned>(s.B)), kThreads, 0, stream>>>(
        p.part_p, grad_pooled.data_ptr<scalar_t>(), nblk, wc, s.S_tot, s.C, true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_bias[b][k]: sum over nb.
    sum_partials_kernel<scalar_t, acc_t><<<dim3(blocks(s.S_tot), static_cast<unsigned>(s.B)), kThreads, 0, stream>>>(
        p.part_b, grad_bias.data_ptr<scalar_t>(), nblk, s.S_tot, 1, s.S_tot, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight, grad_bias, grad_pooled};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("gla_context_fwd", &fastctx::gla_context_fwd_cuda);
  m.impl("gla_context_bwd", &fastctx::gla_context_bwd_cuda);
}
