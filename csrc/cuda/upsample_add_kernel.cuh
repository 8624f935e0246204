#pragma once
// Device code of upsample_add (contract: docs/kernels.md "upsample_add"),
// channels last: out[b, y, x] = residual[b, y, x] + bilinear(tokens)[b, y, x]
// (align_corners=True), and grad_tokens = U^T grad. Launch geometry (a row of
// threads per item, along C): upsample_add_launch.h.
//
// Taps, weights and every sum's order are the CPU kernel's
// (csrc/cpu/upsample_add.cpp): src = scale * d in the accumulation type,
// i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), l1 = clamp(src - i0,
// 0, 1), l0 = 1 - l1; both taps always applied (NaN and inf spread as in
// eager PyTorch). The backward is a gather per token, no atomics: the output
// columns x touching it, outer, each the weighted sum of the output rows y
// touching it, inner (the CPU kernel's separable order), taps applied one by
// one where both are the same index (eager's NaN for an infinite gradient).
// Every output element is written by one thread; no barriers. Pixel, token
// and tap indices are int32 (the plan checks B*H*W, B*h*w < 2^31), element
// offsets int64: ptxas outlines 64-bit divisions into calls whose frames live
// in local memory.
#include <cstdint>

#include "common/cuda_helpers.cuh"
#include "common/partials.cuh"  // sum_partials_kernel: the in-order reduction of grad_weight / grad_bias partials
#include "cuda/upsample_add_launch.h"

namespace fastctx {

// Named barriers of upsample_add_layer_norm (FASTCTX_SYNC).
enum UpsampleLnBarrier : int {
  kSyncUpLnRowPartials = 901,  // the warps' partial sums of a row wider than a warp are in shared memory
  kSyncUpLnAffineStaged,       // the rows' grad_weight / grad_bias sums of one chunk are in shared memory
  kSyncUpLnAffineRead,         // ... have been added up: the staging buffer is free again
};

template <typename acc_t>
struct UpsampleTap {
  int i0, i1;
  acc_t l0, l1;
};

// The taps of output index d along an axis with `in` inputs.
template <typename acc_t>
__device__ __forceinline__ UpsampleTap<acc_t> upsample_tap(int d, int in, acc_t scale) {
  const acc_t src = scale * static_cast<acc_t>(d);
  int a = static_cast<int>(src);  // floor: 0 <= src <= in - 1 (up to rounding)
  if (a > in - 1) a = in - 1;
  acc_t l1 = src - static_cast<acc_t>(a);
  l1 = l1 < acc_t(0) ? acc_t(0) : (l1 > acc_t(1) ? acc_t(1) : l1);
  return {a, a + (a < in - 1 ? 1 : 0), acc_t(1) - l1, l1};
}

// The output indices [lo, hi) whose taps touch input i (i0 <= i <= i1; both
// are monotone in d, so a contiguous range, empty when lo == hi), found by
// binary search on the exact tap function.
struct UpsampleRange {
  int lo, hi;
};

template <typename acc_t>
__device__ __forceinline__ UpsampleRange upsample_touching(int i, int in, int out, acc_t scale) {
  int lo = 0, hi = out;  // first d with i1(d) >= i
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (upsample_tap(mid, in, scale).i1 >= i) hi = mid;
    else lo = mid + 1;
  }
  int end_lo = lo, end_hi = out;  // first d with i0(d) > i
  while (end_lo < end_hi) {
    const int mid = end_lo + (end_hi - end_lo) / 2;
    if (upsample_tap(mid, in, scale).i0 > i) end_hi = mid;
    else end_lo = mid + 1;
  }
  return {lo, end_lo};
}

// dst += the taps of `tap` that are input i, applied to src (both, one by one, when i0 == i1 == i).
template <int VW, typename acc_t>
__device__ __forceinline__ void upsample_add_taps(acc_t (&dst)[VW], const acc_t (&src)[VW],
                                                  const UpsampleTap<acc_t>& tap, int i) {
  const bool first = tap.i0 == i, second = tap.i1 == i;
  if (first && second) {
#pragma unroll
    for (int t = 0; t < VW; ++t) dst[t] += tap.l0 * src[t] + tap.l1 * src[t];
  } else {
    const acc_t a = first ? tap.l0 : tap.l1;
#pragma unroll
    for (int t = 0; t < VW; ++t) dst[t] += a * src[t];
  }
}

// Where output pixel `pixel` = (b, y, x) reads: the element offsets of its
// four token rows and the taps of each axis.
template <typename acc_t>
struct UpsampleSource {
  int64_t t00, t01, t10, t11;
  UpsampleTap<acc_t> ty, tx;
};

template <typename acc_t>
__device__ __forceinline__ UpsampleSource<acc_t> upsample_source(int pixel, int h, int w, int H, int W, int64_t C,
                                                                 acc_t scale_y, acc_t scale_x) {
  const int x = pixel % W, by = pixel / W, y = by % H, b = by / H;
  const UpsampleTap<acc_t> ty = upsample_tap(y, h, scale_y), tx = upsample_tap(x, w, scale_x);
  return {static_cast<int64_t>((b * h + ty.i0) * w + tx.i0) * C, static_cast<int64_t>((b * h + ty.i0) * w + tx.i1) * C,
          static_cast<int64_t>((b * h + ty.i1) * w + tx.i0) * C, static_cast<int64_t>((b * h + ty.i1) * w + tx.i1) * C,
          ty, tx};
}

