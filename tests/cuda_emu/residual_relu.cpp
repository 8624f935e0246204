// residual_relu's CUDA kernels (csrc/cuda/residual_relu_kernel.cuh, launched
// as residual_relu_plan says) under emu.h, against a float64 reference:
// outputs with and without the mask, the saved out > 0 bit mask (every byte,
// spare bits included), gradients and the per-channel sums.
//
// Cases: the vector path with 1, 2 and 4 lanes per mask byte (16-, 32- and
// 64-bit data), the scalar path (warp ballot), partial last bytes and warps,
// several chunks per plane, more channels than warps.
#include "emu.h"
#include "driver.h"

#include "cuda/residual_relu_kernel.cuh"
#include "cuda/residual_relu_launch.h"

using namespace fastctx;
using namespace emu_driver;

template <typename T>
Outcome run(int B, int C, int H, int W, bool aligned, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t N = static_cast<int64_t>(H) * W, n = B * C * N;
  const ResidualReluPlan plan = residual_relu_plan(B, C, N, sizeof(T), aligned);
  std::vector<T> y = random_vector<T>(n, -1, 1, rng), r = random_vector<T>(n, -1, 1, rng);
  std::vector<T> g = random_vector<T>(n, -1, 1, rng);
  std::vector<T> out(n, T(-7.f)), out_nomask(n, T(-7.f)), gy(n, T(-7.f)), gr(n, T(-7.f));
  std::vector<uint8_t> mask(B * C * plan.mask_bytes, 0xAB);  // any byte not written shows
  std::vector<acc> sc(C), sh(C), gs(C, -7), gh(C, -7);
  std::uniform_real_distribution<double> d(-1, 1);
  for (int c = 0; c < C; ++c) {
    sc[c] = static_cast<acc>(d(rng) * 2);
    sh[c] = static_cast<acc>(d(rng) * 0.5);
  }

  Outcome o;
  o.require(plan.error.empty(), "plan_error");
  emu_launch(dim3(plan.grid.x), kThreads, [&] {
    residual_relu_fwd_kernel<T, acc>(y.data(), r.data(), sc.data(), sh.data(), out.data(), mask.data(), C, N,
                                     plan.chunks, plan.vec);
  });
  emu_launch(dim3(plan.grid.x), kThreads, [&] {
    residual_relu_fwd_kernel<T, acc>(y.data(), r.data(), sc.data(), sh.data(), out_nomask.data(), nullptr, C, N,
                                     plan.chunks, plan.vec);
  });
  std::vector<acc> part(2 * C * plan.partials, NAN);
  emu_launch(dim3(plan.grid.x), kThreads, [&] {
    residual_relu_bwd_kernel<T, acc>(g.data(), y.data(), mask.data(), sc.data(), sh.data(), gy.data(), gr.data(),
                                     part.data(), part.data() + C * plan.partials, B, C, N, plan.chunks, plan.vec);
  });
  emu_launch(dim3(plan.sum_grid.x), kThreads, [&] {
    channel_sum_kernel<acc>(part.data(), part.data() + C * plan.partials, gs.data(), gh.data(), C, plan.partials);
  });

  std::vector<double> want_out(n), want_gy(n), want_gr(n), want_scale(C, 0), want_shift(C, 0);
  std::vector<uint8_t> want_mask(mask.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t plane = i / N, k = i % N;
    const int c = static_cast<int>(plane % C);
    const double u = value(y[i]) * sc[c] + sh[c];
    const double v = std::max(0.0, std::max(0.0, u) + value(r[i]));
    const double gg = v > 0 ? value(g[i]) : 0, gu = u > 0 ? gg : 0;
    want_out[i] = v;
    want_gr[i] = gg;
    want_gy[i] = gu * sc[c];
    want_scale[c] += gu * value(y[i]);
    want_shift[c] += gu;
    // The mask is the kernel's own out > 0 (a rounding of v may be 0).
    if (value(out[i]) > 0) want_mask[plane * plan.mask_bytes + k / 8] |= static_cast<uint8_t>(1u << (k % 8));
  }
  const Tol tol = tol_for<T>();
  o.check("out", out, want_out, tol);
  o.check("out_nomask", out_nomask, want_out, tol);
  o.check("grad_y", gy, want_gy, tol);
  o.check("grad_res", gr, want_gr, tol);
  o.check("grad_scale", gs, want_scale, tol);
  o.check("grad_shift", gh, want_shift, tol);
  int64_t bad_bytes = 0;
  for (size_t i = 0; i < mask.size(); ++i) bad_bytes += mask[i] != want_mask[i];
  o.require(bad_bytes == 0, "bad_mask_bytes");
  o.detail = " vec=" + std::to_string(plan.vec) + " chunks=" + std::to_string(plan.chunks) + o.detail;
  return o;
}

template <typename T>
Case make(int B, int C, int H, int W, bool aligned, const char* what) {
  static uint32_t seed = 11;
  const uint32_t s = seed++;
  char name[160];
  std::snprintf(name, sizeof name, "%s B=%d C=%d H=%d W=%d aligned=%d (%s)", dtype_name<T>(), B, C, H, W, aligned,
                what);
  return Case{name, [=] { return run<T>(B, C, H, W, aligned, s); }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  return run_cases("residual_relu",
                   {
                       make<float>(2, 3, 32, 100, true, "vector, 2 lanes per byte, 2 chunks with a tail"),
                       make<float>(2, 3, 33, 33, true, "N odd: scalar path, ballot, partial last byte"),
                       make<float>(1, 2, 32, 100, false, "scalar path, whole bytes, 2 chunks"),
                       make<float>(1, 2, 5, 7, false, "N = 35: one partial warp, partial byte"),
                       make<double>(2, 9, 7, 10, true, "vector, 4 lanes per byte, N % 8 = 6, C > 8 warps"),
                       make<double>(1, 3, 16, 16, true, "vector, whole bytes"),
                       make<double>(1, 2, 9, 9, false, "scalar path"),
                       make<BF16>(1, 2, 64, 80, true, "vector, 1 lane per byte, 2 chunks"),
                       make<BF16>(1, 3, 9, 9, true, "N = 81: scalar path"),
                   });
}
