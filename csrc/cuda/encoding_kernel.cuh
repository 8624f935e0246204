#pragma once
// Device code of EncNet's Encoding layer (contract: docs/kernels.md
// "encoding"). Tile geometry, shared-memory layout, workspace and launch
// sizes: encoding_launch.h.
//
//   L[b,i,k] = s_k ||x_i - c_k||^2,  A = softmax_k(L),  E[b,k] = sum_i A[b,i,k] (x_i - c_k)
//
// Numerics. Everything runs on centred values x' = x - m, c' = c - m with
// m = mean_k c_k (fp32), so ||x'||^2 - 2 x'.c' + ||c'||^2 does not cancel when
// ||x|| is large and x lies near the codewords. All sums are in fp32 (fp64 for
// fp64 data). Codewords spread far apart still defeat the expansion for a
// pixel near one of them (common/encoding.h): a pixel with an imprecise entry
// whose logit can matter (encoding_row_direct) gets A = 0 in the tile kernel
// and is redone whole by the fixup kernel from raw x and c, as the reference.
//
// Kernels, per call (256 threads per block unless noted):
//   prep      m, c' = c - m as [KP, Dp] and c'^T as [Dp, KP] (fp32, zero padded,
//             KP = 32 | 64, Dp = D rounded up to the aggregation chunk); the
//             backward pads dE the same two ways. The padding lets the tile
//             kernel copy these tiles with 16-byte cp.async and no bounds checks.
//   norms     ||c'_k||^2 and (backward) dE_bk . c'_k, one warp per dot product.
//   tile      one block per (image, contiguous range of pixel tiles). Per tile of
//             TN = 4096 / KP pixels:
//               1. logits S = X' C'^T (backward also G = X' dE^T) over D in
//                  32-channel (backward 16) chunks: x through registers,
//                  prefetched one chunk ahead and centred on the way into shared
//                  memory; c'^T / dE^T by double-buffered cp.async; 4x4 register
//                  tiles; ||x'||^2 from the staged x' tile.
//               2. softmax per pixel row, one warp per row, max subtracted; the
//                  [KP, TN] assignment stays in shared memory (never global).
//                  Rows flagged by encoding_row_direct get A = 0 (dL = 0) and
//                  a 1 in flags [B, N] (every pixel written, every call).
//               3. over D in 4096 / KP-channel chunks and KP-pixel steps:
//                  P += A^T X' (forward) or Q += V^T X' and
//                  grad_x = [A | V] [dE ; c'] - v x' (backward), x re-read
//                  through the same prefetch.
//             Cross-tile sums go to a per-block fp32 slot, accumulated in tile
//             order by its own block (no atomics).
//   fixup     the tile kernel's blocks again: each walks its pixel range in
//             order and adds the flagged pixels, computed directly from raw x
//             and c, to its own slot (backward: and writes their grad_x).
//             Clustered codewords flag nothing: one read of the flags.
//   reduce    sums the slots of every block in a fixed order and applies the
//             colsum * c' terms: deterministic run to run.
//
// Backward (V = -2 s dL, v_i = sum_k V_ik, dL = A (dA - rowsum(A dA)), with
// dA shifted by its value at the row's winning codeword first, which leaves
// dL unchanged and avoids its cancellation at near one-hot rows):
//   grad_x_i = sum_k A_ik dE_k + sum_k V_ik c'_k - v_i x'_i
//   grad_c_k = sum_b [ -colsum(A)_bk dE_bk + (V^T X')_bk - colsum(V)_bk c'_k ]
//   grad_s_k = sum_{b,i} dL_ik ||x'_i - c'_k||^2
// (the contract's formulas with -2 s_k dL_ik folded into V).
//
// Never materialised: [B, N, K, D] and [B, N, K]. Extra memory: the padded
// fp32 copies of c' (and dE), B * parts * KP * Dp fp32 partials, with parts
// capped so the partials stay under half the size of x, and B * N flag bytes.
#include <cmath>
#include <cstdint>

#include "common/cuda_helpers.cuh"
#include "common/encoding.h"
#include "cuda/encoding_launch.h"

namespace fastctx {

// Named barriers (FASTCTX_SYNC).
enum EncodingBarrier : int {
  kSyncEncTileStart = 401,
  kSyncEncChunkConsumed,
  kSyncEncChunkStaged,
  kSyncEncLogitsReady,
  kSyncEncStepConsumed,
  kSyncEncStepStaged,
  kSyncEncColumnSumsFree,
  kSyncEncColumnSumsReady,
  kSyncEncPrepTile,
  kSyncEncPrepMean,
  kSyncEncPrepCentred,
  kSyncEncFixFlags,
  kSyncEncFixDistances,
  kSyncEncFixWeights,
  kSyncEncFixChunkDone,
};

template <typename T>
__device__ __forceinline__ Pack<T, 4> lds4(const T* p) {
  return *reinterpret_cast<const Pack<T, 4>*>(p);
}

template <typename T>
__device__ __forceinline__ void sts4(T* p, const Pack<T, 4>& v) {
  *reinterpret_cast<Pack<T, 4>*>(p) = v;
}

// ---- register-pressure fences (PTX; plain code under the CPU emulation) ----
// Hides a pointer's value from the optimiser: per-element addresses of an
// unrolled strided loop are then formed by one running add instead of being
// precomputed (and kept in registers for the whole kernel).
template <typename T>
__device__ __forceinline__ T* opaque_ptr(T* p) {
#if !defined(FASTCTX_CUDA_EMU)
  asm volatile("" : "+l"(p));
#endif
  return p;
}

// threadIdx.x / blockIdx.x re-read where used: the optimiser cannot hoist
// indices derived from them to the kernel prologue, where dozens of such
// per-thread constants would each hold a register for the whole kernel.
__device__ __forceinline__ int fresh_tid() {
#if defined(FASTCTX_CUDA_EMU)
  return static_cast<int>(threadIdx.x);
#else
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
#endif
}
__device__ __forceinline__ int fresh_ctaid() {
#if defined(FASTCTX_CUDA_EMU)
  return static_cast<int>(blockIdx.x);
#else
  int t;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(t));
  return t;
#endif
}