// One output element: the residual plus the four taps in the CPU kernel's
// order (the two token rows blended per column, then the two columns),
// rounded once to T. Every kernel writing `out` goes through here, so
// upsample_add_fwd and upsample_add_layer_norm_fwd agree bit for bit.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t upsample_add_value(const UpsampleSource<acc_t>& s, scalar_t t00, scalar_t t01,
                                                       scalar_t t10, scalar_t t11, scalar_t r) {
  const acc_t s0 = s.ty.l0 * static_cast<acc_t>(t00) + s.ty.l1 * static_cast<acc_t>(t10);
  const acc_t s1 = s.ty.l0 * static_cast<acc_t>(t01) + s.ty.l1 * static_cast<acc_t>(t11);
  return static_cast<scalar_t>(static_cast<acc_t>(r) + (s.tx.l0 * s0 + s.tx.l1 * s1));
}

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_add_pixel(const scalar_t* __restrict__ tokens,
                                                   const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                                                   int pixel, int lane, int lanes, int h, int w, int H, int W,
                                                   int64_t C, acc_t scale_y, acc_t scale_x) {
  using P = Pack<scalar_t, VW>;
  const UpsampleSource<acc_t> src = upsample_source(pixel, h, w, H, W, C, scale_y, scale_x);
  for (int64_t c = static_cast<int64_t>(lane) * VW; c < C; c += static_cast<int64_t>(lanes) * VW) {
    const P t00 = *reinterpret_cast<const P*>(tokens + src.t00 + c);
    const P t01 = *reinterpret_cast<const P*>(tokens + src.t01 + c);
    const P t10 = *reinterpret_cast<const P*>(tokens + src.t10 + c);
    const P t11 = *reinterpret_cast<const P*>(tokens + src.t11 + c);
    const P r = *reinterpret_cast<const P*>(residual + static_cast<int64_t>(pixel) * C + c);
    P o;
#pragma unroll
    for (int t = 0; t < VW; ++t) o.v[t] = upsample_add_value(src, t00.v[t], t01.v[t], t10.v[t], t11.v[t], r.v[t]);
    *reinterpret_cast<P*>(out + static_cast<int64_t>(pixel) * C + c) = o;
  }
}

// One row of lanes per output pixel (b, y, x).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) upsample_add_fwd_kernel(
    const scalar_t* __restrict__ tokens, const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
    int pixels, int h, int w, int H, int W, int64_t C, acc_t scale_y, acc_t scale_x, int lanes, int rows,
    int vec_width) {
  const unsigned tid = threadIdx.x;
  // Unsigned: blockIdx.x * rows < pixels + rows <= 2^31 - 1 + kThreads.
  const unsigned item = blockIdx.x * static_cast<unsigned>(rows) + tid / static_cast<unsigned>(lanes);
  if (item >= static_cast<unsigned>(pixels)) return;
  const int pixel = static_cast<int>(item), lane = static_cast<int>(tid) & (lanes - 1);
  if (vec_width > 1) {
    upsample_add_pixel<kVecWidth<scalar_t>, scalar_t, acc_t>(tokens, residual, out, pixel, lane, lanes, h, w, H, W,
                                                             C, scale_y, scale_x);
  } else {
    upsample_add_pixel<1, scalar_t, acc_t>(tokens, residual, out, pixel, lane, lanes, h, w, H, W, C, scale_y,
                                           scale_x);
  }
}

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_add_token_grad(const scalar_t* __restrict__ grad,
                                                        scalar_t* __restrict__ grad_tokens, int token, int lane,
                                                        int lanes, int h, int w, int H, int W, int64_t C,
                                                        acc_t scale_y, acc_t scale_x) {
  using P = Pack<scalar_t, VW>;
  const int j = token % w, bi = token / w, i = bi % h, b = bi / h;
  const UpsampleRange ry = upsample_touching(i, h, H, scale_y), rx = upsample_touching(j, w, W, scale_x);
  for (int64_t c = static_cast<int64_t>(lane) * VW; c < C; c += static_cast<int64_t>(lanes) * VW) {
    acc_t acc[VW];
#pragma unroll
    for (int t = 0; t < VW; ++t) acc[t] = acc_t(0);
    for (int x = rx.lo; x < rx.hi; ++x) {
      acc_t col[VW];  // sum over the touching rows y of weight(y, i) * grad[b, y, x]
#pragma unroll
      for (int t = 0; t < VW; ++t) col[t] = acc_t(0);
      for (int y = ry.lo; y < ry.hi; ++y) {
        const P g = *reinterpret_cast<const P*>(grad + static_cast<int64_t>((b * H + y) * W + x) * C + c);
        acc_t gv[VW];
#pragma unroll
        for (int t = 0; t < VW; ++t) gv[t] = static_cast<acc_t>(g.v[t]);
        upsample_add_taps<VW>(col, gv, upsample_tap(y, h, scale_y), i);
      }
      upsample_add_taps<VW>(acc, col, upsample_tap(x, w, scale_x), j);
    }
    P o;
#pragma unroll
    for (int t = 0; t < VW; ++t) o.v[t] = static_cast<scalar_t>(acc[t]);
    *reinterpret_cast<P*>(grad_tokens + static_cast<int64_t>(token) * C + c) = o;
  }
}

