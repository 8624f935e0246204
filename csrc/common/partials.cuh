#pragma once
// sum_partials_kernel: the fixed-order reduction that turns per-block partial
// sums (written by each block to its own slice, no atomics) into one result.
// Shared by the CUDA backwards that reduce parameter gradients over pixels
// (gla_context's grad_weight / grad_pooled / grad_bias, upsample_add_layer_norm's
// grad_weight / grad_bias). Device code only.
#include <cstdint>

#include "common/cuda_helpers.cuh"
#include "common/tile_math.h"

namespace fastctx {

// Named barrier (FASTCTX_SYNC).
enum PartialsBarrier : int {
  kSyncPartialRows = 951,  // the thread rows' sums of a column block are in shared memory
};

// out[o][i] = sum_j part[o][j][i] for j < J in a fixed order: 8 thread rows
// take fixed j ranges of 32 adjacent columns (coalesced), then one row adds
// the 8 results in order. With `transpose`, column i = r * cols + c of the
// [rows][cols] inner block is written at c * rows + r.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* __restrict__ part,
                                                                scalar_t* __restrict__ out, int64_t J,
                                                                int64_t inner, int64_t rows, int64_t cols,
                                                                bool transpose) {
  __shared__ acc_t red[kWarps][33];
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + lx;
  const int64_t o = blockIdx.y;
  acc_t s = acc_t(0);
  if (i < inner) {
    const acc_t* src = part + o * J * inner + i;
    const int64_t j1 = tile_split_begin(ly + 1, J, kWarps);
    for (int64_t j = tile_split_begin(ly, J, kWarps); j < j1; ++j) s += src[j * inner];
  }
  red[ly][lx] = s;
  FASTCTX_SYNC(kSyncPartialRows);
  if (ly == 0 && i < inner) {
#pragma unroll
    for (int y = 1; y < kWarps; ++y) s += red[y][lx];
    const int64_t dst = transpose ? (i % cols) * rows + i / cols : i;
    out[o * inner + dst] = static_cast<scalar_t>(s);
  }
}

}  // namespace fastctx