// Copies ROWS x COLS of a padded fp32 matrix (row stride src_ld) into shared
// memory (row stride dst_ld) in 16-byte pieces. A thread's pieces are whole
// rows of pieces apart, so it walks one running source pointer (no per-piece
// offsets kept live across the kernel).
template <typename acc_t, int ROWS, int COLS>
__device__ __forceinline__ void cp_async_tile(acc_t* dst, int dst_ld, const acc_t* src, int src_ld) {
  constexpr int PIECE = 16 / static_cast<int>(sizeof(acc_t));
  constexpr int PER_ROW = COLS / PIECE;
  static_assert(COLS % PIECE == 0 && kThreads % PER_ROW == 0, "tile width");
  constexpr int ROW_STEP = kThreads / PER_ROW;
  constexpr int ITERS = (ROWS + ROW_STEP - 1) / ROW_STEP;
  constexpr bool EXACT = ROWS % ROW_STEP == 0;
  const int r = threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * PIECE;
  dst += r * dst_ld + c;
  src += static_cast<int64_t>(r) * src_ld + c;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    if (EXACT || r + i * ROW_STEP < ROWS) cp_async16(dst + i * ROW_STEP * dst_ld, src);
    src = opaque_ptr(src + static_cast<int64_t>(ROW_STEP) * src_ld);
  }
}

// Loads a thread's ELEMS x elements (d + r*DSTEP, n + r*NSTEP) of image xb into
// registers (0 outside [0, N) x [0, D)); CF: x is [D, N], else [N, D]. Bounds
// are checked against the remainders left of the base element and the
// source pointer is bumped opaquely, so the unrolled loop keeps no per-element
// values live (hoisted, they cost ~16 registers per call site and layout).
template <bool CF, int ELEMS, int DSTEP, int NSTEP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void x_load(acc_t* xr, const scalar_t* __restrict__ xb, int N, int D, int gn, int gd) {
  const scalar_t* src = xb + (CF ? static_cast<int64_t>(gd) * N + gn : static_cast<int64_t>(gn) * D + gd);
  const int64_t step = CF ? static_cast<int64_t>(DSTEP) * N + NSTEP : static_cast<int64_t>(NSTEP) * D + DSTEP;
  const int nrem = N - gn, drem = D - gd;
#pragma unroll
  for (int r = 0; r < ELEMS; ++r) {
    const bool ok = r * NSTEP < nrem && r * DSTEP < drem;
    xr[r] = ok ? static_cast<acc_t>(*src) : acc_t(0);
    src = opaque_ptr(src + step);
  }
}