// grad_tokens: one row of lanes per token (b, i, j), a gather over the output
// pixels whose taps touch it (each output element written once).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) upsample_add_bwd_kernel(
    const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_tokens, int tokens, int h, int w, int H, int W,
    int64_t C, acc_t scale_y, acc_t scale_x, int lanes, int rows, int vec_width) {
  const unsigned tid = threadIdx.x;
  const unsigned item = blockIdx.x * static_cast<unsigned>(rows) + tid / static_cast<unsigned>(lanes);
  if (item >= static_cast<unsigned>(tokens)) return;
  const int token = static_cast<int>(item), lane = static_cast<int>(tid) & (lanes - 1);
  if (vec_width > 1) {
    upsample_add_token_grad<kVecWidth<scalar_t>, scalar_t, acc_t>(grad, grad_tokens, token, lane, lanes, h, w, H, W,
                                                                  C, scale_y, scale_x);
  } else {
    upsample_add_token_grad<1, scalar_t, acc_t>(grad, grad_tokens, token, lane, lanes, h, w, H, W, C, scale_y,
                                                scale_x);
  }
}

// ---- upsample_add_layer_norm ---------------------------------------------------
// out = residual + up(tokens) as above (upsample_source / upsample_add_value:
// the same bits), then LayerNorm over C of the rounded out row. Launch
// geometry, register budget and the backward's pixel ranges:
// upsample_add_launch.h ("upsample_add_layer_norm").
//
// A row of `lanes` threads per pixel. Lane l's chunk k is the VW = 16 / sizeof(T)
// elements from (k * lanes + l) * VW: one 16-byte vector when `vec` (C % VW
// == 0 and aligned pointers), else VW scalar accesses masked at C. The
// element -> thread map, and so every sum's order, is the same on both paths:
// results do not depend on the pointers' alignment. Row sums: each thread's
// elements in (k, t) order, a butterfly over the row's lanes within the warp,
// then (rows wider than a warp) the warps' partials in warp order. Rows past
// the last pixel take part in every shuffle and barrier, masked.
//
// With chunks <= the budget (kCached) a thread keeps its elements in
// registers between the passes over the row; else (C beyond it, lanes =
// kThreads, one row per block) it re-reads them: the forward its own writes
// of `out`, the backward its inputs.
//
// Forward statistics: mean = x0 + sum_c (out - x0) / C, x0 = out[pixel, 0]
// as stored (a plain fp32 sum of a row far from zero rounds at every add),
// then var = sum_c (out - mean)^2 / C. Backward: one row reduction of sum g,
// sum g xhat and ds = sum g out; a row whose first two are not finite takes
// eager's CPU algebra (grad_out + rstd g + b out + shift), selected per row
// with no barrier depending on it.

// Elements c0 .. c0 + VW - 1 of a row: one vector, or VW scalars (those at c >= C read as 0).
template <int VW, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VW> load_row_chunk(const scalar_t* row, int c0, int C, bool vec) {
  using P = Pack<scalar_t, VW>;
  if (vec) return *reinterpret_cast<const P*>(row + c0);
  P p;
#pragma unroll
  for (int t = 0; t < VW; ++t) p.v[t] = c0 + t < C ? row[c0 + t] : static_cast<scalar_t>(0.f);
  return p;
}

template <int VW, typename scalar_t>
__device__ __forceinline__ void store_row_chunk(scalar_t* row, int c0, int C, bool vec, const Pack<scalar_t, VW>& p) {
  if (vec) {
    *reinterpret_cast<Pack<scalar_t, VW>*>(row + c0) = p;
    return;
  }
#pragma unroll
  for (int t = 0; t < VW; ++t)
    if (c0 + t < C) row[c0 + t] = p.v[t];
}

// The chunk of `out` at c0 of the pixel whose taps are `src` and residual row `res`.
template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ Pack<scalar_t, VW> upsample_add_chunk(const scalar_t* __restrict__ tokens,
                                                                 const scalar_t* __restrict__ res,
                                                                 const UpsampleSource<acc_t>& src, int c0, int C,
                                                                 bool vec) {
  const Pack<scalar_t, VW> t00 = load_row_chunk<VW>(tokens + src.t00, c0, C, vec);
  const Pack<scalar_t, VW> t01 = load_row_chunk<VW>(tokens + src.t01, c0, C, vec);
  const Pack<scalar_t, VW> t10 = load_row_chunk<VW>(tokens + src.t10, c0, C, vec);
  const Pack<scalar_t, VW> t11 = load_row_chunk<VW>(tokens + src.t11, c0, C, vec);
  const Pack<scalar_t, VW> r = load_row_chunk<VW>(res, c0, C, vec);
  Pack<scalar_t, VW> o;
#pragma unroll
  for (int t = 0; t < VW; ++t) o.v[t] = upsample_add_value(src, t00.v[t], t01.v[t], t10.v[t], t11.v[t], r.v[t]);
  return o;
}

