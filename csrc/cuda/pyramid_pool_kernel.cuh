#pragma once
// Device code of pyramid_pool: adaptive average pooling of x [B, C, H, W] to
// every scale from a single read of x (contract: docs/kernels.md). Launch
// geometry and shared-memory sizes: pyramid_pool_launch.h.
//
// Forward: one block per (b, c) plane. The plane streams through shared memory
// in row tiles; for every row the block first sums each *column* bin of every
// scale (sum over scales of s column bins), then folds those row partials into
// the s*s bins of each scale. Sums run in a fixed order: deterministic, no
// atomics, and x is read exactly once whatever the number of scales.
//
// Backward: each thread owns one column and a few rows of a plane tile and
// gathers grad[bin] / area(bin) from the bins containing each of its pixels
// (adaptive_first_bin / adaptive_last_bin, tabulated per block), so every
// grad_x element is written once, coalesced along w.
#include <cstdint>

#include "common/adaptive_pool.h"
#include "common/cuda_helpers.cuh"
#include "cuda/pyramid_pool_launch.h"

namespace fastctx {

// Named barriers (FASTCTX_SYNC).
enum PyramidPoolBarrier : int {
  kSyncPoolFwdTable = 201,
  kSyncPoolColumnEdges,
  kSyncPoolTileConsumed,
  kSyncPoolTileStaged,
  kSyncPoolRowPartials,
  kSyncPoolBwdTable,
  kSyncPoolBinRanges,
};

__device__ __forceinline__ void load_table(const ScaleTable& tab, int* size, int* bin_offset, int* col_offset) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kPoolMaxScales; ++i) {
      size[i] = tab.size[i];
      bin_offset[i] = tab.bin_offset[i];
      col_offset[i] = tab.col_offset[i];
    }
  }
}