// Centres the registers from x_load (x' = x - m) into shared memory, element r
// at dst[r * SSTEP]; elements outside the image become exact zeros.
template <int ELEMS, int DSTEP, int NSTEP, int SSTEP, typename acc_t>
__device__ __forceinline__ void x_store(const acc_t* xr, acc_t* dst, const acc_t* __restrict__ mean, int N, int D,
                                        int gn, int gd) {
  const int nrem = N - gn, drem = D - gd;
  const acc_t* m = mean + gd;
#pragma unroll
  for (int r = 0; r < ELEMS; ++r) {
    const bool ok = r * NSTEP < nrem && r * DSTEP < drem;
    dst[r * SSTEP] = ok ? xr[r] - __ldg(m + r * DSTEP) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
struct EncParams {
  const scalar_t* x;       // [B, D, N] (cf) or [B, N, D]
  const scalar_t* scale;   // [K]
  const acc_t* mean;       // [Dp]
  const acc_t* cpk;        // c'   [KP, Dp]
  const acc_t* cpt;        // c'^T [Dp, KP]
  const acc_t* gkd;        // dE   [B, KP, Dp]  (backward)
  const acc_t* gt;         // dE^T [B, Dp, KP]  (backward)
  const acc_t* cn;         // ||c'_k||^2 [KP]
  const acc_t* gk;         // dE_bk . c'_k [B, KP]  (backward)
  scalar_t* grad_x;        // like x            (backward)
  acc_t* part;             // [B*parts, KP, Dp]: A^T X' (forward) or V^T X' (backward)
  acc_t* part_a;           // [B*parts, KP]: colsum(A)
  acc_t* part_v;           // [B*parts, KP]: colsum(V)            (backward)
  acc_t* part_s;           // [B*parts, KP]: sum dL * distance    (backward)
  const scalar_t* codewords;  // c [K, D], raw: the fixup's direct residuals x - c_k
  uint8_t* flags;          // [B, N]: pixel left to the fixup (tile kernel writes, fixup reads)
  int N, D, Dp, tiles, parts;  // per-image sizes fit int (host-checked); addresses use int64
  int K;
  bool cf;       // x is [B, D, N]
  bool vec_out;  // grad_x rows allow 4-wide stores
};

// Resident blocks per SM the register budget is cut for with fp32
// accumulation: 3 (<= 80 registers) for the KP = 64 forward, else 2 (<= 128),
// the tightest budgets that compile without spills. Below sm_90 (164 KB of
// shared memory per SM) only one ~87 KB backward block fits, so its budget is
// left uncut there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kBwdBlocksPerSm = 1;
#else
constexpr int kBwdBlocksPerSm = 2;
#endif
template <typename acc_t, int KP, bool BWD>
constexpr int kTileMinBlocks = sizeof(acc_t) == 4 ? (BWD ? kBwdBlocksPerSm : KP == 64 ? 3 : 2) : 1;

// Block blk's image b and pixel tiles [t_begin, t_end): contiguous, balanced
// ranges (the first tiles % parts parts get one more), non-empty because
// parts <= tiles. 32-bit: no 64-bit division.
struct EncBlockTiles {
  int b, t_begin, t_end;
};
__device__ __forceinline__ EncBlockTiles encoding_block_tiles(int blk, int tiles, int parts) {
  const int b = blk / parts;
  const int part = blk - b * parts;
  const int per = tiles / parts, extra = tiles - per * parts;
  const int t_begin = part * per + (part < extra ? part : extra);
  return {b, t_begin, t_begin + per + (part < extra ? 1 : 0)};
}

// Whether a pixel row leaves the expanded path for the fixup kernel (spread
// codewords, see encoding.h): some valid k has an imprecise expansion
// (encoding_expansion_imprecise) and a logit at or above encoding_logit_floor
// of the row max and the row's largest error bound (encoding_logit_error).
// One warp per row, lane holding k = lane + 32 h (logit -inf for k >= K);
// the same result in every lane. Rows without an imprecise entry (clustered
// codewords: all of them) cost one ballot.
template <int KP, typename acc_t>
__device__ __forceinline__ bool encoding_row_direct(const acc_t* dist, const acc_t* logit, acc_t row_max,
                                                    acc_t x_sq, const acc_t* cn, const acc_t* sc, int K, int D,
                                                    int lane) {
  bool imprecise[KP / 32];
  bool any = false;
#pragma unroll
  for (int h = 0; h < KP / 32; ++h) {
    const int k = lane + 32 * h;
    imprecise[h] = k < K && encoding_expansion_imprecise(x_sq, cn[k], dist[h]);
    any |= imprecise[h];
  }
  if (__ballot_sync(0xffffffffu, any) == 0u) return false;
  acc_t err = acc_t(0);
#pragma unroll
  for (int h = 0; h < KP / 32; ++h) {
    const int k = lane + 32 * h;
    const acc_t e = k < K ? encoding_logit_error(x_sq, cn[k], sc[k], static_cast<int64_t>(D)) : acc_t(0);
    err = e > err ? e : err;
  }
  const acc_t floor = encoding_logit_floor(row_max, warp_max(err));
  bool hit = false;
#pragma unroll
  for (int h = 0; h < KP / 32; ++h) hit |= imprecise[h] && logit[h] >= floor;
  return __ballot_sync(0xffffffffu, hit) != 0u;
}

template <typename scalar_t, typename acc_t, int KP, bool BWD>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks<acc_t, KP, BWD>)
    encoding_tile_kernel(const EncParams<scalar_t, acc_t> p) {
  using G = EncTile<KP, BWD>;
  using S = EncSmem<KP, BWD>;
  constexpr int TN = G::TN, DC1 = G::DC1, DC3 = G::DC3, TN3 = G::TN3, SUB3 = G::SUB3;
  constexpr int XS_LD = G::XS_LD, CS_LD = G::CS_LD, X3_LD = G::X3_LD;
  constexpr int KQ = KP / 4;  // stride between a thread's aggregation rows

  acc_t* smem = dynamic_smem<acc_t>();
  acc_t* st = smem;                       // [ROWS][XS_LD]: S (G) -> A (V), k-major
  acc_t* r1 = smem + S::OFF_R1;           // phase-dependent tiles (union)
  acc_t* xs = r1;                         // phase 1: x' [DC1][XS_LD]
  acc_t* cs = r1 + DC1 * XS_LD;           // phase 1: c'^T [2][DC1][CS_LD] (+ dE^T [2][..])
  acc_t* xs3 = r1;                        // phase 3: x' [TN3][X3_LD]
  acc_t* bop = r1 + TN3 * X3_LD;          // phase 3 (bwd): [dE ; c'] [2KP][X3_LD]
  acc_t* xnq = smem + S::OFF_XNQ;         // [XQ][TN] partial ||x'||^2
  acc_t* cn = smem + S::OFF_CN;           // ||c'_k||^2
  acc_t* sc = smem + S::OFF_SC;           // s_k (0 for padded k)
  acc_t* gk = smem + S::OFF_GK;           // dE_k . c'_k (bwd)
  acc_t* vrow = smem + S::OFF_VROW;       // v_i = sum_k V_ik (bwd)

  const int tid = threadIdx.x;  // setup and epilogue only; the phases re-read it
  const int blk = blockIdx.x;
  const EncBlockTiles range = encoding_block_tiles(blk, p.tiles, p.parts);
  const int b = range.b, t_begin = range.t_begin, t_end = range.t_end;
  const int N = p.N, D = p.D, Dp = p.Dp;
  const int K = p.K;
  const bool cf = p.cf;
  const scalar_t* __restrict__ xb = p.x + static_cast<int64_t>(b) * N * D;
  const acc_t* __restrict__ gtb = BWD ? p.gt + static_cast<int64_t>(b) * Dp * KP : nullptr;
  const acc_t* __restrict__ gkb = BWD ? p.gkd + static_cast<int64_t>(b) * KP * Dp : nullptr;
  const int nch1 = (D + DC1 - 1) / DC1;
  const int nch3 = (D + DC3 - 1) / DC3;
  const int nsteps3 = nch3 * SUB3;

  if (tid < KP) {
    sc[tid] = tid < K ? static_cast<acc_t>(p.scale[tid]) : acc_t(0);
    cn[tid] = p.cn[tid];
    if (BWD) gk[tid] = p.gk[b * KP + tid];
  }

  // Phase-1 (logits) thread tile: pixels 4*tn.., codewords 4*tk..; each warp is
  // 8 (k) x 4 (n) lanes so one 4-wide read of each operand is one wavefront.
  constexpr int WK = KP / 32;
  // Phase-3 thread tile: channels 4*td.. and either codeword rows tr + KQ*i
  // (A^T X', V^T X') or pixels 4*tr.. (grad_x); 8 (d) x 4 lanes per warp.
  constexpr int WD = DC3 / 32;

  // x tiles: register slot r of this thread holds element (d + r*DSTEP, n + r*NSTEP)
  // of the tile, with compile-time steps per layout (so a load or store is one
  // base pointer plus immediate offsets). Global-contiguous runs map to
  // consecutive lanes; where shared memory is transposed w.r.t. global, lanes
  // form 8 x 4 blocks so the shared stores stay conflict-free (row strides are
  // 4 mod 32 banks).
  // Phase 1, [d][n] tile of DC1 x TN:
  //   [B, D, N]: n = tid % TN, d = tid / TN, steps (256/TN, 0)
  //   [B, N, D]: d = (w % Q) * 8 + lane % 8, n = (w / Q) * 4 + lane / 8 % 4, steps (0, 32/Q), Q = DC1/8
  // Phase 3, [n][d] tile of TN3 x DC3:
  //   [B, N, D]: d = tid % DC3, n = tid / DC3, steps (0, 256/DC3)
  //   [B, D, N]: n = (w % G) * 8 + lane % 8, d = (w / G) * 4 + lane / 8 % 4, steps (32/G, 0), G = TN3/8
  constexpr int X1E = G::X1_ELEMS, X3E = G::X3_ELEMS;
  constexpr int P1_DSTEP = kThreads / TN, P3_NSTEP = kThreads / DC3;
  constexpr int DQ = DC1 / 8, P1_NSTEP = 32 / DQ;
  constexpr int GQ = TN3 / 8, P3_DSTEP = 32 / GQ;
  static_assert(kWarps % DQ == 0 && kWarps % GQ == 0, "x tile mappings");

  acc_t xr[G::XR];
  auto load_x1 = [&](int n0, int c) {
    const int gd = c * DC1;
    const int tid = fresh_tid(), warp = tid >> 5, lane = tid & 31;
    if (cf)
      x_load<true, X1E, P1_DSTEP, 0>(xr, xb, N, D, n0 + tid % TN, gd + tid / TN);
    else
      x_load<false, X1E, 0, P1_NSTEP>(xr, xb, N, D, n0 + (warp / DQ) * 4 + ((lane >> 3) & 3),
                                      gd + (warp % DQ) * 8 + (lane & 7));
  };
  auto store_x1 = [&](int n0, int c) {
    const int gd = c * DC1;
    const int tid = fresh_tid(), warp = tid >> 5, lane = tid & 31;
    if (cf) {
      const int d = tid / TN, n = tid % TN;
      x_store<X1E, P1_DSTEP, 0, P1_DSTEP * XS_LD>(xr, xs + d * XS_LD + n, p.mean, N, D, n0 + n, gd + d);
    } else {
      const int d = (warp % DQ) * 8 + (lane & 7), n = (warp / DQ) * 4 + ((lane >> 3) & 3);
      x_store<X1E, 0, P1_NSTEP, P1_NSTEP>(xr, xs + d * XS_LD + n, p.mean, N, D, n0 + n, gd + d);
    }
  };
  auto load_x3 = [&](int n0, int step) {
    const int c = step / SUB3, s = step - (step / SUB3) * SUB3;
    const int gn = n0 + s * TN3, gd = c * DC3;
    const int tid = fresh_tid(), warp = tid >> 5, lane = tid & 31;
    if (cf)
      x_load<true, X3E, P3_DSTEP, 0>(xr, xb, N, D, gn + (warp % GQ) * 8 + (lane & 7),
                                     gd + (warp / GQ) * 4 + ((lane >> 3) & 3));
    else
      x_load<false, X3E, 0, P3_NSTEP>(xr, xb, N, D, gn + tid / DC3, gd + tid % DC3);
  };
  auto store_x3 = [&](int n0, int step) {
    const int c = step / SUB3, s = step - (step / SUB3) * SUB3;
    const int gn = n0 + s * TN3, gd = c * DC3;
    const int tid = fresh_tid(), warp = tid >> 5, lane = tid & 31;
    if (cf) {
      const int n = (warp % GQ) * 8 + (lane & 7), d = (warp / GQ) * 4 + ((lane >> 3) & 3);
      x_store<X3E, P3_DSTEP, 0, P3_DSTEP>(xr, xs3 + n * X3_LD + d, p.mean, N, D, gn + n, gd + d);
    } else {
      const int n = tid / DC3, d = tid % DC3;
      x_store<X3E, 0, P3_NSTEP, P3_NSTEP * X3_LD>(xr, xs3 + n * X3_LD + d, p.mean, N, D, gn + n, gd + d);
    }
  };

  // Per-lane running column sums over every pixel row this warp handles
  // (lane owns k = lane and lane + 32); combined across warps once at the end.
  acc_t col_a[2] = {acc_t(0), acc_t(0)};
  acc_t col_v[2] = {acc_t(0), acc_t(0)};
  acc_t col_s[2] = {acc_t(0), acc_t(0)};

  for (int t = t_begin; t < t_end; ++t) {
    const int n0 = t * TN;
    const bool first = t == t_begin;

    // ---------------- phase 1: logits over D chunks ----------------
    FASTCTX_SYNC(kSyncEncTileStart);  // the previous tile is done with every shared buffer
    cp_async_tile<acc_t, DC1, KP>(cs, CS_LD, p.cpt, KP);
    if (BWD) cp_async_tile<acc_t, DC1, KP>(cs + 2 * DC1 * CS_LD, CS_LD, gtb, KP);
    cp_async_commit();
    if (first) load_x1(n0, 0);  // later tiles were prefetched by phase 3

    acc_t s_acc[4][4], g_acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s_acc[i][j] = g_acc[i][j] = acc_t(0);
    acc_t xn = acc_t(0);
    const int ft = fresh_tid();
    const int xp = ft % TN, xq = ft / TN;
    const int tk1 = ((ft >> 5) % WK) * 8 + (ft & 7);
    const int tn1 = ((ft >> 5) / WK) * 4 + ((ft & 31) >> 3);

    for (int c = 0; c < nch1; ++c) {
      const int buf = c & 1;
      FASTCTX_SYNC(kSyncEncChunkConsumed);  // chunk c-1 consumed: xs and the other c'^T buffer are free
      store_x1(n0, c);
      if (c + 1 < nch1) {
        const int dn = (c + 1) * DC1;
        acc_t* nb = cs + (buf ^ 1) * DC1 * CS_LD;
        cp_async_tile<acc_t, DC1, KP>(nb, CS_LD, p.cpt + dn * KP, KP);
        if (BWD) cp_async_tile<acc_t, DC1, KP>(nb + 2 * DC1 * CS_LD, CS_LD, gtb + dn * KP, KP);
        cp_async_commit();
        load_x1(n0, c + 1);
        cp_async_wait<1>();
      } else {
        load_x3(n0, 0);  // first aggregation step, in flight during the softmax
        cp_async_wait<0>();
      }
      FASTCTX_SYNC(kSyncEncChunkStaged);

      const acc_t* cb = cs + buf * DC1 * CS_LD;
      const acc_t* eb = cb + 2 * DC1 * CS_LD;
#pragma unroll 2
      for (int d = 0; d < DC1; ++d) {
        const Pack<acc_t, 4> a = lds4(xs + d * XS_LD + 4 * tn1);
        const Pack<acc_t, 4> w = lds4(cb + d * CS_LD + 4 * tk1);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) s_acc[i][j] += a.v[i] * w.v[j];
        if (BWD) {
          const Pack<acc_t, 4> e = lds4(eb + d * CS_LD + 4 * tk1);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) g_acc[i][j] += a.v[i] * e.v[j];
        }
      }
#pragma unroll
      for (int d = xq; d < DC1; d += G::XQ) {
        const acc_t v = xs[d * XS_LD + xp];
        xn += v * v;
      }
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sts4(st + (4 * tk1 + j) * XS_LD + 4 * tn1,
           Pack<acc_t, 4>{{s_acc[0][j], s_acc[1][j], s_acc[2][j], s_acc[3][j]}});
      if (BWD)
        sts4(st + (KP + 4 * tk1 + j) * XS_LD + 4 * tn1,
             Pack<acc_t, 4>{{g_acc[0][j], g_acc[1][j], g_acc[2][j], g_acc[3][j]}});
    }
    xnq[xq * TN + xp] = xn;
    FASTCTX_SYNC(kSyncEncLogitsReady);

    // ---------------- phase 2: softmax over k, one warp per pixel row ----------------
    const int lane = fresh_tid() & 31, warp = fresh_tid() >> 5;
    for (int n = warp; n < TN; n += kWarps) {
      acc_t x_sq = acc_t(0);
#pragma unroll
      for (int q = 0; q < G::XQ; ++q) x_sq += xnq[q * TN + n];
      const bool valid = n0 + n < N;
      acc_t dist[2], logit[2];
      acc_t mx = -INFINITY;
#pragma unroll
      for (int h = 0; h < KP / 32; ++h) {
        const int k = lane + 32 * h;
        dist[h] = encoding_sq_dist(x_sq, st[k * XS_LD + n], cn[k]);
        logit[h] = k < K ? sc[k] * dist[h] : -INFINITY;
        mx = logit[h] > mx ? logit[h] : mx;
      }
      mx = warp_max(mx);
      // A pixel whose expansion cannot be trusted gets A = 0 (and dL = 0): it
      // adds nothing here, and the fixup kernel does it from raw x and c.
      const bool direct = valid && encoding_row_direct<KP>(dist, logit, mx, x_sq, cn, sc, K, D, lane);
      if (valid && lane == 0) p.flags[static_cast<int64_t>(b) * N + n0 + n] = direct ? 1 : 0;
      acc_t e[2], esum = acc_t(0);
#pragma unroll
      for (int h = 0; h < KP / 32; ++h) {
        e[h] = lane + 32 * h < K ? encoding_exp(logit[h] - mx) : acc_t(0);
        esum += e[h];
      }
      esum = warp_sum(esum);
      const acc_t inv = valid && !direct ? acc_t(1) / esum : acc_t(0);  // padded pixels get A = 0
      acc_t a[2];
#pragma unroll
      for (int h = 0; h < KP / 32; ++h) {
        a[h] = e[h] * inv;
        col_a[h] += a[h];
      }
      if (!BWD) {
#pragma unroll
        for (int h = 0; h < KP / 32; ++h) st[(lane + 32 * h) * XS_LD + n] = a[h];
      } else {
        // dA_ik = dE_k . (x_i - c_k), shifted by dA_iw of the row's winning
        // codeword w (the lowest k holding the row max): dL = A (dA - sum_j
        // A_ij dA_ij) is unchanged (sum_j A_ij = 1), but near one-hot rows no
        // longer subtract two nearly equal terms, so dL keeps its relative
        // accuracy (dL_iw = -A_iw sum_{j != w} A_ij dA'_ij).
        acc_t da[2];
#pragma unroll
        for (int h = 0; h < KP / 32; ++h) {
          const int k = lane + 32 * h;
          da[h] = st[(KP + k) * XS_LD + n] - gk[k];
        }
        const unsigned win_lo = __ballot_sync(0xffffffffu, logit[0] == mx);
        const unsigned win_hi = KP > 32 ? __ballot_sync(0xffffffffu, logit[KP / 32 - 1] == mx) : 0u;
        const unsigned win = win_lo != 0u ? win_lo : win_hi;  // 0 only for NaN rows
        const acc_t da_w = __shfl_sync(0xffffffffu, win_lo != 0u ? da[0] : da[KP / 32 - 1],
                                       win != 0u ? __ffs(static_cast<int>(win)) - 1 : 0);
        acc_t r = acc_t(0);
#pragma unroll
        for (int h = 0; h < KP / 32; ++h) {
          da[h] -= da_w;
          r += a[h] * da[h];
        }
        r = warp_sum(r);
        acc_t vsum = acc_t(0);
#pragma unroll
        for (int h = 0; h < KP / 32; ++h) {
          const int k = lane + 32 * h;
          const acc_t dl = direct ? acc_t(0) : encoding_softmax_grad(a[h], da[h], r);
          const acc_t v = acc_t(-2) * sc[k] * dl;
          st[k * XS_LD + n] = a[h];
          st[(KP + k) * XS_LD + n] = v;
          col_v[h] += v;
          col_s[h] += dl * dist[h];
          vsum += v;
        }
        vsum = warp_sum(vsum);
        if (lane == 0) vrow[n] = vsum;
      }
    }

    // ---------------- phase 3: aggregation (and grad_x) over D chunks ----------------
    acc_t acc_b[4][4];
    for (int step = 0; step < nsteps3; ++step) {
      const int c3 = step / SUB3;
      const int s = step - c3 * SUB3;
      const int d0 = c3 * DC3;
      if (s == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc_b[i][j] = acc_t(0);
      }
      FASTCTX_SYNC(kSyncEncStepConsumed);  // previous step (or the softmax) done with shared memory
      if (BWD && s == 0) {
        cp_async_tile<acc_t, KP, DC3>(bop, X3_LD, gkb + d0, Dp);
        cp_async_tile<acc_t, KP, DC3>(bop + KP * X3_LD, X3_LD, p.cpk + d0, Dp);
        cp_async_commit();
      }
      store_x3(n0, step);
      if (BWD && s == 0) cp_async_wait<0>();
      FASTCTX_SYNC(kSyncEncStepStaged);
      const int ft = fresh_tid();
      const int td = ((ft >> 5) % WD) * 8 + (ft & 7);
      const int tr = ((ft >> 5) / WD) * 4 + ((ft & 31) >> 3);

      if (BWD) {
        // grad_x for pixels s*TN3 + 4 tr + i, channels d0 + 4 td + j.
        acc_t acc_a[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc_a[i][j] = acc_t(0);
        const acc_t* avcol = st + s * TN3 + 4 * tr;
#pragma unroll 2
        for (int k = 0; k < 2 * KP; ++k) {
          const Pack<acc_t, 4> av = lds4(avcol + k * XS_LD);
          const Pack<acc_t, 4> bv = lds4(bop + k * X3_LD + 4 * td);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc_a[i][j] += av.v[i] * bv.v[j];
        }
        const int ln = s * TN3 + 4 * tr;  // first of the thread's 4 pixels in the tile
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const acc_t vi = vrow[ln + i];
          const Pack<acc_t, 4> xv = lds4(xs3 + (4 * tr + i) * X3_LD + 4 * td);
#pragma unroll
          for (int j = 0; j < 4; ++j) acc_a[i][j] -= vi * xv.v[j];
        }
        const int gn0 = n0 + ln;
        const int gd0 = d0 + 4 * td;
        scalar_t* gxb = p.grad_x + static_cast<int64_t>(b) * N * D;
        if (cf) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int gd = gd0 + j;
            if (gd >= D) continue;
            scalar_t* dst = gxb + static_cast<int64_t>(gd) * N + gn0;
            if (p.vec_out && gn0 < N) {  // N % 4 == 0: the 4 pixels are all in or all out
              Pack<scalar_t, 4> o;
#pragma unroll
              for (int i = 0; i < 4; ++i) o.v[i] = static_cast<scalar_t>(acc_a[i][j]);
              *reinterpret_cast<Pack<scalar_t, 4>*>(dst) = o;
            } else {
#pragma unroll
              for (int i = 0; i < 4; ++i)
                if (gn0 + i < N) dst[i] = static_cast<scalar_t>(acc_a[i][j]);
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int gn = gn0 + i;
            if (gn >= N) continue;
            scalar_t* dst = gxb + static_cast<int64_t>(gn) * D + gd0;
            if (p.vec_out && gd0 < D) {  // D % 4 == 0
              Pack<scalar_t, 4> o;
#pragma unroll
              for (int j = 0; j < 4; ++j) o.v[j] = static_cast<scalar_t>(acc_a[i][j]);
              *reinterpret_cast<Pack<scalar_t, 4>*>(dst) = o;
            } else {
#pragma unroll
              for (int j = 0; j < 4; ++j)
                if (gd0 + j < D) dst[j] = static_cast<scalar_t>(acc_a[i][j]);
            }
          }
        }
      }

      // Prefetch the next step (or the next tile's first logits chunk) only
      // now: it then overlaps the A^T X' / V^T X' FMAs below without adding
      // 16 live registers to the grad_x product.
      if (step + 1 < nsteps3) {
        load_x3(n0, step + 1);
      } else if (t + 1 < t_end) {
        load_x1(n0 + TN, 0);
      }

      // acc_b[i][j] += sum_n St[row(i)][n] x'[n][4 td + j], rows A (fwd) or V (bwd).
      const acc_t* arow = st + (BWD ? KP : 0) * XS_LD + s * TN3;
#pragma unroll 1
      for (int n = 0; n < TN3; n += 4) {
        Pack<acc_t, 4> av[4], xv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = lds4(arow + (tr + KQ * i) * XS_LD + n);
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[q] = lds4(xs3 + (n + q) * X3_LD + 4 * td);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc_b[i][j] += av[i].v[q] * xv[q].v[j];
      }

      if (s == SUB3 - 1) {
        // The block's slot accumulates over its tiles in tile order (it is
        // private to this block, so a plain read-modify-write is deterministic).
        // Dp is a multiple of DC3: no bounds, 16-byte aligned rows.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc_t* dst = p.part + (static_cast<int64_t>(fresh_ctaid()) * KP + tr + KQ * i) * Dp + d0 + 4 * td;
          Pack<acc_t, 4> o{{acc_b[i][0], acc_b[i][1], acc_b[i][2], acc_b[i][3]}};
          if (!first) {
            const Pack<acc_t, 4> old = *reinterpret_cast<const Pack<acc_t, 4>*>(dst);
#pragma unroll
            for (int j = 0; j < 4; ++j) o.v[j] += old.v[j];
          }
          *reinterpret_cast<Pack<acc_t, 4>*>(dst) = o;
        }
      }
    }
  }

  // Column sums: per-warp lane partials -> fixed-order sum over warps.
  const int lane = tid & 31, warp = tid >> 5;
  FASTCTX_SYNC(kSyncEncColumnSumsFree);
  acc_t* red = r1;