// v[n] summed over the row's `lanes` threads (a power of two; rows are
// aligned groups of the block), the same value in every lane: butterfly
// shuffles within the warp (commutative pairwise adds: every lane gets the
// same bits), then for rows wider than a warp the warps' partials, staged in
// `red` ([N][kWarps]), added in warp order. Every thread of the block must
// call it (full-mask shuffles, and a barrier when lanes > 32). One barrier
// per call: a caller reusing `red` must have passed another barrier of every
// thread in between (the callers alternate two buffers).
template <int N, typename acc_t>
__device__ __forceinline__ void upsample_ln_row_sum(acc_t (&v)[N], int lanes, acc_t* red) {
  const int width = lanes < kWarpSize ? lanes : kWarpSize;
  for (int off = width >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_xor_sync(0xffffffffu, v[n], off);
  }
  if (lanes > kWarpSize) {  // uniform over the block
    const int tid = static_cast<int>(threadIdx.x), warps = lanes / kWarpSize;
    if ((tid & (kWarpSize - 1)) == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) red[n * kWarps + tid / kWarpSize] = v[n];
    }
    FASTCTX_SYNC(kSyncUpLnRowPartials);
    const int first = (tid / lanes) * warps;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      acc_t s = red[n * kWarps + first];
      for (int i = 1; i < warps; ++i) s += red[n * kWarps + first + i];
      v[n] = s;
    }
  }
}

// rstd from the biased variance: rsqrt(var + eps) on the GPU, as eager's
// layer norm (no division: IEEE division's slow path is a called subroutine
// whose frame ptxas may put in local memory); 1 / sqrt in the emulation.
template <typename acc_t>
__device__ __forceinline__ acc_t upsample_ln_rstd(acc_t var, acc_t eps) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) {
    return rsqrtf(var + eps);
  } else {
    return rsqrt(var + eps);
  }
#else
  return acc_t(1) / std::sqrt(var + eps);
#endif
}

// weight[c], or 1 without a weight.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t upsample_ln_weight(const scalar_t* __restrict__ weight, int c) {
  return weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1);
}

// normed = (v - mean) rstd weight + bias, each factor only when present (eager's maths without it).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsample_ln_affine(acc_t v, acc_t mu, acc_t rs, const scalar_t* weight,
                                                    const scalar_t* bias, int c) {
  acc_t n = (v - mu) * rs;
  if (weight != nullptr) n = n * static_cast<acc_t>(weight[c]);
  if (bias != nullptr) n = n + static_cast<acc_t>(bias[c]);
  return n;
}

// x0 of the shifted mean: the row's first value of `out` as stored (rounded
// to T), recomputed from its taps with upsample_add_value (the bits the row's
// lane 0 writes): five scalar loads of lines the row reads anyway, no shared
// memory and no barrier (a row wider than a warp has its lane 0 in another
// warp; the re-read path's `out` is only visible to the other threads after
// a barrier).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsample_ln_first(const scalar_t* __restrict__ tokens,
                                                   const scalar_t* __restrict__ res,
                                                   const UpsampleSource<acc_t>& src) {
  return static_cast<acc_t>(
      upsample_add_value(src, tokens[src.t00], tokens[src.t01], tokens[src.t10], tokens[src.t11], res[0]));
}

