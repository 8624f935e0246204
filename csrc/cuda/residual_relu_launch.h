#pragma once
// Launch plan of the residual_relu kernels: plain C++, called by the extension
// (residual_relu.cu) and by the CPU emulation (tests/cuda_emu/residual_relu.cpp).
//
// Each block owns a contiguous chunk of one (b, c) plane: kThreads threads x
// kResidualReluUnroll 16-byte vectors. Chunks start at multiples of 32
// elements, so every mask byte (8 pixels) is written by exactly one lane.
#include <cstdint>
#include <string>

#include "common/tile_math.h"

namespace fastctx {

constexpr int kResidualReluUnroll = 2;  // 16-byte vectors in flight per thread

// Elements of a block's chunk for elem_size-byte data.
constexpr int64_t residual_relu_chunk_elems(int elem_size) {
  return static_cast<int64_t>(kThreads) * (16 / elem_size) * kResidualReluUnroll;
}

struct ResidualReluPlan {
  int64_t N = 0;           // pixels of a (b, c) plane
  int64_t mask_bytes = 0;  // ceil(N / 8): the saved mask's bytes per plane
  int64_t chunks = 0;      // blocks per plane
  Grid3 grid;              // elementwise kernels: one block per (plane, chunk)
  bool vec = false;        // 16-byte accesses: N % (16 / elem_size) == 0 and aligned pointers
  int64_t partials = 0;    // backward: per-block partial sums per channel (B * chunks)
  Grid3 sum_grid;          // backward: channel_sum_kernel, one warp per channel
  std::string error;       // non-empty: a launch limit is exceeded (the message says how to split)
};

// `aligned16`: every data pointer of the call is 16-byte aligned.
inline ResidualReluPlan residual_relu_plan(int64_t B, int64_t C, int64_t N, int elem_size, bool aligned16) {
  ResidualReluPlan p;
  p.N = N;
  p.mask_bytes = tile_ceil_div(N, 8);
  p.chunks = tile_ceil_div(N, residual_relu_chunk_elems(elem_size));
  p.grid.x = B * C * p.chunks;
  p.vec = aligned16 && N % (16 / elem_size) == 0;
  p.partials = B * p.chunks;
  p.sum_grid.x = tile_ceil_div(C, kWarps);
  p.error = grid_limit_error("residual_relu", p.grid, 0, B);
  return p;
}

}  // namespace fastctx
