// csrc/cuda/pyramid_pool.cu's kernels run under emu.h against a float64
// reference of adaptive average pooling (mmseg's overlapping bins) and its
// backward. The launch configuration below restates the host code of the .cu
// file (tile sizes, shared-memory bytes, grid); keep the two in step. Covers
// whole-row and column-segment forward tiles, several row tiles, scales larger
// than the map, W = 1, and two backward column tiles. Built and run by
// tests/test_cuda_emulation.py; prints one line per case.
#include "emu.h"

#include <random>

#include "pyramid_pool.device.inc"  // the device part of the .cu file, extracted by the test

using namespace fastctx;

// As make_table in the .cu file: unused slots repeat the end offsets.
ScaleTable make_table(const std::vector<int>& scales) {
  ScaleTable t{};
  t.count = static_cast<int>(scales.size());
  int bins = 0, cols = 0;
  for (int i = 0; i < kMaxScales; ++i) {
    t.bin_offset[i] = bins;
    t.col_offset[i] = cols;
    if (i < t.count) {
      t.size[i] = scales[i];
      bins += scales[i] * scales[i];
      cols += scales[i];
    } else {
      t.size[i] = 1;
    }
  }
  t.total_bins = bins;
  t.total_cols = cols;
  return t;
}

template <typename T>
bool run(int B, int C, int H, int W, const std::vector<int>& scales, int tile_elems = kTileElems) {
  using acc = T;
  static std::mt19937 rng(7);
  const ScaleTable tab = make_table(scales);
  const int S = tab.total_bins, Q = tab.total_cols;
  std::uniform_real_distribution<double> d(-1, 1);
  std::vector<T> x(static_cast<size_t>(B) * C * H * W), g(static_cast<size_t>(B) * C * S);
  for (auto& v : x) v = static_cast<T>(d(rng));
  for (auto& v : g) v = static_cast<T>(d(rng));
  std::vector<T> out(g.size(), T(-777)), gx(x.size(), T(-777));

  // Forward, as pyramid_pool_fwd_cuda (tile_elems: kTileElems, or smaller to force tiling).
  const int tile_w = static_cast<int>(std::min<int64_t>(W, tile_elems));
  int tile_rows = 1;
  if (tile_w == W) {
    tile_rows = static_cast<int>(std::min<int64_t>(H, tile_elems / W));
    tile_rows = std::max(1, std::min(tile_rows, tile_elems / Q));
  }
  size_t smem = sizeof(acc) * (static_cast<size_t>(tile_rows) * (tile_w + Q) + S) +
                sizeof(int) * (2 * static_cast<size_t>(Q) + 3 * kMaxScales);
  emu_launch(dim3(B * C), dim3(kThreads),
             [&] { pyramid_pool_fwd_kernel<T, acc>(x.data(), out.data(), tab, H, W, tile_w, tile_rows); }, smem);

  // Backward, as pyramid_pool_bwd_cuda.
  int block_w = 32;
  while (block_w < kThreads && block_w < W) block_w *= 2;
  const int tile_h = (kThreads / block_w) * kBwdRowsPerThread;
  const int64_t row_tiles = tile_ceil_div(H, tile_h), col_tiles = tile_ceil_div(W, block_w);
  smem = sizeof(acc) * S + sizeof(int) * (2 * static_cast<size_t>(tab.count) * (tile_h + block_w) + 3 * kMaxScales);
  emu_launch(dim3(B * C * row_tiles * col_tiles), dim3(kThreads), [&] {
    pyramid_pool_bwd_kernel<T, acc>(g.data(), gx.data(), tab, H, W, block_w, row_tiles, col_tiles);
  }, smem);

  double err_fwd = 0, err_bwd = 0, max_fwd = 0, max_bwd = 0;
  std::vector<double> want_gx(x.size(), 0);
  for (int p = 0; p < B * C; ++p) {
    int offset = 0;
    for (int s : scales) {
      for (int r = 0; r < s; ++r) {
        for (int q = 0; q < s; ++q) {
          const int h0 = r * H / s, h1 = ((r + 1) * H + s - 1) / s;
          const int w0 = q * W / s, w1 = ((q + 1) * W + s - 1) / s;
          const double area = static_cast<double>(h1 - h0) * (w1 - w0);
          double sum = 0;
          for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w) sum += x[static_cast<size_t>(p) * H * W + h * W + w];
          const size_t o = static_cast<size_t>(p) * S + offset + r * s + q;
          const double got = out[o];
          err_fwd = std::isnan(got) ? INFINITY : std::max(err_fwd, std::fabs(sum / area - got));
          max_fwd = std::max(max_fwd, std::fabs(sum / area));
          for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w) want_gx[static_cast<size_t>(p) * H * W + h * W + w] += g[o] / area;
        }
      }
      offset += s * s;
    }
  }
  for (size_t i = 0; i < x.size(); ++i) {
    err_bwd = std::isnan(static_cast<double>(gx[i])) ? INFINITY : std::max(err_bwd, std::fabs(want_gx[i] - gx[i]));
    max_bwd = std::max(max_bwd, std::fabs(want_gx[i]));
  }
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
  const double rel_fwd = err_fwd / (max_fwd + 1e-30), rel_bwd = err_bwd / (max_bwd + 1e-30);
  const bool ok = rel_fwd < tol && rel_bwd < tol;
  std::printf("%s %s B=%d C=%d H=%d W=%d tile_w=%d tile_rows=%d bwd_tiles=%ldx%ld scales=", ok ? "ok" : "FAIL",
              sizeof(T) == 4 ? "f32" : "f64", B, C, H, W, tile_w, tile_rows, static_cast<long>(row_tiles),
              static_cast<long>(col_tiles));
  for (int s : scales) std::printf("%d,", s);
  std::printf(" fwd_err=%.2g bwd_err=%.2g\n", rel_fwd, rel_bwd);
  return ok;
}

int main() {
  bool ok = true;
  ok &= run<float>(2, 3, 33, 33, {1, 2, 3, 6});        // overlapping bins, whole-row tiles
  ok &= run<float>(1, 2, 5, 7, {1, 3, 5});
  ok &= run<float>(1, 2, 3, 2, {1, 4, 7});             // scales larger than H and W
  ok &= run<double>(1, 2, 64, 70, {1, 2, 3, 6});       // several forward row tiles, backward row tiles
  ok &= run<float>(1, 1, 9, 300, {1, 2, 3, 6}, 128);   // column-segment tiles (tile_w < W, one row)
  ok &= run<float>(1, 1, 40, 1, {1, 3, 5, 6}, 16);     // W = 1, several row tiles
  ok &= run<float>(1, 2, 20, 300, {2, 5});             // backward block_w 256, two column tiles
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