template <typename acc_t>
__device__ __forceinline__ bool upsample_ln_finite(acc_t v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// Forward of one row (pixel) with the row's elements kept in registers (chunks <= KC).
template <int VW, int KC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_ln_fwd_cached(
    const scalar_t* __restrict__ tokens, const scalar_t* __restrict__ res, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, scalar_t* __restrict__ normed,
    const UpsampleSource<acc_t>& src, bool valid, int lane, int lanes, int chunks, int C, bool vec, acc_t inv_c,
    acc_t eps, acc_t (*red)[kWarps], acc_t& mu, acc_t& rs) {
  // x0: a row within a warp takes it from its lane 0 (v[0][0]) by one shuffle after the loads; a wider row
  // recomputes it, before the loads (the taps are dead after them). lanes: uniform over the block.
  acc_t x0 = lanes > kWarpSize ? upsample_ln_first(tokens, res, src) : acc_t(0);
  acc_t v[KC][VW];
#pragma unroll
  for (int k = 0; k < KC; ++k) {
    const int c0 = (k * lanes + lane) * VW;
    if (valid && k < chunks && c0 < C) {
      const Pack<scalar_t, VW> o = upsample_add_chunk<VW>(tokens, res, src, c0, C, vec);
      store_row_chunk<VW>(out, c0, C, vec, o);
#pragma unroll
      for (int t = 0; t < VW; ++t) v[k][t] = c0 + t < C ? static_cast<acc_t>(o.v[t]) : acc_t(0);
    } else {
#pragma unroll
      for (int t = 0; t < VW; ++t) v[k][t] = acc_t(0);
    }
  }
  if (lanes <= kWarpSize) {  // the row's lane 0: its first lane within the warp
    x0 = __shfl_sync(0xffffffffu, v[0][0], static_cast<int>(threadIdx.x) & (kWarpSize - 1) & ~(lanes - 1));
  }
  acc_t sum[1] = {acc_t(0)};
#pragma unroll
  for (int k = 0; k < KC; ++k) {
    const int c0 = (k * lanes + lane) * VW;
#pragma unroll
    for (int t = 0; t < VW; ++t) {
      const acc_t d = v[k][t] - x0;
      if (valid && k < chunks && c0 + t < C) sum[0] += d;
    }
  }
  upsample_ln_row_sum(sum, lanes, red[0]);
  mu = x0 + sum[0] * inv_c;
  acc_t sq[1] = {acc_t(0)};
#pragma unroll
  for (int k = 0; k < KC; ++k) {
    const int c0 = (k * lanes + lane) * VW;
#pragma unroll
    for (int t = 0; t < VW; ++t) {
      const acc_t d = v[k][t] - mu;
      if (valid && k < chunks && c0 + t < C) sq[0] += d * d;
    }
  }
  upsample_ln_row_sum(sq, lanes, red[1]);
  rs = upsample_ln_rstd(sq[0] * inv_c, eps);
#pragma unroll
  for (int k = 0; k < KC; ++k) {
    const int c0 = (k * lanes + lane) * VW;
    if (valid && k < chunks && c0 < C) {
      Pack<scalar_t, VW> n;
#pragma unroll
      for (int t = 0; t < VW; ++t) {
        const int c = c0 + t < C ? c0 + t : c0;  // masked elements: any valid column, never stored
        n.v[t] = static_cast<scalar_t>(upsample_ln_affine(v[k][t], mu, rs, weight, bias, c));
      }
      store_row_chunk<VW>(normed, c0, C, vec, n);
    }
  }
}

// Forward of one row wider than the register budget: three passes, the
// second and third re-reading the row's `out` (this thread's own writes).
template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_ln_fwd_streamed(
    const scalar_t* __restrict__ tokens, const scalar_t* __restrict__ res, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, scalar_t* __restrict__ normed,
    const UpsampleSource<acc_t>& src, bool valid, int lane, int lanes, int chunks, int C, bool vec, acc_t inv_c,
    acc_t eps, acc_t (*red)[kWarps], acc_t& mu, acc_t& rs) {
  const acc_t x0 = upsample_ln_first(tokens, res, src);  // lane 0's out[0] is not visible here yet
  acc_t sum[1] = {acc_t(0)};
  for (int k = 0; k < chunks; ++k) {
    const int c0 = (k * lanes + lane) * VW;
    if (valid && c0 < C) {
      const Pack<scalar_t, VW> o = upsample_add_chunk<VW>(tokens, res, src, c0, C, vec);
      store_row_chunk<VW>(out, c0, C, vec, o);
#pragma unroll
      for (int t = 0; t < VW; ++t)
        if (c0 + t < C) sum[0] += static_cast<acc_t>(o.v[t]) - x0;
    }
  }
  upsample_ln_row_sum(sum, lanes, red[0]);
  mu = x0 + sum[0] * inv_c;
  acc_t sq[1] = {acc_t(0)};
  for (int k = 0; k < chunks; ++k) {
    const int c0 = (k * lanes + lane) * VW;
    if (valid && c0 < C) {
      const Pack<scalar_t, VW> o = load_row_chunk<VW>(out, c0, C, vec);
#pragma unroll
      for (int t = 0; t < VW; ++t) {
        const acc_t d = static_cast<acc_t>(o.v[t]) - mu;
        if (c0 + t < C) sq[0] += d * d;
      }
    }
  }
  upsample_ln_row_sum(sq, lanes, red[1]);
  rs = upsample_ln_rstd(sq[0] * inv_c, eps);
  for (int k = 0; k < chunks; ++k) {
    const int c0 = (k * lanes + lane) * VW;
    if (valid && c0 < C) {
      const Pack<scalar_t, VW> o = load_row_chunk<VW>(out, c0, C, vec);
      Pack<scalar_t, VW> n;
#pragma unroll
      for (int t = 0; t < VW; ++t) {
        const int c = c0 + t < C ? c0 + t : c0;
        n.v[t] = static_cast<scalar_t>(upsample_ln_affine(static_cast<acc_t>(o.v[t]), mu, rs, weight, bias, c));
      }
      store_row_chunk<VW>(normed, c0, C, vec, n);
    }
  }
}

// Resident blocks per SM the kernels are compiled for: 0 (no bound: nvcc
// emits no .minnctapersm, ptxas picks the registers, as for the other
// upsample_add kernels) for fp32 accumulation, where that gives no spills;
// 1 for the fp64 instantiation (emulation and completeness), which under
// ptxas's own choice spills a few bytes and may use more registers instead
// (as gla_min_blocks).
template <typename acc_t>
constexpr int upsample_ln_min_blocks() {
  return sizeof(acc_t) > 4 ? 1 : 0;
}

// Forward: one row of lanes per output pixel (b, y, x); out, normed, and the
// pixel's mean and rstd (written by lane 0). kCached: the plan's `cached`
// (two instantiations, so each path gets its own register allocation).
template <typename scalar_t, typename acc_t, bool kCached>
__global__ void __launch_bounds__(kThreads, upsample_ln_min_blocks<acc_t>()) upsample_add_layer_norm_fwd_kernel(
    const scalar_t* __restrict__ tokens, const scalar_t* __restrict__ residual, const scalar_t* __restrict__ weight,
    const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, scalar_t* __restrict__ normed,
    acc_t* __restrict__ mean, acc_t* __restrict__ rstd, int pixels, int h, int w, int H, int W, int C,
    acc_t scale_y, acc_t scale_x, acc_t inv_c, acc_t eps, int lanes, int rows, int chunks, bool vec) {
  constexpr int VW = kVecWidth<scalar_t>;
  constexpr int KC = upsample_ln_cache_chunks(sizeof(scalar_t), sizeof(acc_t), false);
  __shared__ acc_t red[2][kWarps];
  const unsigned tid = threadIdx.x;
  // Unsigned: blockIdx.x * rows < pixels + rows <= 2^31 - 1 + kThreads.
  const unsigned item = blockIdx.x * static_cast<unsigned>(rows) + tid / static_cast<unsigned>(lanes);
  const bool valid = item < static_cast<unsigned>(pixels);  // no early exit: the row sums need every thread
  const int pixel = valid ? static_cast<int>(item) : 0, lane = static_cast<int>(tid) & (lanes - 1);
  const UpsampleSource<acc_t> src = upsample_source(pixel, h, w, H, W, static_cast<int64_t>(C), scale_y, scale_x);
  const int64_t base = static_cast<int64_t>(pixel) * C;
  acc_t mu, rs;
  if constexpr (kCached) {
    upsample_ln_fwd_cached<VW, KC>(tokens, residual + base, weight, bias, out + base, normed + base, src, valid, lane,
                                   lanes, chunks, C, vec, inv_c, eps, red, mu, rs);
  } else {
    upsample_ln_fwd_streamed<VW>(tokens, residual + base, weight, bias, out + base, normed + base, src, valid, lane,
                                 lanes, chunks, C, vec, inv_c, eps, red, mu, rs);
  }
  if (valid && lane == 0) {
    mean[pixel] = mu;
    rstd[pixel] = rs;
  }
}

// Backward, cached path (grad_normed and xhat of the thread's columns in
// registers between the two passes; the weight re-read, from L1): block j owns the contiguous pixel range [begin, end)
// = [j * per_block, min(pixels, (j + 1) * per_block)) (per_block: the plan's,
// a function of the shape only; no block is empty); row r takes pixels
// begin + r, begin + r + rows, ... When part_w != nullptr, each thread keeps
// its columns' sums of grad_normed * xhat and grad_normed over its pixels in
// registers; at the end the block adds its
// rows' sums in row order (through shared memory when rows > 1) into its
// partial slice part_w / part_b [gridDim.x][C].
template <int VW, int KC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_ln_bwd_cached(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grad_normed, const scalar_t* __restrict__ out,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const scalar_t* __restrict__ weight,
    scalar_t* __restrict__ grad_sum, acc_t* __restrict__ part_w, acc_t* __restrict__ part_b, int begin, int end,
    int C, int lanes, int rows, int chunks, bool vec, acc_t inv_c, acc_t (*red)[3 * kWarps],
    acc_t (*stage)[kThreads * VW]) {
  const int tid = static_cast<int>(threadIdx.x), row = tid / lanes, lane = tid & (lanes - 1);
  const bool affine = part_w != nullptr;
  acc_t aw[KC][VW], ab[KC][VW];
#pragma unroll
  for (int k = 0; k < KC; ++k) {
#pragma unroll
    for (int t = 0; t < VW; ++t) aw[k][t] = ab[k][t] = acc_t(0);
  }
  const int steps = (end - begin + rows - 1) / rows;
  for (int step = 0; step < steps; ++step) {
    const int p = begin + step * rows + row;
    const bool valid = p < end;
    const int64_t base = static_cast<int64_t>(valid ? p : begin) * C;
    const acc_t mu = valid ? mean[p] : acc_t(0), rs = valid ? rstd[p] : acc_t(0);
    // The row's out (not xhat: the non-finite rows' algebra needs out's bits; xhat = (out - mean) rstd is
    // recomputed where used, the same bits) and grad_normed.
    acc_t x[KC][VW], gn[KC][VW];
    // sum_c g, sum_c g xhat (g = grad_normed weight), and sum_c g out for a non-finite row's algebra
    acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      const int c0 = (k * lanes + lane) * VW;
      if (valid && k < chunks && c0 < C) {
        const Pack<scalar_t, VW> o = load_row_chunk<VW>(out + base, c0, C, vec);
        const Pack<scalar_t, VW> g = load_row_chunk<VW>(grad_normed + base, c0, C, vec);
#pragma unroll
        for (int t = 0; t < VW; ++t) {
          x[k][t] = static_cast<acc_t>(o.v[t]);
          gn[k][t] = static_cast<acc_t>(g.v[t]);
          if (c0 + t < C) {  // masked elements (scalar path) add nothing: an inf weight[0] times 0 would be NaN
            const acc_t gw = gn[k][t] * upsample_ln_weight<acc_t>(weight, c0 + t);
            sums[0] += gw;
            sums[1] += gw * ((x[k][t] - mu) * rs);
            sums[2] += gw * x[k][t];
          } else {
            x[k][t] = gn[k][t] = acc_t(0);
          }
        }
      } else {
#pragma unroll
        for (int t = 0; t < VW; ++t) x[k][t] = gn[k][t] = acc_t(0);
      }
    }
    upsample_ln_row_sum(sums, lanes, red[step & 1]);
    // An inf in the weight or grad_normed makes sum_c g or sum_c g xhat non-finite: the row takes eager's
    // CPU algebra, grad_sum = grad_out + rstd g + b out + shift (the same bits in every lane of the row; a
    // select, no barrier depends on it; the finite rows' arithmetic is the formula's as before).
    const bool finite = upsample_ln_finite(sums[0]) && upsample_ln_finite(sums[1]);
    const acc_t b = (sums[0] * mu - sums[2]) * rs * rs * rs * inv_c;
    const acc_t mg = sums[0] * inv_c, mgx = sums[1] * inv_c, shift = -b * mu - sums[0] * rs * inv_c;
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      const int c0 = (k * lanes + lane) * VW;
      if (valid && k < chunks && c0 < C) {
        const Pack<scalar_t, VW> go = load_row_chunk<VW>(grad_out + base, c0, C, vec);
        Pack<scalar_t, VW> gs;
#pragma unroll
        for (int t = 0; t < VW; ++t) {
          const acc_t gw = gn[k][t] * upsample_ln_weight<acc_t>(weight, c0 + t < C ? c0 + t : c0);
          const acc_t xh = (x[k][t] - mu) * rs;
          gs.v[t] = finite ? static_cast<scalar_t>(static_cast<acc_t>(go.v[t]) + rs * (gw - mg - xh * mgx))
                           : static_cast<scalar_t>(static_cast<acc_t>(go.v[t]) + (rs * gw + b * x[k][t] + shift));
          if (affine) {
            aw[k][t] += gn[k][t] * xh;
            ab[k][t] += gn[k][t];
          }
        }
        store_row_chunk<VW>(grad_sum + base, c0, C, vec, gs);
      }
    }
  }
  if (!affine) return;  // uniform over the grid
  acc_t* pw = part_w + static_cast<int64_t>(blockIdx.x) * C;
  acc_t* pb = part_b + static_cast<int64_t>(blockIdx.x) * C;
  if (rows == 1) {  // the thread's own columns
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      const int c0 = (k * lanes + lane) * VW;
#pragma unroll
      for (int t = 0; t < VW; ++t) {
        if (k < chunks && c0 + t < C) {
          pw[c0 + t] = aw[k][t];
          pb[c0 + t] = ab[k][t];
        }
      }
    }
    return;
  }
  // rows > 1: per chunk, every row stages its sums; column q of the chunk adds the rows' in row order.
  const int width = lanes * VW;  // columns per chunk; rows * width = kThreads * VW
