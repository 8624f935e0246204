#pragma once
// Device code of window_pool (contract: docs/kernels.md "window_pool"), x
// channels last [B, Hp, Wp, C], tokens [B, Hg, Wg, C]:
//   out[b, i, j, c] = sum_{dh, dw} x[b, i*Wh + dh, j*Ww + dw, c] / (Wh*Ww) + pos[i, j, c]
// and its backward, grad_x = grad / (Wh*Ww) per pixel and grad_pos = sum over
// b. Launch geometry (a row of threads per item, along C):
// window_pool_launch.h.
//
// The sums are the CPU kernel's (csrc/cpu/window_pool.cpp): the window's
// pixels in row-major order, grad_pos in batch order, in the accumulation
// type, then a division by Wh*Ww and pos added, cast to the data type. Every
// output element is written by one thread: no atomics, no barriers. Each
// kernel is instantiated for VW = kVecWidth<scalar_t> (16-byte accesses) and
// VW = 1; the launch plan picks one.
#include <cmath>
#include <cstdint>

#include "common/cuda_helpers.cuh"
#include "cuda/window_pool_launch.h"

namespace fastctx {

// a / n rounded to nearest, as the CPU kernel's division, for the window's
// pixel count n >= 1 and inv = RN(1 / n) (computed on the host): a * inv, then
// two Markstein corrections with fma (the first makes the quotient faithful,
// the second correctly rounded; the residual a - q n is exact), equal to the
// IEEE division bit for bit over the normal range (the emulation driver checks
// it). ptxas emits the IEEE division's slow path as a call, and on sm_90 its
// frame spilled the 8-wide half/bfloat16 forward.
__device__ __forceinline__ float pool_fma(float a, float b, float c) {
#if defined(FASTCTX_CUDA_EMU)
  return std::fma(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}
__device__ __forceinline__ double pool_fma(double a, double b, double c) {
#if defined(FASTCTX_CUDA_EMU)
  return std::fma(a, b, c);
#else
  return ::fma(a, b, c);
#endif
}

template <typename acc_t>
__device__ __forceinline__ acc_t pool_div(acc_t a, acc_t n, acc_t inv) {
  const acc_t q0 = a * inv;
  const acc_t r0 = pool_fma(-q0, n, a);
  // a +-inf or NaN (r0 NaN), or q0 exact (r0 = 0; this also keeps -0 / n = -0): q0 is the quotient.
  if (!(r0 == r0) || r0 == acc_t(0)) return q0;
  const acc_t q1 = pool_fma(r0, inv, q0);
  return pool_fma(pool_fma(-q1, n, a), inv, q1);
}

// Item and lane of the calling thread (lanes is a power of two). Items
// (tokens, pixels) and channels are int32 (the plan checks B*Hp*Wp < 2^31 and
// C <= 2^30), element offsets int64: see window_pool_launch.h.
struct PoolRow {
  bool valid;  // item < items (the last block's spare rows are not)
  int item;
  int lane;
};

__device__ __forceinline__ PoolRow pool_row(int items, int lanes, int rows) {
  const unsigned tid = threadIdx.x;
  // Unsigned: blockIdx.x * rows < items + rows <= 2^31 - 1 + kThreads.
  const unsigned item = blockIdx.x * static_cast<unsigned>(rows) + tid / static_cast<unsigned>(lanes);
  return {item < static_cast<unsigned>(items), static_cast<int>(item), static_cast<int>(tid) & (lanes - 1)};
}

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_pool_token(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pos,
                                                  scalar_t* __restrict__ out, int token, int lane, int lanes, int Hg,
                                                  int Wg, int Wh, int Ww, int C, acc_t inv_count) {
  using P = Pack<scalar_t, VW>;
  const int j = token % Wg, bi = token / Wg, i = bi % Hg, b = bi / Hg;
  const int Wp = Wg * Ww;
  // The window's first pixel (pixel indices < B*Hp*Wp < 2^31).
  const scalar_t* src = x + static_cast<int64_t>((b * Hg + i) * Wh * Wp + j * Ww) * C;
  const acc_t count = static_cast<acc_t>(Wh * Ww);
  for (int c = lane * VW; c < C; c += lanes * VW) {
    acc_t acc[VW];
#pragma unroll
    for (int t = 0; t < VW; ++t) acc[t] = acc_t(0);
    for (int dh = 0; dh < Wh; ++dh) {
      const scalar_t* row = src + static_cast<int64_t>(dh * Wp) * C + c;
      for (int dw = 0; dw < Ww; ++dw) {
        const P v = *reinterpret_cast<const P*>(row + dw * C);
#pragma unroll
        for (int t = 0; t < VW; ++t) acc[t] += static_cast<acc_t>(v.v[t]);
      }
    }
    P o;
    if (pos != nullptr) {
      const P p = *reinterpret_cast<const P*>(pos + static_cast<int64_t>(i * Wg + j) * C + c);
#pragma unroll
      for (int t = 0; t < VW; ++t) {
        o.v[t] = static_cast<scalar_t>(pool_div(acc[t], count, inv_count) + static_cast<acc_t>(p.v[t]));
      }
    } else {
#pragma unroll
      for (int t = 0; t < VW; ++t) o.v[t] = static_cast<scalar_t>(pool_div(acc[t], count, inv_count));
    }
    *reinterpret_cast<P*>(out + static_cast<int64_t>(token) * C + c) = o;
  }
}

// One row of lanes per token; `pos` may be null. VW: elements per access
// (kVecWidth<scalar_t>, or 1 when C or a pointer does not allow vectors).
template <typename scalar_t, typename acc_t, int VW>
__global__ void __launch_bounds__(kThreads) window_pool_fwd_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ pos, scalar_t* __restrict__ out, int tokens, int Hg,
    int Wg, int Wh, int Ww, int C, acc_t inv_count, int lanes, int rows) {
  const PoolRow r = pool_row(tokens, lanes, rows);
  if (!r.valid) return;
  window_pool_token<VW, scalar_t, acc_t>(x, pos, out, r.item, r.lane, lanes, Hg, Wg, Wh, Ww, C, inv_count);
}

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_pool_grad_pixel(const scalar_t* __restrict__ grad,
                                                       scalar_t* __restrict__ grad_x, int pixel, int lane, int lanes,
                                                       int Hg, int Wg, int Wh, int Ww, int C, acc_t inv_count) {
  using P = Pack<scalar_t, VW>;
  const int Hp = Hg * Wh, Wp = Wg * Ww;
  const int xx = pixel % Wp, by = pixel / Wp, y = by % Hp, b = by / Hp;
  const scalar_t* src = grad + static_cast<int64_t>((b * Hg + y / Wh) * Wg + xx / Ww) * C;
  const acc_t count = static_cast<acc_t>(Wh * Ww);
  for (int c = lane * VW; c < C; c += lanes * VW) {
    const P g = *reinterpret_cast<const P*>(src + c);
    P o;
#pragma unroll
    for (int t = 0; t < VW; ++t) {
      o.v[t] = static_cast<scalar_t>(pool_div(static_cast<acc_t>(g.v[t]), count, inv_count));
    }
    *reinterpret_cast<P*>(grad_x + static_cast<int64_t>(pixel) * C + c) = o;
  }
}

// grad_x: one row of lanes per map pixel, a gather of its token's gradient
// (each output element written once).
template <typename scalar_t, typename acc_t, int VW>
__global__ void __launch_bounds__(kThreads) window_pool_bwd_kernel(
    const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_x, int pixels, int Hg, int Wg, int Wh, int Ww,
    int C, acc_t inv_count, int lanes, int rows) {
  const PoolRow r = pool_row(pixels, lanes, rows);
  if (!r.valid) return;
  window_pool_grad_pixel<VW, scalar_t, acc_t>(grad, grad_x, r.item, r.lane, lanes, Hg, Wg, Wh, Ww, C, inv_count);
}

template <int VW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void window_pool_pos_token(const scalar_t* __restrict__ grad,
                                                      scalar_t* __restrict__ grad_pos, int token, int lane,
                                                      int lanes, int B, int grid_tokens, int C) {
  using P = Pack<scalar_t, VW>;
  for (int c = lane * VW; c < C; c += lanes * VW) {
    acc_t acc[VW];
#pragma unroll
    for (int t = 0; t < VW; ++t) acc[t] = acc_t(0);
    for (int b = 0; b < B; ++b) {  // batch order, as the CPU kernel
      const P g = *reinterpret_cast<const P*>(grad + static_cast<int64_t>(b * grid_tokens + token) * C + c);
#pragma unroll
      for (int t = 0; t < VW; ++t) acc[t] += static_cast<acc_t>(g.v[t]);
    }
    P o;
#pragma unroll
    for (int t = 0; t < VW; ++t) o.v[t] = static_cast<scalar_t>(acc[t]);
    *reinterpret_cast<P*>(grad_pos + static_cast<int64_t>(token) * C + c) = o;
  }
}

// grad_pos: one row of lanes per grid token (i, j), summing over the batch.
template <typename scalar_t, typename acc_t, int VW>
__global__ void __launch_bounds__(kThreads) window_pool_pos_grad_kernel(
    const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_pos, int B, int grid_tokens, int C, int lanes,
    int rows) {
  const PoolRow r = pool_row(grid_tokens, lanes, rows);
  if (!r.valid) return;
  window_pool_pos_token<VW, scalar_t, acc_t>(grad, grad_pos, r.item, r.lane, lanes, B, grid_tokens, C);
}

}  // namespace fastctx