#pragma unroll
  for (int h = 0; h < KP / 32; ++h) {
    red[warp * KP + lane + 32 * h] = col_a[h];
    if (BWD) {
      red[(kWarps + warp) * KP + lane + 32 * h] = col_v[h];
      red[(2 * kWarps + warp) * KP + lane + 32 * h] = col_s[h];
    }
  }
  FASTCTX_SYNC(kSyncEncColumnSumsReady);
  if (tid < KP) {
    acc_t sa = acc_t(0), sv = acc_t(0), ss = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sa += red[w * KP + tid];
      if (BWD) {
        sv += red[(kWarps + w) * KP + tid];
        ss += red[(2 * kWarps + w) * KP + tid];
      }
    }
    const int64_t slot = static_cast<int64_t>(blk) * KP + tid;
    p.part_a[slot] = sa;
    if (BWD) {
      p.part_v[slot] = sv;
      p.part_s[slot] = ss;
    }
  }
}

// The pixels the tile kernel flagged (encoding_row_direct), from raw x and c:
// same blocks as the tile kernel, each walking its own pixel range in order.
// Per flagged pixel i, for every valid k (r_k = x_i - c_k in acc_t):
//   dist_k = sum_d r_kd^2, A = softmax_k(s_k dist_k);
//   forward:  slot P_k += A_k r_k. The reduce forms E_k = sum P_k - colsum(A)_k c'_k,
//             and the pixel is in no column sum, so it adds exactly A_k (x_i - c_k).
//   backward: dA_k = dE_k . r_k (shifted by its value at the winning codeword),
//             dL = A (dA - sum_j A_j dA_j), V_k = -2 s_k dL_k;
//             grad_x_i = sum_k (A_k dE_k - V_k r_k), stored whole (the tile kernel
//             wrote 0 there); slot Q_k += V_k r_k - A_k dE_k, which the reduce
//             adds to grad_c_k as it stands (the pixel is in neither colsum(A)
//             nor colsum(V)); slot S_k += dL_k dist_k (grad_s).
// kThreads / KP threads per codeword sum dist_k (and dA_k) over strided
// channels, thread 0 does the row's softmax over k, and thread t owns channels
// t, t + 256, ... of the slots and grad_x: fixed orders, no atomics, no warp
// collectives on the per-pixel path. A block reads the flags of its range in
// chunks of kThreads and skips chunks without one; clustered codewords never
// flag a pixel, so there the kernel is one read of the B*N flag bytes.
// The launch bound's 2 blocks per SM (<= 128 registers): with the default,
// ptxas cut this kernel to 40-64 registers and spilled (up to 56 bytes).
template <typename scalar_t, typename acc_t, int KP, bool BWD>
__global__ void __launch_bounds__(kThreads, 2) encoding_fixup_kernel(const EncParams<scalar_t, acc_t> p) {
  constexpr int TN = EncTile<KP, BWD>::TN, G = kThreads / KP;
  __shared__ acc_t sh_red[(BWD ? 2 : 1) * kThreads];  // per-thread partials of dist (and dA)
  __shared__ acc_t sh_dist[KP], sh_da[KP], sh_a[KP], sh_v[KP], sh_gs[KP];
  __shared__ unsigned sh_any[kWarps];
  __shared__ uint8_t sh_flag[kThreads];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int blk = blockIdx.x;
  const EncBlockTiles range = encoding_block_tiles(blk, p.tiles, p.parts);
  const int b = range.b, N = p.N, D = p.D, Dp = p.Dp, K = p.K;
  const int n_begin = range.t_begin * TN;
  const int n_end = range.t_end * TN < N ? range.t_end * TN : N;
  const scalar_t* __restrict__ xb = p.x + static_cast<int64_t>(b) * N * D;
  const acc_t* __restrict__ gkb = BWD ? p.gkd + static_cast<int64_t>(b) * KP * Dp : nullptr;
  const uint8_t* __restrict__ flags = p.flags + static_cast<int64_t>(b) * N;
  acc_t* slots = p.part + static_cast<int64_t>(blk) * KP * Dp;
  const int64_t xstep = p.cf ? N : 1;  // channel stride of x
  if (BWD && tid < KP) sh_gs[tid] = acc_t(0);  // sum dL_k dist_k over the flagged pixels
  bool any_flag = false;

  for (int c0 = n_begin; c0 < n_end; c0 += kThreads) {
    const bool f = c0 + tid < n_end && flags[c0 + tid] != 0;
    sh_flag[tid] = f ? 1 : 0;
    const unsigned w = __ballot_sync(0xffffffffu, f);
    if (lane == 0) sh_any[warp] = w;
    FASTCTX_SYNC(kSyncEncFixFlags);
    unsigned chunk_any = 0u;
#pragma unroll
    for (int q = 0; q < kWarps; ++q) chunk_any |= sh_any[q];
    any_flag |= chunk_any != 0u;
    for (int j = 0; chunk_any != 0u && j < kThreads && c0 + j < n_end; ++j) {
      if (!sh_flag[j]) continue;  // the same for every thread
      const int i = c0 + j;
      const scalar_t* xi = xb + (p.cf ? static_cast<int64_t>(i) : static_cast<int64_t>(i) * D);

      // dist_k (and dA_k = dE_k . r_k): G = kThreads / KP threads per codeword,
      // thread (k, g) over channels g, g + G, ...; thread 0 then adds the G
      // partials in order. No warp collectives on this data-dependent path.
      {
        const int k = tid / G, g = tid - (tid / G) * G;
        acc_t q = acc_t(0), e = acc_t(0);
        if (k < K) {
          const scalar_t* ck = p.codewords + static_cast<int64_t>(k) * D;
          for (int d = g; d < D; d += G) {
            const acc_t r = static_cast<acc_t>(xi[d * xstep]) - static_cast<acc_t>(ck[d]);
            q += r * r;
            if (BWD) e += gkb[static_cast<int64_t>(k) * Dp + d] * r;
          }
        }
        sh_red[tid] = q;
        if (BWD) sh_red[kThreads + tid] = e;
      }
      FASTCTX_SYNC(kSyncEncFixDistances);

      // Softmax (and its gradient) of the row, thread 0 over k in order.
      if (tid == 0) {
        acc_t mx = -INFINITY;
        for (int k = 0; k < K; ++k) {
          acc_t q = acc_t(0), e = acc_t(0);
          for (int g = 0; g < G; ++g) {
            q += sh_red[k * G + g];
            if (BWD) e += sh_red[kThreads + k * G + g];
          }
          sh_dist[k] = q;
          if (BWD) sh_da[k] = e;
          const acc_t logit = static_cast<acc_t>(p.scale[k]) * q;
          sh_a[k] = logit;
          mx = logit > mx ? logit : mx;
        }
        int win = 0;  // the lowest k holding the max (0 for a NaN row), as the tile kernel
        for (int k = K - 1; k >= 0; --k) win = sh_a[k] == mx ? k : win;
        acc_t sum = acc_t(0);
        for (int k = 0; k < K; ++k) {
          const acc_t e = encoding_exp_nonpos(sh_a[k] - mx);
          sh_a[k] = e;
          sum += e;
        }
        const acc_t inv = acc_t(1) / sum;
        for (int k = 0; k < K; ++k) sh_a[k] *= inv;
        if (BWD) {
          // dA shifted by its value at the winning codeword, as the tile kernel.
          const acc_t da_w = sh_da[win];
          acc_t r = acc_t(0);
          for (int k = 0; k < K; ++k) r += sh_a[k] * (sh_da[k] - da_w);
          for (int k = 0; k < K; ++k) {
            const acc_t dl = encoding_softmax_grad(sh_a[k], sh_da[k] - da_w, r);
            sh_v[k] = acc_t(-2) * static_cast<acc_t>(p.scale[k]) * dl;
            sh_gs[k] += dl * sh_dist[k];
          }
        }
      }
      FASTCTX_SYNC(kSyncEncFixWeights);

      // Per channel: the slots' residual terms (and grad_x).
      for (int d = tid; d < D; d += kThreads) {
        const acc_t xd = static_cast<acc_t>(xi[d * xstep]);
        acc_t gx = acc_t(0);
        for (int k = 0; k < K; ++k) {
          const acc_t r = xd - static_cast<acc_t>(p.codewords[static_cast<int64_t>(k) * D + d]);
          acc_t* slot = slots + static_cast<int64_t>(k) * Dp + d;
          if (!BWD) {
            *slot += sh_a[k] * r;
          } else {
            const acc_t ade = sh_a[k] * gkb[static_cast<int64_t>(k) * Dp + d], vr = sh_v[k] * r;
            gx += ade - vr;
            *slot += vr - ade;
          }
        }
        if (BWD) p.grad_x[static_cast<int64_t>(b) * N * D + (p.cf ? static_cast<int64_t>(d) * N + i
                                                                 : static_cast<int64_t>(i) * D + d)] =
            static_cast<scalar_t>(gx);
      }
    }
    FASTCTX_SYNC(kSyncEncFixChunkDone);  // sh_flag / sh_any free for the next chunk
  }
  if (BWD && any_flag && tid < K) p.part_s[static_cast<int64_t>(blk) * KP + tid] += sh_gs[tid];
}