#pragma unroll
  for (int k = 0; k < KC; ++k) {
    if (k < chunks) {  // uniform over the block
#pragma unroll
      for (int t = 0; t < VW; ++t) {
        stage[0][tid * VW + t] = aw[k][t];
        stage[1][tid * VW + t] = ab[k][t];
      }
      FASTCTX_SYNC(kSyncUpLnAffineStaged);
      for (int q = tid; q < width; q += kThreads) {
        const int c = k * width + q;
        if (c < C) {
          acc_t a = stage[0][q], b = stage[1][q];
          for (int r = 1; r < rows; ++r) {
            a += stage[0][r * width + q];
            b += stage[1][r * width + q];
          }
          pw[c] = a;
          pb[c] = b;
        }
      }
      FASTCTX_SYNC(kSyncUpLnAffineRead);
    }
  }
}

// Backward of rows wider than the register budget (lanes = kThreads: one row
// per block, its pixels in order): pass 1 reads out, grad_normed and weight for
// the row sums, pass 2 reads them again with grad_out. The block's affine
// sums go straight to its partial slice (each column's by its one thread, in
// pixel order: the first step writes, the later ones add).
template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_ln_bwd_streamed(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grad_normed, const scalar_t* __restrict__ out,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const scalar_t* __restrict__ weight,
    scalar_t* __restrict__ grad_sum, acc_t* __restrict__ part_w, acc_t* __restrict__ part_b, int begin, int end,
    int C, int lanes, int chunks, bool vec, acc_t inv_c, acc_t (*red)[3 * kWarps]) {
  const int lane = static_cast<int>(threadIdx.x) & (lanes - 1);
  const bool affine = part_w != nullptr;
  acc_t* pw = affine ? part_w + static_cast<int64_t>(blockIdx.x) * C : nullptr;
  acc_t* pb = affine ? part_b + static_cast<int64_t>(blockIdx.x) * C : nullptr;
  // rows == 1 here (lanes == kThreads): every thread walks the same pixels, so the row sums' barriers are
  // reached by the whole block.
  for (int p = begin; p < end; ++p) {
    const int step = p - begin;
    const int64_t base = static_cast<int64_t>(p) * C;
    const acc_t mu = mean[p], rs = rstd[p];
    acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // sum_c g, sum_c g xhat, sum_c g out
    for (int k = 0; k < chunks; ++k) {
      const int c0 = (k * lanes + lane) * VW;
      if (c0 < C) {
        const Pack<scalar_t, VW> o = load_row_chunk<VW>(out + base, c0, C, vec);
        const Pack<scalar_t, VW> g = load_row_chunk<VW>(grad_normed + base, c0, C, vec);
#pragma unroll
        for (int t = 0; t < VW; ++t) {
          if (c0 + t < C) {
            const acc_t x = static_cast<acc_t>(o.v[t]);
            const acc_t xh = (x - mu) * rs;
            const acc_t gw = static_cast<acc_t>(g.v[t]) * upsample_ln_weight<acc_t>(weight, c0 + t);
            sums[0] += gw;
            sums[1] += gw * xh;
            sums[2] += gw * x;
          }
        }
      }
    }
    upsample_ln_row_sum(sums, lanes, red[step & 1]);
    // A non-finite row: eager's CPU algebra (as the cached path).
    const bool finite = upsample_ln_finite(sums[0]) && upsample_ln_finite(sums[1]);
    const acc_t b = (sums[0] * mu - sums[2]) * rs * rs * rs * inv_c;
    const acc_t mg = sums[0] * inv_c, mgx = sums[1] * inv_c, shift = -b * mu - sums[0] * rs * inv_c;
    for (int k = 0; k < chunks; ++k) {
      const int c0 = (k * lanes + lane) * VW;
      if (c0 < C) {
        const Pack<scalar_t, VW> o = load_row_chunk<VW>(out + base, c0, C, vec);
        const Pack<scalar_t, VW> g = load_row_chunk<VW>(grad_normed + base, c0, C, vec);
        const Pack<scalar_t, VW> go = load_row_chunk<VW>(grad_out + base, c0, C, vec);
        Pack<scalar_t, VW> gs;
#pragma unroll
        for (int t = 0; t < VW; ++t) {
          const int c = c0 + t < C ? c0 + t : c0;
          const acc_t x = static_cast<acc_t>(o.v[t]);
          const acc_t xh = (x - mu) * rs, gn = static_cast<acc_t>(g.v[t]);
          const acc_t gw = gn * upsample_ln_weight<acc_t>(weight, c);
          gs.v[t] = finite ? static_cast<scalar_t>(static_cast<acc_t>(go.v[t]) + rs * (gw - mg - xh * mgx))
                           : static_cast<scalar_t>(static_cast<acc_t>(go.v[t]) + (rs * gw + b * x + shift));
          if (affine && c0 + t < C) {
            pw[c] = step == 0 ? gn * xh : pw[c] + gn * xh;
            pb[c] = step == 0 ? gn : pb[c] + gn;
          }
        }
        store_row_chunk<VW>(grad_sum + base, c0, C, vec, gs);
      }
    }
  }
}

