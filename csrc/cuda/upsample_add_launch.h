#pragma once
// Launch plan of the upsample_add kernels: plain C++, called by the extension
// (upsample_add.cu) and by the CPU emulation (tests/cuda_emu/upsample_add.cpp).
//
// Both kernels map one item (an output pixel in the forward, a token in the
// backward) to a row of `lanes` threads that walks its C channels, 16-byte
// vectors when C and the pointers allow (else one element per thread):
// consecutive lanes read consecutive channels (coalesced, channels last). A
// block of kThreads holds kThreads / lanes rows; grid.x = ceil(items / rows).
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

}  // namespace fastctx
