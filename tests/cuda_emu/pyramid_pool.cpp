// pyramid_pool's CUDA kernels (csrc/cuda/pyramid_pool_kernel.cuh, launched as
// pyramid_pool_{fwd,bwd}_plan say) under emu.h, against a float64 reference
// of adaptive average pooling (mmseg's overlapping bins) and its backward.
//
// Cases: whole-row and column-segment forward tiles, several row tiles,
// scales larger than the map, W = 1, two backward column tiles.
#include "emu.h"
#include "driver.h"

#include "cuda/pyramid_pool_kernel.cuh"
#include "cuda/pyramid_pool_launch.h"

using namespace fastctx;
using namespace emu_driver;

template <typename T>
Outcome run(int B, int C, int H, int W, const std::vector<int64_t>& scales, int tile_elems, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t count = static_cast<int64_t>(scales.size());
  const PyramidPoolPlan fwd = pyramid_pool_fwd_plan(scales.data(), count, B, C, H, W, sizeof(acc), tile_elems);
  const PyramidPoolPlan bwd = pyramid_pool_bwd_plan(scales.data(), count, B, C, H, W, sizeof(acc));
  Outcome o;
  o.require(fwd.error.empty() && bwd.error.empty(), "plan_error");
  const int S = fwd.table.total_bins;
  std::vector<T> x = random_vector<T>(static_cast<size_t>(B) * C * H * W, -1, 1, rng);
  std::vector<T> g = random_vector<T>(static_cast<size_t>(B) * C * S, -1, 1, rng);
  std::vector<T> out(g.size(), T(-777.f)), gx(x.size(), T(-777.f));

  emu_launch(dim3(fwd.grid.x), kThreads, [&] {
    pyramid_pool_fwd_kernel<T, acc>(x.data(), out.data(), fwd.table, H, W, fwd.tile_w, fwd.tile_rows);
  }, fwd.smem_bytes);
  emu_launch(dim3(bwd.grid.x), kThreads, [&] {
    pyramid_pool_bwd_kernel<T, acc>(g.data(), gx.data(), bwd.table, H, W, bwd.block_w, bwd.row_tiles,
                                    bwd.col_tiles);
  }, bwd.smem_bytes);

  std::vector<double> want_out(out.size()), want_gx(x.size(), 0);
  for (int p = 0; p < B * C; ++p) {
    int64_t offset = 0;
    for (const int64_t s : scales) {
      for (int64_t r = 0; r < s; ++r) {
        for (int64_t q = 0; q < s; ++q) {
          const int64_t h0 = r * H / s, h1 = ((r + 1) * H + s - 1) / s;
          const int64_t w0 = q * W / s, w1 = ((q + 1) * W + s - 1) / s;
          const double area = static_cast<double>(h1 - h0) * (w1 - w0);
          const size_t o_idx = static_cast<size_t>(p) * S + offset + r * s + q;
          double sum = 0;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) sum += value(x[static_cast<size_t>(p) * H * W + h * W + w]);
          want_out[o_idx] = sum / area;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w)
              want_gx[static_cast<size_t>(p) * H * W + h * W + w] += value(g[o_idx]) / area;
        }
      }
      offset += s * s;
    }
  }
  const Tol tol = tol_for<T>();
  o.check("out", out, want_out, tol);
  o.check("grad_x", gx, want_gx, tol);
  o.detail = " tile_w=" + std::to_string(fwd.tile_w) + " tile_rows=" + std::to_string(fwd.tile_rows) +
             " bwd_tiles=" + std::to_string(bwd.row_tiles) + "x" + std::to_string(bwd.col_tiles) + o.detail;
  return o;
}

template <typename T>
Case make(int B, int C, int H, int W, std::vector<int64_t> scales, const char* what,
          int tile_elems = kPoolTileElems) {
  static uint32_t seed = 7;
  const uint32_t s = seed++;
  std::string sc;
  for (const int64_t v : scales) sc += (sc.empty() ? "" : ",") + std::to_string(v);
  char name[200];
  std::snprintf(name, sizeof name, "%s B=%d C=%d H=%d W=%d scales=%s tile_elems=%d (%s)", dtype_name<T>(), B, C, H,
                W, sc.c_str(), tile_elems, what);
  return Case{name, [=] { return run<T>(B, C, H, W, scales, tile_elems, s); }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  return run_cases("pyramid_pool",
                   {
                       make<float>(2, 3, 33, 33, {1, 2, 3, 6}, "overlapping bins, whole-row tiles"),
                       make<float>(1, 2, 5, 7, {1, 3, 5}, "small map"),
                       make<float>(1, 2, 3, 2, {1, 4, 7}, "scales larger than H and W"),
                       make<double>(1, 2, 64, 70, {1, 2, 3, 6}, "several forward row tiles, backward row tiles"),
                       make<float>(1, 1, 9, 300, {1, 2, 3, 6}, "column-segment tiles (tile_w < W, one row)", 128),
                       make<float>(1, 1, 40, 1, {1, 3, 5, 6}, "W = 1, several row tiles", 16),
                       make<float>(1, 2, 20, 300, {2, 5}, "backward block_w 256, two column tiles"),
                       make<BF16>(1, 2, 17, 23, {1, 2, 3, 6}, "16-bit data"),
                   });
}
