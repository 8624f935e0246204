#pragma once
// Launch plan of the upsample_add kernels: plain C++, called by the extension
// (upsample_add.cu) and by the CPU emulation (tests/cuda_emu/upsample_add.cpp).
//
// Both kernels map one item (an output pixel in the forward, a token in the
// backward) to a row of `lanes` threads that walks its C channels, 16-byte
// vectors when C and the pointers allow (else one element per thread):
// consecutive lanes read consecutive channels (coalesced, channels last). A
// block of kThreads holds kThreads / lanes rows; grid.x = ceil(items / rows).
#include <algorithm>
#include <cstdint>
#include <string>

#include "common/tile_math.h"

namespace fastctx {

struct UpsampleAddPlan {
  int64_t items = 0;  // output pixels B*H*W (forward) or tokens B*h*w (backward)
  int vec_width = 1;  // elements per access: 16 / elem_size, or 1 (scalar path)
  int lanes = 1;      // threads per item: a power of two covering C / vec_width, at most kThreads
  int rows = 1;       // items per block: kThreads / lanes
  Grid3 grid;
  std::string error;  // non-empty: a launch limit is exceeded (the message says how to split)
};

// The kernels index pixels, tokens and taps in int32 (element offsets are
// int64): ptxas outlines 64-bit divisions into calls whose frames live in
// local memory. B*H*W and B*h*w must stay below 2^31.
constexpr int64_t kUpsampleAddMaxIndex = (int64_t(1) << 31) - 1;

// Empty when B images of `per_image` pixels (or tokens) fit the 32-bit indices, else why and how to split.
inline std::string upsample_add_index_error(const char* kernel, const char* what, int64_t B, int64_t per_image) {
  if (B * per_image <= kUpsampleAddMaxIndex) return std::string();
  std::string msg = std::string(kernel) + ": " + what + " = " + std::to_string(B * per_image) +
                    " exceeds the kernels' 32-bit indices (at most 2^31 - 1); ";
  if (per_image <= kUpsampleAddMaxIndex) {
    return msg + "split the batch into calls of at most " + std::to_string(kUpsampleAddMaxIndex / per_image) +
           " images";
  }
  return msg + "a single image of this size is beyond the CUDA kernels";
}

// Forward (backward = false): one item per output pixel, B*H*W; backward: one
// per token, B*h*w. `aligned16`: every data pointer of the launch is 16-byte aligned.
inline UpsampleAddPlan upsample_add_plan(const char* kernel, bool backward, int64_t B, int64_t h, int64_t w,
                                         int64_t H, int64_t W, int64_t C, int elem_size, bool aligned16) {
  UpsampleAddPlan p;
  p.items = B * (backward ? h * w : H * W);
  p.error = upsample_add_index_error(kernel, "B*H*W output pixels", B, H * W);
  if (p.error.empty()) p.error = upsample_add_index_error(kernel, "B*h*w tokens", B, h * w);
  if (!p.error.empty()) return p;
  const int vec = 16 / elem_size;
  p.vec_width = aligned16 && C % vec == 0 ? vec : 1;
  const int64_t units = C / p.vec_width;
  while (p.lanes < units && p.lanes < kThreads) p.lanes *= 2;
  p.rows = kThreads / p.lanes;
  p.grid.x = tile_ceil_div(p.items, p.rows);
  p.error = grid_limit_error(kernel, p.grid, 0, B);
  return p;
}

// PyTorch's align_corners=True source scale along one axis (in -> out), in
// the accumulation type, as the CPU kernel computes it: (in - 1) / (out - 1),
// 0 when out == 1. Passed to the kernels, which scale each output index by it.
template <typename acc_t>
acc_t upsample_add_scale(int64_t in, int64_t out) {
  return out > 1 ? static_cast<acc_t>(in - 1) / static_cast<acc_t>(out - 1) : acc_t(0);
}

// ---- upsample_add_layer_norm ---------------------------------------------------
// Both kernels give a pixel a row of `lanes` threads (a power of two, at most
// kThreads; a block holds kThreads / lanes rows). A thread's chunk k is VW =
// 16 / elem_size elements from (k * lanes + lane) * VW, one 16-byte vector
// when `vec`, else VW masked scalars: the same elements per thread either way.
// `lanes` is the smallest that covers the row within the register budget of
// upsample_ln_cache_chunks chunks per thread (forward: rows of up to 16
// elements take one thread, C = 96 fp32 takes 8, C = 768 fp32 takes 64; the
// backward twice as many); a row beyond kThreads * budget (forward C > 4096,
// backward C > 2048; fp64 half) takes kThreads lanes and is re-read instead
// of cached (`cached` false).
//
// Forward grid: ceil(pixels / rows) blocks, one pixel per row. Backward: block
// j owns pixels [j * per_block, min(pixels, (j + 1) * per_block)), per_block a
// multiple of rows chosen so that at most kUpsampleLnBwdBlocks blocks exist
// (a constant, not the device's SM count: grad_weight and grad_bias are the
// blocks' partials summed in block order, so their bits depend on the shape
// only). sum_partials_kernel then reduces the [nblk][C] partials per column.

// Chunks a thread keeps in registers (VW = 16 / elem_size elements each): 16
// fp32 accumulation values (8 fp64) in the forward, half that in the
// backward, which holds three such arrays (xhat, grad_normed, and the affine
// sums of grad_weight / grad_bias, two arrays) across its pixels.
constexpr int upsample_ln_cache_chunks(int elem_size, int acc_size, bool backward) {
  return ((backward ? 32 : 64) / acc_size) / (16 / elem_size) > 0
             ? ((backward ? 32 : 64) / acc_size) / (16 / elem_size)
             : 1;
}

// Backward blocks at most: enough to fill an H100 (132 SMs x 4 blocks of 256
// threads) while the partial reduction stays a small second kernel.
constexpr int64_t kUpsampleLnBwdBlocks = 512;
// Channels in int32: (k * lanes + lane) * VW stays below C + kThreads * 16 < 2^31.
constexpr int64_t kUpsampleLnMaxChannels = int64_t(1) << 30;

struct UpsampleLnPlan {
  int64_t pixels = 0;    // B*H*W
  bool vec = false;      // 16-byte accesses: C % VW == 0 and every data pointer 16-byte aligned
  int lanes = 1;         // threads per pixel
  int rows = 1;          // pixels per block step: kThreads / lanes
  int chunks = 1;        // chunks per thread: ceil(ceil(C / VW) / lanes)
  bool cached = true;    // chunks <= upsample_ln_cache_chunks: the row stays in registers
  Grid3 fwd_grid;        // ceil(pixels / rows)
  int64_t per_block = 0; // backward: pixels per block (a multiple of rows)
  Grid3 bwd_grid;        // backward: nblk = ceil(pixels / per_block) <= max_blocks
  Grid3 sum_grid;        // sum_partials_kernel: 32 columns per block
  std::string error;     // non-empty: a launch limit is exceeded (the message says how to split)
};

// `backward`: the backward's register budget; `tokens_per_image`: h*w (0 for
// the backward, which never reads the grid);
// `aligned16`: every data pointer of the launch is 16-byte aligned;
// `max_blocks`: the backward's block cap (the emulation lowers it to reach
// several steps per row on small shapes).
inline UpsampleLnPlan upsample_add_layer_norm_plan(const char* kernel, bool backward, int64_t B,
                                                   int64_t tokens_per_image, int64_t pixels_per_image, int64_t C,
                                                   int elem_size, int acc_size, bool aligned16,
                                                   int64_t max_blocks = kUpsampleLnBwdBlocks) {
  UpsampleLnPlan p;
  p.pixels = B * pixels_per_image;
  p.error = upsample_add_index_error(kernel, "B*H*W output pixels", B, pixels_per_image);
  if (p.error.empty()) p.error = upsample_add_index_error(kernel, "B*h*w tokens", B, tokens_per_image);
  if (p.error.empty() && C > kUpsampleLnMaxChannels) {
    p.error = std::string(kernel) + ": C = " + std::to_string(C) + " channels exceeds the kernels' limit of 2^30";
  }
  if (!p.error.empty()) return p;
  const int vw = 16 / elem_size;
  const int budget = upsample_ln_cache_chunks(elem_size, acc_size, backward);
  p.vec = aligned16 && C % vw == 0;
  const int64_t units = tile_ceil_div(C, vw);
  const int64_t need = tile_ceil_div(units, budget);
  while (p.lanes < need && p.lanes < kThreads) p.lanes *= 2;
  p.rows = kThreads / p.lanes;
  p.chunks = static_cast<int>(std::max<int64_t>(1, tile_ceil_div(units, p.lanes)));
  p.cached = p.chunks <= budget;
  p.fwd_grid.x = tile_ceil_div(p.pixels, p.rows);
  const int64_t steps = tile_ceil_div(tile_ceil_div(p.pixels, p.rows), std::max<int64_t>(max_blocks, 1));
  p.per_block = std::max<int64_t>(1, steps) * p.rows;
  p.bwd_grid.x = tile_ceil_div(p.pixels, p.per_block);
  p.sum_grid.x = tile_ceil_div(C, kWarpSize);
  p.error = grid_limit_error(kernel, p.fwd_grid, 0, B);
  return p;
}

}  // namespace fastctx
