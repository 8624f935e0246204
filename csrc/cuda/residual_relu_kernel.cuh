#pragma once
// Device code of residual_relu (contract: docs/kernels.md; scalar maths:
// common/activation.h): out = relu(relu(y*scale[c] + shift[c]) + residual)
// and its backward. Launch geometry: residual_relu_launch.h.
//
// Both elementwise kernels give each block a contiguous chunk of one (b, c)
// plane, so the channel's scale/shift are loaded once per block and no
// per-element index division is needed; accesses are 16-byte vectors when
// the plane length and pointers allow. The forward saves out > 0 as a bit
// mask (LSB first, ceil(H*W / 8) bytes per plane), packed across lanes with
// warp shuffles / ballots: the backward reads 1 bit per element instead of
// out. The backward's per-channel sums are per-block partials ([C][B][chunks])
// summed by channel_sum_kernel in a fixed order: deterministic, no atomics.
#include <cstdint>

#include "common/activation.h"
#include "common/cuda_helpers.cuh"
#include "cuda/residual_relu_launch.h"

namespace fastctx {

// Named barriers (FASTCTX_SYNC).
enum ResidualReluBarrier : int { kSyncReluWarpPartials = 101 };

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) residual_relu_fwd_kernel(
    const scalar_t* __restrict__ y, const scalar_t* __restrict__ res, const acc_t* __restrict__ scale,
    const acc_t* __restrict__ shift, scalar_t* __restrict__ out, uint8_t* __restrict__ mask, int64_t C,
    int64_t N, int64_t chunks, bool vec) {
  constexpr int V = kVecWidth<scalar_t>;
  constexpr int64_t kChunk = residual_relu_chunk_elems(sizeof(scalar_t));
  const int64_t plane = blockIdx.x / chunks;
  const int64_t start = (blockIdx.x - plane * chunks) * kChunk;
  const int64_t c = plane % C;
  const acc_t sc = scale[c];
  const acc_t sh = shift[c];
  const int64_t base = plane * N;
  const int64_t mask_base = plane * tile_ceil_div(N, int64_t(8));
  const int tid = threadIdx.x;

  if (vec) {
    // N % V == 0 and aligned pointers: a vector is either fully in or fully out.
    using P = Pack<scalar_t, V>;
    P yv[kResidualReluUnroll], rv[kResidualReluUnroll];
#pragma unroll
    for (int u = 0; u < kResidualReluUnroll; ++u) {
      const int64_t e = start + static_cast<int64_t>(u * kThreads + tid) * V;
      if (e < N) {
        yv[u] = *reinterpret_cast<const P*>(y + base + e);
        rv[u] = *reinterpret_cast<const P*>(res + base + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kResidualReluUnroll; ++u) {
      const int64_t e = start + static_cast<int64_t>(u * kThreads + tid) * V;
      unsigned bits = 0;  // this lane's V mask bits
      if (e < N) {
        P o;
#pragma unroll
        for (int t = 0; t < V; ++t) {
          const acc_t v = residual_relu(static_cast<acc_t>(yv[u].v[t]), static_cast<acc_t>(rv[u].v[t]), sc, sh);
          o.v[t] = static_cast<scalar_t>(v);
          bits |= static_cast<unsigned>(v > acc_t(0)) << t;
        }
        *reinterpret_cast<P*>(out + base + e) = o;
      }
      if (mask != nullptr) {  // uniform over the grid: every lane reaches the shuffles
        // A byte covers 8 / V lanes (aligned groups): OR their bits into the first one.
        constexpr int kLanesPerByte = 8 / V;
        bits <<= (tid % kLanesPerByte) * V;
#pragma unroll
        for (int off = 1; off < kLanesPerByte; off <<= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, off);
        if (e < N && tid % kLanesPerByte == 0) mask[mask_base + e / 8] = static_cast<uint8_t>(bits);
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kResidualReluUnroll * V; ++u) {
      const int64_t e = start + u * kThreads + tid;
      bool active = false;
      if (e < N) {
        const acc_t v = residual_relu(static_cast<acc_t>(y[base + e]), static_cast<acc_t>(res[base + e]), sc, sh);
        out[base + e] = static_cast<scalar_t>(v);
        active = v > acc_t(0);
      }
      if (mask != nullptr) {
        // The warp's 32 pixels start at a multiple of 32: its ballot is 4 whole bytes.
        const unsigned word = __ballot_sync(0xffffffffu, active);
        const int lane = tid & 31;
        const int64_t e_warp = e - lane;
        if (lane < 4 && e_warp + 8 * lane < N) {
          mask[mask_base + e_warp / 8 + lane] = static_cast<uint8_t>(word >> (8 * lane));
        }
      }
    }
  }
}

// Sum of two values over the block in a fixed order; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t red[2][kWarps];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red[0][warp] = a;
    red[1][warp] = b;
  }
  FASTCTX_SYNC(kSyncReluWarpPartials);
  if (threadIdx.x == 0) {
    a = red[0][0];
    b = red[1][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      a += red[0][w];
      b += red[1][w];
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) residual_relu_bwd_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ y, const uint8_t* __restrict__ mask,
    const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, scalar_t* __restrict__ grad_y,
    scalar_t* __restrict__ grad_res, acc_t* __restrict__ part_scale, acc_t* __restrict__ part_shift,
    int64_t B, int64_t C, int64_t N, int64_t chunks, bool vec) {
  constexpr int V = kVecWidth<scalar_t>;
  constexpr int64_t kChunk = residual_relu_chunk_elems(sizeof(scalar_t));
  const int64_t plane = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x - plane * chunks;
  const int64_t start = chunk * kChunk;
  const int64_t c = plane % C;
  const acc_t sc = scale[c];
  const acc_t sh = shift[c];
  const int64_t base = plane * N;
  const int64_t mask_base = plane * tile_ceil_div(N, int64_t(8));
  const int tid = threadIdx.x;
  acc_t sum_gy = acc_t(0);  // sum gu * y  -> grad_scale
  acc_t sum_g = acc_t(0);   // sum gu      -> grad_shift

  if (vec) {
    using P = Pack<scalar_t, V>;
    P gv[kResidualReluUnroll], yv[kResidualReluUnroll];
    unsigned bits[kResidualReluUnroll];
#pragma unroll
    for (int u = 0; u < kResidualReluUnroll; ++u) {
      const int64_t e = start + static_cast<int64_t>(u * kThreads + tid) * V;
      if (e < N) {
        gv[u] = *reinterpret_cast<const P*>(grad + base + e);
        yv[u] = *reinterpret_cast<const P*>(y + base + e);
        bits[u] = static_cast<unsigned>(mask[mask_base + e / 8]) >> (e % 8);  // V | 8: one byte
      }
    }
#pragma unroll
    for (int u = 0; u < kResidualReluUnroll; ++u) {
      const int64_t e = start + static_cast<int64_t>(u * kThreads + tid) * V;
      if (e < N) {
        P dy, dr;
#pragma unroll
        for (int t = 0; t < V; ++t) {
          const acc_t yy = static_cast<acc_t>(yv[u].v[t]);
          acc_t gu, gr;
          residual_relu_grad(static_cast<acc_t>(gv[u].v[t]), yy, ((bits[u] >> t) & 1u) != 0u, sc, sh, &gu,
                             &gr);
          dy.v[t] = static_cast<scalar_t>(gu * sc);
          dr.v[t] = static_cast<scalar_t>(gr);
          sum_gy += gu * yy;
          sum_g += gu;
        }
        *reinterpret_cast<P*>(grad_y + base + e) = dy;
        *reinterpret_cast<P*>(grad_res + base + e) = dr;
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kResidualReluUnroll * V; ++u) {
      const int64_t e = start + u * kThreads + tid;
      if (e < N) {
        const acc_t yy = static_cast<acc_t>(y[base + e]);
        acc_t gu, gr;
        const bool active = ((mask[mask_base + e / 8] >> (e % 8)) & 1) != 0;
        residual_relu_grad(static_cast<acc_t>(grad[base + e]), yy, active, sc, sh, &gu, &gr);
        grad_y[base + e] = static_cast<scalar_t>(gu * sc);
        grad_res[base + e] = static_cast<scalar_t>(gr);
        sum_gy += gu * yy;
        sum_g += gu;
      }
    }
  }

  block_sum2(sum_gy, sum_g);
  if (tid == 0) {
    // [C][B][chunks]: one channel's partials are contiguous for the reduction.
    const int64_t idx = (c * B + plane / C) * chunks + chunk;
    part_scale[idx] = sum_gy;
    part_shift[idx] = sum_g;
  }
}

// One warp per channel sums its J partials: lanes stride in a fixed pattern,
// then a fixed butterfly; the result does not depend on scheduling.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) channel_sum_kernel(
    const acc_t* __restrict__ part_scale, const acc_t* __restrict__ part_shift, acc_t* __restrict__ grad_scale,
    acc_t* __restrict__ grad_shift, int64_t C, int64_t J) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (c >= C) return;  // whole warps: c is warp-uniform
  acc_t a = acc_t(0), b = acc_t(0);
  for (int64_t j = lane; j < J; j += 32) {
    a += part_scale[c * J + j];
    b += part_shift[c * J + j];
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    grad_scale[c] = a;
    grad_shift[c] = b;
  }
}

}  // namespace fastctx