// Pads (and for the codewords, centres) a [nb, K, D] tensor into fp32
// [nb, KP, Dp] and its transpose [nb, Dp, KP]: one block per 32 channels
// of one matrix (a 1-D grid, matrix-major), transposed through a
// conflict-free [KP][33] tile.
template <typename scalar_t, typename acc_t, int KP>
__global__ void __launch_bounds__(kThreads) encoding_prep_kernel(const scalar_t* __restrict__ src, int K,
                                                                 int64_t D, int64_t Dp, bool centre,
                                                                 acc_t* __restrict__ mean, acc_t* __restrict__ rows,
                                                                 acc_t* __restrict__ cols) {
  __shared__ acc_t tile[KP][33];
  __shared__ acc_t mu[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t col_blocks = Dp / 32;
  const int64_t mat = blockIdx.x / col_blocks;
  const int64_t d0 = (blockIdx.x - mat * col_blocks) * 32;
  src += mat * K * D;
  rows += mat * KP * Dp;
  cols += mat * Dp * KP;
  const int64_t d = d0 + lane;
  for (int k = warp; k < KP; k += kWarps)
    tile[k][lane] = (k < K && d < D) ? static_cast<acc_t>(src[k * D + d]) : acc_t(0);
  FASTCTX_SYNC(kSyncEncPrepTile);
  if (centre) {
    if (tid < 32) {
      acc_t s = acc_t(0);
      for (int k = 0; k < K; ++k) s += tile[k][tid];
      const acc_t m = d0 + tid < D ? s / static_cast<acc_t>(K) : acc_t(0);
      mu[tid] = m;
      mean[d0 + tid] = m;
    }
    FASTCTX_SYNC(kSyncEncPrepMean);
    for (int k = warp; k < K; k += kWarps)
      if (d < D) tile[k][lane] -= mu[lane];
    FASTCTX_SYNC(kSyncEncPrepCentred);
  }
  for (int k = warp; k < KP; k += kWarps) rows[k * Dp + d] = tile[k][lane];
  for (int e = tid; e < 32 * KP; e += kThreads) {
    const int dd = e / KP, k = e - (e / KP) * KP;
    cols[(d0 + dd) * KP + k] = tile[k][dd];
  }
}

// ||c'_k||^2 (blocks 0..KP-1) and dE_bk . c'_k (blocks (1 + b) * KP + k): one
// warp per dot product, lane-strided then a butterfly, so every block of the
// tile kernel sees the same fixed-order values.
template <typename acc_t>
__global__ void __launch_bounds__(32) encoding_norms_kernel(const acc_t* __restrict__ cpk,
                                                            const acc_t* __restrict__ gkd, int KP, int Dp,
                                                            acc_t* __restrict__ cn, acc_t* __restrict__ gk) {
  const int y = blockIdx.x / KP, k = blockIdx.x - (blockIdx.x / KP) * KP;
  const acc_t* c = cpk + static_cast<int64_t>(k) * Dp;
  const acc_t* a = y == 0 ? c : gkd + (static_cast<int64_t>(y - 1) * KP + k) * Dp;
  acc_t s = acc_t(0);
  for (int d = threadIdx.x; d < Dp; d += 32) s += a[d] * c[d];
  s = warp_sum(s);
  if (threadIdx.x == 0) {
    if (y == 0)
      cn[k] = s;
    else
      gk[static_cast<int64_t>(y - 1) * KP + k] = s;
  }
}

// E[b,k,d] = sum_p P[b,p,k,d] - (sum_p colA[b,p,k]) c'[k,d], parts in order.
// 1-D grid: kThreads channels of one (b, k) row per block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) encoding_fwd_reduce_kernel(
    const acc_t* __restrict__ part, const acc_t* __restrict__ part_a, const acc_t* __restrict__ cpk,
    scalar_t* __restrict__ out, int64_t parts, int K, int KP, int64_t D, int64_t Dp) {
  const int64_t d_blocks = tile_ceil_div(D, kThreads);
  const int64_t row = blockIdx.x / d_blocks;  // b * K + k
  const int64_t d = (blockIdx.x - row * d_blocks) * kThreads + threadIdx.x;
  if (d >= D) return;
  const int64_t b = row / K, k = row - (row / K) * K;
  acc_t s = acc_t(0), col = acc_t(0);
#pragma unroll 4
  for (int64_t q = 0; q < parts; ++q) {
    const int64_t slot = (b * parts + q) * KP + k;
    s += part[slot * Dp + d];
    col += part_a[slot];
  }
  out[row * D + d] = static_cast<scalar_t>(s - col * cpk[k * Dp + d]);
}