// Backward: grad_sum = grad_out + LayerNorm's input gradient of grad_normed,
// and (part_w != nullptr) the block's partials of grad_weight and grad_bias
// [gridDim.x][C], which sum_partials_kernel (common/partials.cuh) adds in
// block order. kCached: the plan's `cached`, as in the forward.
template <typename scalar_t, typename acc_t, bool kCached>
__global__ void __launch_bounds__(kThreads, upsample_ln_min_blocks<acc_t>()) upsample_add_layer_norm_bwd_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grad_normed, const scalar_t* __restrict__ out,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const scalar_t* __restrict__ weight,
    scalar_t* __restrict__ grad_sum, acc_t* __restrict__ part_w, acc_t* __restrict__ part_b, int pixels, int C,
    int per_block, int lanes, int rows, int chunks, bool vec, acc_t inv_c) {
  constexpr int VW = kVecWidth<scalar_t>;
  constexpr int KC = upsample_ln_cache_chunks(sizeof(scalar_t), sizeof(acc_t), true);
  __shared__ acc_t red[2][3 * kWarps];  // two buffers of the three row sums, alternating by step
  // 32-bit: begin <= pixels < 2^31 (the plan makes every block non-empty).
  const int begin = static_cast<int>(blockIdx.x) * per_block;
  const int end = begin + min(per_block, pixels - begin);
  if constexpr (kCached) {
    __shared__ acc_t stage[2][kThreads * VW];
    upsample_ln_bwd_cached<VW, KC>(grad_out, grad_normed, out, mean, rstd, weight, grad_sum, part_w, part_b, begin,
                                   end, C, lanes, rows, chunks, vec, inv_c, red, stage);
  } else {
    upsample_ln_bwd_streamed<VW>(grad_out, grad_normed, out, mean, rstd, weight, grad_sum, part_w, part_b, begin, end,
                                 C, lanes, chunks, vec, inv_c, red);
  }
}


}  // namespace fastctx
