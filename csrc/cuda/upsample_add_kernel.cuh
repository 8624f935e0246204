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
#include "cuda/upsample_add_launch.h"

namespace fastctx {

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

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void upsample_add_pixel(const scalar_t* __restrict__ tokens,
                                                   const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                                                   int pixel, int lane, int lanes, int h, int w, int H, int W,
                                                   int64_t C, acc_t scale_y, acc_t scale_x) {
  using P = Pack<scalar_t, VW>;
  const int x = pixel % W, by = pixel / W, y = by % H, b = by / H;
  const UpsampleTap<acc_t> ty = upsample_tap(y, h, scale_y), tx = upsample_tap(x, w, scale_x);
  const scalar_t* t00p = tokens + static_cast<int64_t>((b * h + ty.i0) * w + tx.i0) * C;
  const scalar_t* t01p = tokens + static_cast<int64_t>((b * h + ty.i0) * w + tx.i1) * C;
  const scalar_t* t10p = tokens + static_cast<int64_t>((b * h + ty.i1) * w + tx.i0) * C;
  const scalar_t* t11p = tokens + static_cast<int64_t>((b * h + ty.i1) * w + tx.i1) * C;
  for (int64_t c = static_cast<int64_t>(lane) * VW; c < C; c += static_cast<int64_t>(lanes) * VW) {
    const P t00 = *reinterpret_cast<const P*>(t00p + c);
    const P t01 = *reinterpret_cast<const P*>(t01p + c);
    const P t10 = *reinterpret_cast<const P*>(t10p + c);
    const P t11 = *reinterpret_cast<const P*>(t11p + c);
    const P r = *reinterpret_cast<const P*>(residual + static_cast<int64_t>(pixel) * C + c);
    P o;
#pragma unroll
    for (int t = 0; t < VW; ++t) {
      // The CPU kernel's order: the two token rows blended per column, then the two columns.
      const acc_t s0 = ty.l0 * static_cast<acc_t>(t00.v[t]) + ty.l1 * static_cast<acc_t>(t10.v[t]);
      const acc_t s1 = ty.l0 * static_cast<acc_t>(t01.v[t]) + ty.l1 * static_cast<acc_t>(t11.v[t]);
      o.v[t] = static_cast<scalar_t>(static_cast<acc_t>(r.v[t]) + (tx.l0 * s0 + tx.l1 * s1));
    }
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

}  // namespace fastctx