// Scale owning flat index `idx` given ascending prefix offsets (few scales:
// a linear scan beats a search).
__device__ __forceinline__ int owner_scale(const int* offsets, int count, int idx) {
  int i = 0;
  while (i + 1 < count && offsets[i + 1] <= idx) ++i;
  return i;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) pyramid_pool_fwd_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const ScaleTable tab, int64_t H,
    int64_t W, int tile_w, int tile_rows) {
  const int S = tab.total_bins;
  const int Q = tab.total_cols;
  const int count = tab.count;
  acc_t* tile = dynamic_smem<acc_t>();               // [tile_rows][tile_w]
  acc_t* rowpart = tile + tile_rows * tile_w;        // [tile_rows][Q]: column-bin sums per row
  acc_t* bins = rowpart + tile_rows * Q;             // [S]: running bin sums
  int* col_lo = reinterpret_cast<int*>(bins + S);    // [Q]
  int* col_hi = col_lo + Q;                          // [Q]
  int* t_size = col_hi + Q;                          // [kPoolMaxScales] x 3
  int* t_bin = t_size + kPoolMaxScales;
  int* t_col = t_bin + kPoolMaxScales;

  const int tid = threadIdx.x;
  const int64_t plane = blockIdx.x;
  const scalar_t* xp = x + plane * H * W;

  load_table(tab, t_size, t_bin, t_col);
  FASTCTX_SYNC(kSyncPoolFwdTable);
  for (int q = tid; q < Q; q += kThreads) {
    const int i = owner_scale(t_col, count, q);
    const int64_t local = q - t_col[i];
    col_lo[q] = static_cast<int>(adaptive_bin_start(local, W, t_size[i]));
    col_hi[q] = static_cast<int>(adaptive_bin_end(local, W, t_size[i]));
  }
  for (int k = tid; k < S; k += kThreads) bins[k] = acc_t(0);
  FASTCTX_SYNC(kSyncPoolColumnEdges);

  for (int64_t h0 = 0; h0 < H; h0 += tile_rows) {
    const int rows = static_cast<int>(min64(tile_rows, H - h0));
    for (int64_t w0 = 0; w0 < W; w0 += tile_w) {
      const int cols = static_cast<int>(min64(tile_w, W - w0));
      // The host guarantees tile_w == W or tile_rows == 1, so the tile is one
      // contiguous run of x: a flat, coalesced copy.
      const scalar_t* src = xp + h0 * W + w0;
      const int n = rows * cols;
      FASTCTX_SYNC(kSyncPoolTileConsumed);  // previous tile fully consumed
#pragma unroll 4
      for (int e = tid; e < n; e += kThreads) tile[e] = static_cast<acc_t>(src[e]);
      FASTCTX_SYNC(kSyncPoolTileStaged);
      // Every (row, column bin) pair is owned by one thread, the same one for
      // every column tile, so the running sum needs no synchronisation.
      for (int p = tid; p < rows * Q; p += kThreads) {
        const int r = p / Q;
        const int q = p - r * Q;
        const int lo = static_cast<int>(max64(col_lo[q] - w0, 0));
        const int hi = static_cast<int>(min64(col_hi[q] - w0, cols));
        const acc_t* row = tile + r * tile_w;
        acc_t s = acc_t(0);
        for (int w = lo; w < hi; ++w) s += row[w];
        rowpart[p] = (w0 == 0 ? acc_t(0) : rowpart[p]) + s;
      }
    }
    FASTCTX_SYNC(kSyncPoolRowPartials);
    // Fold the tile's rows into the bins whose row range meets them.
    for (int k = tid; k < S; k += kThreads) {
      const int i = owner_scale(t_bin, count, k);
      const int s = t_size[i];
      const int local = k - t_bin[i];
      const int br = local / s;
      const int bq = local - br * s;
      const int64_t lo = max64(adaptive_bin_start(br, H, s) - h0, 0);
      const int64_t hi = min64(adaptive_bin_end(br, H, s) - h0, rows);
      const acc_t* col = rowpart + t_col[i] + bq;
      acc_t a = bins[k];
      for (int64_t r = lo; r < hi; ++r) a += col[r * Q];
      bins[k] = a;
    }
  }

  // bins[k] was last written by this same thread: no barrier needed.
  scalar_t* dst = out + plane * S;
  for (int k = tid; k < S; k += kThreads) {
    const int i = owner_scale(t_bin, count, k);
    const int s = t_size[i];
    const int local = k - t_bin[i];
    const int br = local / s;
    const int q = t_col[i] + (local - br * s);
    const int64_t area =
        (adaptive_bin_end(br, H, s) - adaptive_bin_start(br, H, s)) * (col_hi[q] - col_lo[q]);
    dst[k] = static_cast<scalar_t>(bins[k] / static_cast<acc_t>(area));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) pyramid_pool_bwd_kernel(
    const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_x, const ScaleTable tab,
    int64_t H, int64_t W, int block_w, int64_t row_tiles, int64_t col_tiles) {
  const int S = tab.total_bins;
  const int count = tab.count;
  const int block_rows = kThreads / block_w;  // thread rows
  const int tile_h = block_rows * kPoolBwdRowsPerThread;
  acc_t* gbin = dynamic_smem<acc_t>();                // [S]: grad / area
  int* row_lo = reinterpret_cast<int*>(gbin + S);    // [count][tile_h]: bin-row range per pixel row
  int* row_hi = row_lo + count * tile_h;
  int* col_lo = row_hi + count * tile_h;  // [count][block_w]: bin-column range per pixel column
  int* col_hi = col_lo + count * block_w;
  int* t_size = col_hi + count * block_w;
  int* t_bin = t_size + kPoolMaxScales;
  int* t_col = t_bin + kPoolMaxScales;

  const int tid = threadIdx.x;
  int64_t bid = blockIdx.x;
  const int64_t ct = bid % col_tiles;
  bid /= col_tiles;
  const int64_t rt = bid % row_tiles;
  const int64_t plane = bid / row_tiles;
  const int64_t h_base = rt * tile_h;
  const int64_t w_base = ct * block_w;

  load_table(tab, t_size, t_bin, t_col);
  FASTCTX_SYNC(kSyncPoolBwdTable);
  const scalar_t* g = grad + plane * S;
  for (int k = tid; k < S; k += kThreads) {
    const int i = owner_scale(t_bin, count, k);
    const int s = t_size[i];
    const int local = k - t_bin[i];
    const int br = local / s;
    const int bq = local - br * s;
    const int64_t area = (adaptive_bin_end(br, H, s) - adaptive_bin_start(br, H, s)) *
                         (adaptive_bin_end(bq, W, s) - adaptive_bin_start(bq, W, s));
    gbin[k] = static_cast<acc_t>(g[k]) / static_cast<acc_t>(area);
  }
  // Rows/columns past the edge get an empty range.
  for (int e = tid; e < count * tile_h; e += kThreads) {
    const int i = e / tile_h;
    const int64_t h = h_base + (e - i * tile_h);
    const bool in = h < H;
    row_lo[e] = in ? static_cast<int>(adaptive_first_bin(h, H, t_size[i])) : 0;
    row_hi[e] = in ? static_cast<int>(adaptive_last_bin(h, H, t_size[i])) : 0;
  }
  for (int e = tid; e < count * block_w; e += kThreads) {
    const int i = e / block_w;
    const int64_t w = w_base + (e - i * block_w);
    const bool in = w < W;
    col_lo[e] = in ? static_cast<int>(adaptive_first_bin(w, W, t_size[i])) : 0;
    col_hi[e] = in ? static_cast<int>(adaptive_last_bin(w, W, t_size[i])) : 0;
  }
  FASTCTX_SYNC(kSyncPoolBinRanges);

  const int tx = tid % block_w;
  const int ty = tid / block_w;  // < block_rows: block_w divides kThreads
  const int64_t w = w_base + tx;
  if (w >= W) return;  // no barrier follows

  acc_t acc[kPoolBwdRowsPerThread];
#pragma unroll
  for (int j = 0; j < kPoolBwdRowsPerThread; ++j) acc[j] = acc_t(0);
  for (int i = 0; i < count; ++i) {
    const int s = t_size[i];
    const acc_t* gs = gbin + t_bin[i];
    const int qlo = col_lo[i * block_w + tx];
    const int qhi = col_hi[i * block_w + tx];
#pragma unroll
    for (int j = 0; j < kPoolBwdRowsPerThread; ++j) {
      // Thread rows interleave so each row of the tile is one coalesced store.
      const int r = ty + j * block_rows;
      const int rlo = row_lo[i * tile_h + r];
      const int rhi = row_hi[i * tile_h + r];
      for (int br = rlo; br < rhi; ++br)
        for (int bq = qlo; bq < qhi; ++bq) acc[j] += gs[br * s + bq];
    }
  }
  scalar_t* dst = grad_x + plane * H * W + w;
#pragma unroll
  for (int j = 0; j < kPoolBwdRowsPerThread; ++j) {
    const int64_t h = h_base + ty + j * block_rows;
    if (h < H) dst[h * W] = static_cast<scalar_t>(acc[j]);
  }
}

}  // namespace fastctx
