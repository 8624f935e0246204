// CUDA backend of residual_relu: out = relu(relu(y*scale[c] + shift[c]) + residual)
// and its backward (contract: docs/kernels.md; scalar maths: common/activation.h).
//
// Both kernels give each block a contiguous chunk of one (b, c) plane, so the
// channel's scale/shift are loaded once per block and no per-element index
// division is needed; accesses are 16-byte vectors when the plane length and
// pointers allow. For the backward the forward saves out > 0 as a bit mask
// (LSB first, ceil(H*W / 8) bytes per plane), packed across lanes with warp
// shuffles / ballots: the backward reads 1 bit per element instead of out.
// Chunks and warp spans start at multiples of 32 elements, so every mask byte
// is written by exactly one lane. The backward's per-channel sums are written as per-block
// partials ([C][B][chunks]) and summed by a second kernel in a fixed order:
// deterministic, no float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <tuple>

#include "common/activation.h"
#include "common/tile_math.h"

namespace fastctx {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;  // vectors in flight per thread

template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

// Elements per 16-byte access.
template <typename scalar_t>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

template <typename scalar_t>
constexpr int64_t chunk_elems() {
  return static_cast<int64_t>(kThreads) * vec_width<scalar_t>() * kUnroll;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) residual_relu_fwd_kernel(
    const scalar_t* __restrict__ y, const scalar_t* __restrict__ res, const acc_t* __restrict__ scale,
    const acc_t* __restrict__ shift, scalar_t* __restrict__ out, uint8_t* __restrict__ mask, int64_t C,
    int64_t N, int64_t chunks, bool vec) {
  constexpr int V = vec_width<scalar_t>();
  const int64_t plane = blockIdx.x / chunks;
  const int64_t start = (blockIdx.x - plane * chunks) * chunk_elems<scalar_t>();
  const int64_t c = plane % C;
  const acc_t sc = scale[c];
  const acc_t sh = shift[c];
  const int64_t base = plane * N;
  const int64_t mask_base = plane * tile_ceil_div(N, int64_t(8));
  const int tid = threadIdx.x;

  if (vec) {
    // N % V == 0 and aligned pointers: a vector is either fully in or fully out.
    using P = Pack<scalar_t, V>;
    P yv[kUnroll], rv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = start + static_cast<int64_t>(u * kThreads + tid) * V;
      if (e < N) {
        yv[u] = *reinterpret_cast<const P*>(y + base + e);
        rv[u] = *reinterpret_cast<const P*>(res + base + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
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
    for (int u = 0; u < kUnroll * V; ++u) {
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

// Sum of two values over the block, in a fixed shuffle/warp order; the
// result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t red[2][kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red[0][warp] = a;
    red[1][warp] = b;
  }
  __syncthreads();
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
  constexpr int V = vec_width<scalar_t>();
  const int64_t plane = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x - plane * chunks;
  const int64_t start = chunk * chunk_elems<scalar_t>();
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
    P gv[kUnroll], yv[kUnroll];
    unsigned bits[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = start + static_cast<int64_t>(u * kThreads + tid) * V;
      if (e < N) {
        gv[u] = *reinterpret_cast<const P*>(grad + base + e);
        yv[u] = *reinterpret_cast<const P*>(y + base + e);
        bits[u] = static_cast<unsigned>(mask[mask_base + e / 8]) >> (e % 8);  // V | 8: one byte
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
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
    for (int u = 0; u < kUnroll * V; ++u) {
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
  if (c >= C) return;
  acc_t a = acc_t(0), b = acc_t(0);
  for (int64_t j = lane; j < J; j += 32) {
    a += part_scale[c * J + j];
    b += part_shift[c * J + j];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  if (lane == 0) {
    grad_scale[c] = a;
    grad_shift[c] = b;
  }
}

// ---------------------------------------------------------------- host side

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_data(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": expected ", name, " of shape ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

void check_acc(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  const auto acc = at::toOpMathType(ref.scalar_type());
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected ", name, " on ", ref.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, " (the accumulation type of ",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(1), op, ": expected ", name, " of shape [C] = [",
              ref.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

void check_input(const at::Tensor& y, const char* op) {
  TORCH_CHECK(y.is_cuda(), op, ": expected CUDA tensors, got y on ", y.device());
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), op, ": expected float32, float16 or bfloat16 data, got ",
              y.scalar_type());
  TORCH_CHECK(y.dim() == 4, op, ": expected y of shape [B, C, H, W], got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), op, ": expected y to be contiguous");
}

struct Grid {
  int64_t N, chunks, blocks;
};

Grid make_grid(const at::Tensor& y, int64_t chunk, const char* op) {
  Grid g;
  g.N = y.size(2) * y.size(3);
  g.chunks = tile_ceil_div(g.N, chunk);
  g.blocks = y.size(0) * y.size(1) * g.chunks;
  TORCH_CHECK(g.blocks <= INT_MAX, op, ": grid of ", g.blocks, " blocks exceeds 2^31-1");
  return g;
}

std::tuple<at::Tensor, at::Tensor> residual_relu_fwd_cuda(const at::Tensor& y, const at::Tensor& residual,
                                                          const at::Tensor& scale, const at::Tensor& shift,
                                                          bool save_mask) {
  constexpr const char* op = "residual_relu_fwd (CUDA)";
  check_input(y, op);
  check_data(residual, y, op, "residual");
  check_acc(scale, y, op, "scale");
  check_acc(shift, y, op, "shift");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  const int64_t mask_bytes = tile_ceil_div(y.size(2) * y.size(3), int64_t(8));
  at::Tensor mask = save_mask ? at::empty({y.size(0), y.size(1), mask_bytes}, y.options().dtype(at::kByte))
                              : at::empty({0}, y.options().dtype(at::kByte));
  if (y.numel() == 0) return {out, mask};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_relu_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Grid g = make_grid(y, chunk_elems<scalar_t>(), op);
    const bool vec = g.N % vec_width<scalar_t>() == 0 && aligned16(y) && aligned16(residual) && aligned16(out);
    residual_relu_fwd_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(g.blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            y.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), scale.data_ptr<acc_t>(),
            shift.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), save_mask ? mask.data_ptr<uint8_t>() : nullptr,
            y.size(1), g.N, g.chunks, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_relu_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& scale,
    const at::Tensor& shift) {
  constexpr const char* op = "residual_relu_bwd (CUDA)";
  check_input(y, op);
  check_data(grad, y, op, "grad");
  const int64_t mask_bytes = tile_ceil_div(y.size(2) * y.size(3), int64_t(8));
  TORCH_CHECK(mask.is_cuda() && mask.device() == y.device() && mask.scalar_type() == at::kByte &&
                  mask.is_contiguous(),
              op, ": expected mask to be the forward's contiguous uint8 tensor on ", y.device(), ", got ",
              mask.scalar_type(), " on ", mask.device());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == y.size(0) && mask.size(1) == y.size(1) &&
                  mask.size(2) == mask_bytes,
              op, ": expected mask of shape [B, C, ceil(H*W/8)] = [", y.size(0), ", ", y.size(1), ", ",
              mask_bytes, "], got ", mask.sizes());
  check_acc(scale, y, op, "scale");
  check_acc(shift, y, op, "shift");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_res = at::empty_like(y);
  at::Tensor grad_scale = at::zeros_like(scale);
  at::Tensor grad_shift = at::zeros_like(shift);
  if (y.numel() == 0) return {grad_y, grad_res, grad_scale, grad_shift};

  const int64_t B = y.size(0), C = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_relu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Grid g = make_grid(y, chunk_elems<scalar_t>(), op);
    const bool vec = g.N % vec_width<scalar_t>() == 0 && aligned16(grad) && aligned16(y) && aligned16(grad_y) &&
                     aligned16(grad_res);
    const int64_t J = B * g.chunks;  // partials per channel
    at::Tensor part = at::empty({2, C, J}, scale.options());
    acc_t* part_scale = part.data_ptr<acc_t>();
    acc_t* part_shift = part_scale + C * J;
    const auto stream = at::cuda::getCurrentCUDAStream();
    residual_relu_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(g.blocks), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), scale.data_ptr<acc_t>(),
        shift.data_ptr<acc_t>(), grad_y.data_ptr<scalar_t>(), grad_res.data_ptr<scalar_t>(), part_scale,
        part_shift, B, C, g.N, g.chunks, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_sum_kernel<acc_t><<<static_cast<unsigned>(tile_ceil_div(C, kWarps)), kThreads, 0, stream>>>(
        part_scale, part_shift, grad_scale.data_ptr<acc_t>(), grad_shift.data_ptr<acc_t>(), C, J);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_y, grad_res, grad_scale, grad_shift};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("residual_relu_fwd", &fastctx::residual_relu_fwd_cuda);
  m.impl("residual_relu_bwd", &fastctx::residual_relu_bwd_cuda);
}