// grad_c[k,d] = sum_b (sum_p Q[b,p,k,d] - colA_b[k] dE[b,k,d]) - colV[k] c'[k,d];
// grad_s[k] = sum_{b,p} S[b,p,k]. Images and parts in order. 1-D grid:
// kThreads channels of one codeword per block.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) encoding_bwd_reduce_kernel(
    const acc_t* __restrict__ part, const acc_t* __restrict__ part_a, const acc_t* __restrict__ part_v,
    const acc_t* __restrict__ part_s, const acc_t* __restrict__ cpk, const scalar_t* __restrict__ grad,
    scalar_t* __restrict__ grad_c, scalar_t* __restrict__ grad_s, int64_t B, int64_t parts, int K, int KP,
    int64_t D, int64_t Dp) {
  const int64_t d_blocks = tile_ceil_div(D, kThreads);
  const int64_t k = blockIdx.x / d_blocks;
  const int64_t d_block = blockIdx.x - k * d_blocks;
  const int64_t d = d_block * kThreads + threadIdx.x;
  if (d_block == 0 && threadIdx.x == 0) {
    acc_t s = acc_t(0);
    for (int64_t q = 0; q < B * parts; ++q) s += part_s[q * KP + k];
    grad_s[k] = static_cast<scalar_t>(s);
  }
  if (d >= D) return;
  acc_t total = acc_t(0), col_v = acc_t(0);
  for (int64_t b = 0; b < B; ++b) {
    acc_t col_a = acc_t(0);
#pragma unroll 4
    for (int64_t q = 0; q < parts; ++q) {
      const int64_t slot = (b * parts + q) * KP + k;
      total += part[slot * Dp + d];
      col_a += part_a[slot];
      col_v += part_v[slot];
    }
    total -= col_a * static_cast<acc_t>(grad[(b * K + k) * D + d]);
  }
  grad_c[k * D + d] = static_cast<scalar_t>(total - col_v * cpk[k * Dp + d]);
}

}  // namespace fastctx
