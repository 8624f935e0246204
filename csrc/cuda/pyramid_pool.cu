// CUDA backend of pyramid_pool: adaptive average pooling of x [B, C, H, W] to
// every scale from a single read of x (contract: docs/kernels.md).
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/adaptive_pool.h"
#include "common/tile_math.h"

namespace fastctx {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxScales = 16;
// Elements of x staged per forward step (16 KiB in fp32).
constexpr int kTileElems = 4096;
// Rows per thread in the backward (amortises the per-column bin lookup).
constexpr int kBwdRowsPerThread = 4;
constexpr size_t kDefaultSmem = 48 * 1024;

// Scales in kernel-argument space. Only ever indexed with compile-time
// indices (it is copied to shared memory first) so it never spills to local.
struct ScaleTable {
  int count;
  int size[kMaxScales];
  int bin_offset[kMaxScales];  // first of the scale's s*s output bins
  int col_offset[kMaxScales];  // first of the scale's s column bins (forward)
  int total_bins;              // sum s*s
  int total_cols;              // sum s
};

__device__ __forceinline__ void load_table(const ScaleTable& tab, int* size, int* bin_offset, int* col_offset) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kMaxScales; ++i) {
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
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int S = tab.total_bins;
  const int Q = tab.total_cols;
  const int count = tab.count;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);  // [tile_rows][tile_w]
  acc_t* rowpart = tile + tile_rows * tile_w;        // [tile_rows][Q]: column-bin sums per row
  acc_t* bins = rowpart + tile_rows * Q;             // [S]: running bin sums
  int* col_lo = reinterpret_cast<int*>(bins + S);    // [Q]
  int* col_hi = col_lo + Q;                          // [Q]
  int* t_size = col_hi + Q;                          // [kMaxScales] x 3
  int* t_bin = t_size + kMaxScales;
  int* t_col = t_bin + kMaxScales;

  const int tid = threadIdx.x;
  const int64_t plane = blockIdx.x;
  const scalar_t* xp = x + plane * H * W;

  load_table(tab, t_size, t_bin, t_col);
  __syncthreads();
  for (int q = tid; q < Q; q += kThreads) {
    const int i = owner_scale(t_col, count, q);
    const int64_t local = q - t_col[i];
    col_lo[q] = static_cast<int>(adaptive_bin_start(local, W, t_size[i]));
    col_hi[q] = static_cast<int>(adaptive_bin_end(local, W, t_size[i]));
  }
  for (int k = tid; k < S; k += kThreads) bins[k] = acc_t(0);
  __syncthreads();

  for (int64_t h0 = 0; h0 < H; h0 += tile_rows) {
    const int rows = static_cast<int>(min64(tile_rows, H - h0));
    for (int64_t w0 = 0; w0 < W; w0 += tile_w) {
      const int cols = static_cast<int>(min64(tile_w, W - w0));
      // The host guarantees tile_w == W or tile_rows == 1, so the tile is one
      // contiguous run of x: a flat, coalesced copy.
      const scalar_t* src = xp + h0 * W + w0;
      const int n = rows * cols;
      __syncthreads();  // previous tile fully consumed
#pragma unroll 4
      for (int e = tid; e < n; e += kThreads) tile[e] = static_cast<acc_t>(src[e]);
      __syncthreads();
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
    __syncthreads();
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
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int S = tab.total_bins;
  const int count = tab.count;
  const int block_rows = kThreads / block_w;  // thread rows
  const int tile_h = block_rows * kBwdRowsPerThread;
  acc_t* gbin = reinterpret_cast<acc_t*>(smem_raw);  // [S]: grad / area
  int* row_lo = reinterpret_cast<int*>(gbin + S);    // [count][tile_h]: bin-row range per pixel row
  int* row_hi = row_lo + count * tile_h;
  int* col_lo = row_hi + count * tile_h;  // [count][block_w]: bin-column range per pixel column
  int* col_hi = col_lo + count * block_w;
  int* t_size = col_hi + count * block_w;
  int* t_bin = t_size + kMaxScales;
  int* t_col = t_bin + kMaxScales;

  const int tid = threadIdx.x;
  int64_t bid = blockIdx.x;
  const int64_t ct = bid % col_tiles;
  bid /= col_tiles;
  const int64_t rt = bid % row_tiles;
  const int64_t plane = bid / row_tiles;
  const int64_t h_base = rt * tile_h;
  const int64_t w_base = ct * block_w;

  load_table(tab, t_size, t_bin, t_col);
  __syncthreads();
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
  __syncthreads();

  const int tx = tid % block_w;
  const int ty = tid / block_w;  // < block_rows: block_w divides kThreads
  const int64_t w = w_base + tx;
  if (w >= W) return;  // no barrier follows

  acc_t acc[kBwdRowsPerThread];
#pragma unroll
  for (int j = 0; j < kBwdRowsPerThread; ++j) acc[j] = acc_t(0);
  for (int i = 0; i < count; ++i) {
    const int s = t_size[i];
    const acc_t* gs = gbin + t_bin[i];
    const int qlo = col_lo[i * block_w + tx];
    const int qhi = col_hi[i * block_w + tx];
#pragma unroll
    for (int j = 0; j < kBwdRowsPerThread; ++j) {
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
  for (int j = 0; j < kBwdRowsPerThread; ++j) {
    const int64_t h = h_base + ty + j * block_rows;
    if (h < H) dst[h * W] = static_cast<scalar_t>(acc[j]);
  }
}

// ---------------------------------------------------------------- host side

ScaleTable make_table(at::IntArrayRef scales, const char* op) {
  TORCH_CHECK(!scales.empty(), op, ": expected at least one scale");
  TORCH_CHECK(static_cast<int>(scales.size()) <= kMaxScales, op, ": expected at most ", kMaxScales,
              " scales, got ", scales.size());
  ScaleTable tab{};
  tab.count = static_cast<int>(scales.size());
  int64_t bins = 0, cols = 0;
  for (int i = 0; i < kMaxScales; ++i) {
    // Unused slots repeat the end offsets so the owner scan never stops on them.
    tab.bin_offset[i] = static_cast<int>(bins);
    tab.col_offset[i] = static_cast<int>(cols);
    if (i < tab.count) {
      const int64_t s = scales[i];
      TORCH_CHECK(s >= 1 && s <= 4096, op, ": expected scales in [1, 4096], got ", s);
      tab.size[i] = static_cast<int>(s);
      bins += s * s;
      cols += s;
    } else {
      tab.size[i] = 1;
    }
  }
  TORCH_CHECK(bins <= (1 << 24), op, ": sum of s*s over scales must be at most 2^24, got ", bins);
  tab.total_bins = static_cast<int>(bins);
  tab.total_cols = static_cast<int>(cols);
  return tab;
}

template <typename Kernel>
void set_dynamic_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= kDefaultSmem) return;
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, op, ": needs ", bytes, " bytes of shared memory for these scales and "
              "sizes, the device allows ", limit, " per block (use fewer or smaller scales)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " to be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

at::Tensor pyramid_pool_fwd_cuda(const at::Tensor& x, at::IntArrayRef scales) {
  constexpr const char* op = "pyramid_pool_fwd (CUDA)";
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape [B, C, H, W], got ", x.sizes());
  const ScaleTable tab = make_table(scales, op);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, C, tab.total_bins}, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(H >= 1 && W >= 1, op, ": expected H >= 1 and W >= 1, got ", x.sizes());
  TORCH_CHECK(B * C <= INT_MAX, op, ": expected B*C <= 2^31-1, got ", B * C);
  TORCH_CHECK(H <= INT_MAX && W <= INT_MAX, op, ": expected H, W < 2^31");

  // Either whole rows (tile_w == W) or one row segment (tile_rows == 1), so
  // each tile is a contiguous run of x; rows are capped so the row-partial
  // table stays about the size of the tile.
  const int Q = tab.total_cols;
  const int tile_w = static_cast<int>(std::min<int64_t>(W, kTileElems));
  int tile_rows = 1;
  if (tile_w == W) {
    tile_rows = static_cast<int>(std::min<int64_t>(H, kTileElems / W));
    tile_rows = std::max(1, std::min(tile_rows, kTileElems / Q));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyramid_pool_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc_t) * (static_cast<size_t>(tile_rows) * (tile_w + Q) + tab.total_bins) +
                        sizeof(int) * (2 * static_cast<size_t>(Q) + 3 * kMaxScales);
    auto kernel = pyramid_pool_fwd_kernel<scalar_t, acc_t>;
    set_dynamic_smem(kernel, smem, op);
    kernel<<<static_cast<unsigned>(B * C), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), tab, H, W, tile_w, tile_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor pyramid_pool_bwd_cuda(const at::Tensor& grad, at::IntArrayRef scales, int64_t height,
                                 int64_t width) {
  constexpr const char* op = "pyramid_pool_bwd (CUDA)";
  check_floating(grad, op, "grad");
  const ScaleTable tab = make_table(scales, op);
  TORCH_CHECK(grad.dim() == 3 && grad.size(2) == tab.total_bins, op,
              ": expected grad of shape [B, C, sum(s*s)] = [B, C, ", tab.total_bins, "], got ",
              grad.sizes());
  TORCH_CHECK(height >= 1 && width >= 1, op, ": expected height >= 1 and width >= 1, got ", height,
              ", ", width);
  TORCH_CHECK(height <= INT_MAX && width <= INT_MAX, op, ": expected height, width < 2^31");
  const int64_t B = grad.size(0), C = grad.size(1), H = height, W = width;
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_x = at::empty({B, C, H, W}, grad.options());
  if (grad_x.numel() == 0) return grad_x;

  // Column threads: a power of two in [32, kThreads] covering W when it can,
  // so it divides the block and every thread owns a distinct (row, column).
  int block_w = 32;
  while (block_w < kThreads && block_w < W) block_w *= 2;
  const int tile_h = (kThreads / block_w) * kBwdRowsPerThread;
  const int64_t row_tiles = tile_ceil_div(H, tile_h);
  const int64_t col_tiles = tile_ceil_div(W, block_w);
  const int64_t blocks = B * C * row_tiles * col_tiles;
  TORCH_CHECK(blocks <= INT_MAX, op, ": grid of ", blocks, " blocks exceeds 2^31-1");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pyramid_pool_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc_t) * tab.total_bins +
                        sizeof(int) * (2 * static_cast<size_t>(tab.count) * (tile_h + block_w) + 3 * kMaxScales);
    auto kernel = pyramid_pool_bwd_kernel<scalar_t, acc_t>;
    set_dynamic_smem(kernel, smem, op);
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), tab, H, W, block_w, row_tiles, col_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("pyramid_pool_fwd", &fastctx::pyramid_pool_fwd_cuda);
  m.impl("pyramid_pool_bwd", &fastctx::pyramid_pool_bwd_cuda);
}
