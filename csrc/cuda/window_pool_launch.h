#pragma once
// Launch plan of the window_pool kernels: plain C++, called by the extension
// (window_pool.cu) and by the CPU emulation (tests/cuda_emu/window_pool.cpp).
//
// Every kernel of the op maps one item (a token, or a map pixel for grad_x)
// to a row of `lanes` threads that walks its C channels, 16-byte vectors when
// C and the pointers allow (else one element per thread): consecutive lanes
// read consecutive channels (coalesced, x is channels last). A block of
// kThreads holds kThreads / lanes such rows; grid.x = ceil(items / rows).
#include <cstdint>
#include <string>

#include "common/tile_math.h"

namespace fastctx {

struct WindowPoolPlan {
  int64_t items = 0;  // tokens (forward, grad_pos) or map pixels (grad_x)
  int vec_width = 1;  // elements per access (the kernels' VW): 16 / elem_size, or 1 (scalar path)
  int lanes = 1;      // threads per item: a power of two covering C / vec_width, at most kThreads
  int rows = 1;       // items per block: kThreads / lanes
  Grid3 grid;
  std::string error;  // non-empty: a launch limit is exceeded (the message says how to split)
};

// The kernels index tokens, pixels and channels in int32 (element offsets are
// int64): ptxas outlines 64-bit divisions into calls whose frames live in
// local memory, and 64-bit channel loops left a register spilled across the
// loops' exits.
constexpr int64_t kWindowPoolMaxPixels = (int64_t(1) << 31) - 1;
constexpr int64_t kWindowPoolMaxChannels = int64_t(1) << 30;  // c + kThreads * 16 stays below 2^31

// `pixels`: B*Hp*Wp, the map's pixel count (every index of the call is
// below it); `aligned16`: every data pointer of the launch is 16-byte
// aligned; `batch`: B, for the error's advice.
inline WindowPoolPlan window_pool_plan(const char* kernel, int64_t items, int64_t pixels, int64_t C, int elem_size,
                                       bool aligned16, int64_t batch) {
  WindowPoolPlan p;
  p.items = items;
  if (pixels > kWindowPoolMaxPixels) {
    const int64_t per_image = tile_ceil_div(pixels, batch > 0 ? batch : 1);
    p.error = std::string(kernel) + ": B*Hp*Wp = " + std::to_string(pixels) +
              " map pixels exceeds the kernels' 32-bit indices (at most 2^31 - 1); " +
              (per_image <= kWindowPoolMaxPixels
                   ? "split the batch into calls of at most " + std::to_string(kWindowPoolMaxPixels / per_image) +
                         " images"
                   : std::string("a single image of this size is beyond the CUDA kernels"));
    return p;
  }
  if (C > kWindowPoolMaxChannels) {
    p.error = std::string(kernel) + ": C = " + std::to_string(C) + " channels exceeds the kernels' limit of 2^30";
    return p;
  }
  const int vec = 16 / elem_size;
  p.vec_width = aligned16 && C % vec == 0 ? vec : 1;
  const int64_t units = C / p.vec_width;
  while (p.lanes < units && p.lanes < kThreads) p.lanes *= 2;
  p.rows = kThreads / p.lanes;
  p.grid.x = tile_ceil_div(items, p.rows);
  p.error = grid_limit_error(kernel, p.grid, 0, batch);
  return p;
}

// RN(1 / (Wh*Ww)) in the accumulation type, computed on the host: the kernels
// divide by the window's pixel count with it (pool_div in window_pool_kernel.cuh).
template <typename acc_t>
acc_t window_pool_inv_count(int64_t Wh, int64_t Ww) {
  return acc_t(1) / static_cast<acc_t>(Wh * Ww);
}

}  // namespace fastctx
