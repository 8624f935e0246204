#pragma once
// Launch plans of the pyramid_pool kernels: plain C++, called by the
// extension (pyramid_pool.cu) and by the CPU emulation
// (tests/cuda_emu/pyramid_pool.cpp).
#include <algorithm>
#include <cstdint>
#include <string>

#include "common/tile_math.h"

namespace fastctx {

constexpr int kPoolMaxScales = 16;
// Elements of x staged per forward step (16 KiB in fp32).
constexpr int kPoolTileElems = 4096;
// Rows per thread in the backward (amortises the per-column bin lookup).
constexpr int kPoolBwdRowsPerThread = 4;

// The scales, passed by value as a kernel argument. The kernels copy it to
// shared memory and index the copy, so it never spills to local memory.
struct ScaleTable {
  int count;
  int size[kPoolMaxScales];
  int bin_offset[kPoolMaxScales];  // first of the scale's s*s output bins
  int col_offset[kPoolMaxScales];  // first of the scale's s column bins (forward)
  int total_bins;                  // sum s*s
  int total_cols;                  // sum s
};

struct PyramidPoolPlan {
  ScaleTable table{};
  Grid3 grid;
  int64_t smem_bytes = 0;
  // Forward: each staged tile is whole rows (tile_w == W) or one row segment
  // (tile_rows == 1), so it is one contiguous run of x.
  int tile_w = 0, tile_rows = 0;
  // Backward: block_w column threads (a power of two dividing kThreads) x
  // kThreads / block_w thread rows, each thread kPoolBwdRowsPerThread rows.
  int block_w = 0, tile_h = 0;
  int64_t row_tiles = 0, col_tiles = 0;
  std::string error;  // non-empty: the call is beyond the kernels (the message says why)
};

// Fills plan.table; unused slots repeat the end offsets so the kernels' owner
// scan never stops on them.
inline bool pyramid_pool_table(const int64_t* scales, int64_t count, PyramidPoolPlan& plan) {
  if (count < 1 || count > kPoolMaxScales) {
    plan.error = "expected between 1 and " + std::to_string(kPoolMaxScales) + " scales, got " + std::to_string(count);
    return false;
  }
  ScaleTable& t = plan.table;
  t.count = static_cast<int>(count);
  int64_t bins = 0, cols = 0;
  for (int i = 0; i < kPoolMaxScales; ++i) {
    t.bin_offset[i] = static_cast<int>(bins);
    t.col_offset[i] = static_cast<int>(cols);
    if (i >= count) {
      t.size[i] = 1;
      continue;
    }
    const int64_t s = scales[i];
    if (s < 1 || s > 4096) {
      plan.error = "expected scales in [1, 4096], got " + std::to_string(s);
      return false;
    }
    t.size[i] = static_cast<int>(s);
    bins += s * s;
    cols += s;
  }
  if (bins > (1 << 24)) {
    plan.error = "expected the scales' bins (sum of s*s) to be at most 2^24, got " + std::to_string(bins);
    return false;
  }
  t.total_bins = static_cast<int>(bins);
  t.total_cols = static_cast<int>(cols);
  return true;
}

// Forward over x [B, C, H, W]: one block per (b, c) plane. `tile_elems`
// defaults to the kernel's tile; the emulation passes smaller tiles to reach
// the tiling paths at small sizes.
inline PyramidPoolPlan pyramid_pool_fwd_plan(const int64_t* scales, int64_t count, int64_t B, int64_t C, int64_t H,
                                             int64_t W, int acc_size, int tile_elems = kPoolTileElems) {
  PyramidPoolPlan p;
  if (!pyramid_pool_table(scales, count, p)) return p;
  if (H > INT32_MAX || W > INT32_MAX) {
    p.error = "expected H, W < 2^31";
    return p;
  }
  const int Q = p.table.total_cols;
  // Rows are capped so the row-partial table stays about the size of the tile.
  p.tile_w = static_cast<int>(std::min<int64_t>(W, tile_elems));
  p.tile_rows = 1;
  if (p.tile_w == W) {
    p.tile_rows = static_cast<int>(std::min<int64_t>(H, tile_elems / W));
    p.tile_rows = std::max(1, std::min(p.tile_rows, tile_elems / Q));
  }
  // tile [tile_rows][tile_w] | row partials [tile_rows][Q] | bins [S] (acc_t);
  // column bin edges [2][Q] | scale table [3][kPoolMaxScales] (int).
  p.smem_bytes = acc_size * (static_cast<int64_t>(p.tile_rows) * (p.tile_w + Q) + p.table.total_bins) +
                 static_cast<int64_t>(sizeof(int)) * (2 * Q + 3 * kPoolMaxScales);
  p.grid.x = B * C;
  p.error = grid_limit_error("pyramid_pool_fwd", p.grid, 0, B);
  return p;
}

// Backward to grad_x [B, C, H, W]: one block per (plane, row tile, column tile).
inline PyramidPoolPlan pyramid_pool_bwd_plan(const int64_t* scales, int64_t count, int64_t B, int64_t C, int64_t H,
                                             int64_t W, int acc_size) {
  PyramidPoolPlan p;
  if (!pyramid_pool_table(scales, count, p)) return p;
  if (H > INT32_MAX || W > INT32_MAX) {
    p.error = "expected H, W < 2^31";
    return p;
  }
  // Column threads: a power of two in [32, kThreads] covering W when it can,
  // so it divides the block and every thread owns a distinct (row, column).
  p.block_w = 32;
  while (p.block_w < kThreads && p.block_w < W) p.block_w *= 2;
  p.tile_h = (kThreads / p.block_w) * kPoolBwdRowsPerThread;
  p.row_tiles = tile_ceil_div(H, p.tile_h);
  p.col_tiles = tile_ceil_div(W, p.block_w);
  // grad / area [S] (acc_t); per-scale bin ranges of the tile's rows and
  // columns [2][count][tile_h + block_w] | scale table [3][kPoolMaxScales] (int).
  p.smem_bytes = acc_size * static_cast<int64_t>(p.table.total_bins) +
                 static_cast<int64_t>(sizeof(int)) *
                     (2 * static_cast<int64_t>(p.table.count) * (p.tile_h + p.block_w) + 3 * kPoolMaxScales);
  p.grid.x = B * C * p.row_tiles * p.col_tiles;
  p.error = grid_limit_error("pyramid_pool_bwd", p.grid, 0, B);
  return p;
}

}  // namespace fastctx
