#pragma once
// Tiling arithmetic of the fused GPU kernels. It holds no CUDA, so the CPU
// build can include (and test) it; the CUDA kernels use the same functions on
// the host (launch configuration) and on the device (block work split).
#include <cstdint>

#include "macros.h"

namespace fastctx {

// Integer ceil(a / b) for a >= 0, b > 0.
FASTCTX_HOST_DEVICE int64_t tile_ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Contiguous, balanced split of `total` items into `parts` ranges: part p owns
// [tile_split_begin(p), tile_split_begin(p + 1)). Every range is non-empty
// when parts <= total, which the partial-sum reductions rely on (each part
// writes its whole partial slice).
FASTCTX_HOST_DEVICE int64_t tile_split_begin(int64_t part, int64_t total, int64_t parts) {
  return part * total / parts;
}

// GLA context tiles: 8 warps share the k (affinity) dimension, each thread
// holding `gla_k_per_thread(S)` consecutive rows, so one k chunk covers
// 8 * that many rows (at most 64; larger groups loop over 64-row chunks).
// The widths are the ones the CUDA kernels are instantiated for.
FASTCTX_HOST_DEVICE int gla_k_per_thread(int64_t group_size) {
  return group_size <= 8 ? 1 : group_size <= 16 ? 2 : group_size <= 32 ? 4 : group_size <= 40 ? 5 : 8;
}

FASTCTX_HOST_DEVICE int64_t gla_k_chunk(int64_t group_size) {
  return 8 * static_cast<int64_t>(gla_k_per_thread(group_size));
}

// Rows a per-tile [k][pixel] buffer must hold for a group: the group size
// rounded up to whole k chunks, because a warp may read (and then discard)
// the padding rows of its last chunk. Monotone in group_size, so sizing the
// buffer for the largest group covers every group of the launch.
FASTCTX_HOST_DEVICE int64_t gla_padded_rows(int64_t group_size) {
  const int64_t chunk = gla_k_chunk(group_size);
  return tile_ceil_div(group_size, chunk) * chunk;
}

}  // namespace fastctx
