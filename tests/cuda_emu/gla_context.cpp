// gla_context's CUDA kernels (csrc/cuda/gla_context_kernel.cuh, launched as
// gla_context_plan says: one launch per register-block width, the backward's
// tile ranges and partial sums) under emu.h, against a float64 reference of
// z = sigmoid(W x + bias) pooled and its four gradients.
//
// Cases reach every width KJ (1, 2, 4, 5, 8: group sizes up to 8, 16, 32, 40,
// and beyond), groups of more than 64 rows (several k chunks), several and
// ragged channel chunks of the logit (32) and mixing (64) GEMMs, ragged pixel
// tiles, the 4-wide and the scalar global access paths, and backward blocks
// sharing an image's tiles (more than one partial slice per image).
#include "emu.h"
#include "driver.h"

#include "cuda/gla_context_kernel.cuh"
#include "cuda/gla_context_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, C, H, W;
  std::vector<int64_t> sizes;  // group sizes
  bool aligned;                // pointers 16-byte aligned (false: the scalar access path)
  int64_t sm_count;            // sizes the backward's tile ranges
};

double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }

template <typename T>
Outcome run(const Shape& s, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t G = static_cast<int64_t>(s.sizes.size()), B = s.B, C = s.C, N = static_cast<int64_t>(s.H) * s.W;
  const GlaPlan fwd = gla_context_plan(false, s.sizes.data(), G, B, C, N, sizeof(acc), s.aligned, s.sm_count);
  const GlaPlan bwd = gla_context_plan(true, s.sizes.data(), G, B, C, N, sizeof(acc), s.aligned, s.sm_count);
  Outcome o;
  o.require(fwd.error.empty() && bwd.error.empty(), "plan_error");
  const int64_t S = fwd.S_tot;
  std::vector<int64_t> offset(G, 0);
  for (int64_t g = 1; g < G; ++g) offset[g] = offset[g - 1] + s.sizes[g - 1];

  // Logits of O(1): weights scaled by 1/sqrt(C) so sigmoid is not saturated.
  const double wscale = 2.0 / std::sqrt(static_cast<double>(C));
  std::vector<T> x = random_vector<T>(B * G * C * N, -1, 1, rng);
  std::vector<T> weight = random_vector<T>(S * C, -wscale, wscale, rng);
  std::vector<T> bias = random_vector<T>(B * S, -0.5, 0.5, rng);
  std::vector<T> pooled = random_vector<T>(B * C * S, -1, 1, rng);
  std::vector<T> dz = random_vector<T>(B * G * C * N, -1, 1, rng);
  std::vector<T> z(x.size(), T(-7.f)), gx(x.size(), T(-7.f)), gw(weight.size(), T(-7.f)),
      gb(bias.size(), T(-7.f)), gp(pooled.size(), T(-7.f));

  GlaFwdParams<T> fp{x.data(), weight.data(), bias.data(), pooled.data(), z.data(), {}, N, static_cast<int>(G),
                     static_cast<int>(C), static_cast<int>(S), 0, fwd.vec};
  for (const GlaLaunch& l : fwd.launches) {
    GlaFwdParams<T> lp = fp;
    lp.groups = l.table;
    lp.rows_alloc = l.rows_alloc;
    gla_dispatch_width(l.kj, [&](auto kj) {
      emu_launch(dim3(l.grid.x, l.grid.y, l.grid.z), kThreads,
                 [&] { gla_fwd_kernel<T, acc, decltype(kj)::value>(lp); }, l.smem_bytes);
    });
  }

  std::vector<acc> part(2 * bwd.part_elems + bwd.part_bias_elems, NAN);
  GlaBwdParams<T, acc> bp{dz.data(), x.data(), weight.data(), bias.data(), pooled.data(), gx.data(),
                          part.data(), part.data() + bwd.part_elems, part.data() + 2 * bwd.part_elems, {}, N,
                          bwd.tiles, static_cast<int>(bwd.nblk), static_cast<int>(G), static_cast<int>(C),
                          static_cast<int>(S), 0, bwd.vec};
  for (const GlaLaunch& l : bwd.launches) {
    GlaBwdParams<T, acc> lp = bp;
    lp.groups = l.table;
    lp.rows_alloc = l.rows_alloc;
    gla_dispatch_width(l.kj, [&](auto kj) {
      emu_launch(dim3(l.grid.x, l.grid.y, l.grid.z), kThreads,
                 [&] { gla_bwd_kernel<T, acc, decltype(kj)::value>(lp); }, l.smem_bytes);
    });
  }
  const auto grid = [](const Grid3& g) { return dim3(g.x, g.y, g.z); };
  emu_launch(grid(bwd.sum_weight_grid), kThreads,
             [&] { sum_partials_kernel<T, acc>(bp.part_w, gw.data(), B * bwd.nblk, S * C, S, C, false); });
  emu_launch(grid(bwd.sum_pooled_grid), kThreads,
             [&] { sum_partials_kernel<T, acc>(bp.part_p, gp.data(), bwd.nblk, S * C, S, C, true); });
  emu_launch(grid(bwd.sum_bias_grid), kThreads,
             [&] { sum_partials_kernel<T, acc>(bp.part_b, gb.data(), bwd.nblk, S, 1, S, false); });

  // float64 reference
  std::vector<double> want_z(x.size(), 0), want_gx(x.size(), 0), want_gw(weight.size(), 0),
      want_gb(bias.size(), 0), want_gp(pooled.size(), 0);
  std::vector<double> a(S), dl(S);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t plane0 = (b * G + g) * C;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = offset[g]; k < offset[g] + s.sizes[g]; ++k) {
          double l = value(bias[b * S + k]);
          for (int64_t c = 0; c < C; ++c) l += value(weight[k * C + c]) * value(x[(plane0 + c) * N + n]);
          a[k] = sigmoid(l);
          double da = 0;
          for (int64_t c = 0; c < C; ++c) da += value(dz[(plane0 + c) * N + n]) * value(pooled[(b * C + c) * S + k]);
          dl[k] = da * a[k] * (1 - a[k]);
          want_gb[b * S + k] += dl[k];
          for (int64_t c = 0; c < C; ++c) {
            want_z[(plane0 + c) * N + n] += a[k] * value(pooled[(b * C + c) * S + k]);
            want_gx[(plane0 + c) * N + n] += dl[k] * value(weight[k * C + c]);
            want_gw[k * C + c] += dl[k] * value(x[(plane0 + c) * N + n]);
            want_gp[(b * C + c) * S + k] += a[k] * value(dz[(plane0 + c) * N + n]);
          }
        }
      }
    }
  }
  const Tol tol = tol_for<T>();
  o.check("z", z, want_z, tol);
  o.check("grad_x", gx, want_gx, tol);
  o.check("grad_weight", gw, want_gw, tol);
  o.check("grad_bias", gb, want_gb, tol);
  o.check("grad_pooled", gp, want_gp, tol);
  std::string widths;
  for (const GlaLaunch& l : fwd.launches) widths += (widths.empty() ? "" : ",") + std::to_string(l.kj);
  o.detail = " KJ=" + widths + " vec=" + std::to_string(fwd.vec) + " fwd_tiles=" + std::to_string(fwd.tiles) +
             " bwd_tiles=" + std::to_string(bwd.tiles) + " nblk=" + std::to_string(bwd.nblk) + o.detail;
  return o;
}

template <typename T>
Case make(Shape s, const char* what) {
  static uint32_t seed = 3;
  const uint32_t sd = seed++;
  std::string sizes;
  for (const int64_t v : s.sizes) sizes += (sizes.empty() ? "" : ",") + std::to_string(v);
  char name[240];
  std::snprintf(name, sizeof name, "%s B=%d C=%d H=%d W=%d sizes=%s aligned=%d sms=%ld (%s)", dtype_name<T>(), s.B,
                s.C, s.H, s.W, sizes.c_str(), s.aligned, static_cast<long>(s.sm_count), what);
  return Case{name, [=] { return run<T>(s, sd); }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  return run_cases(
      "gla_context",
      {
          make<float>({2, 40, 10, 15, {1, 9, 25, 36}, true, 1},
                      "KJ 1, 2, 4, 5 in one call; ragged tiles (N = 150) and channel chunks; scalar path (N % 4 != 0)"),
          make<float>({1, 70, 8, 19, {70, 3}, true, 2},
                      "KJ 8 with 70 rows: two k chunks; two mixing chunks; 4-wide path; 3 backward slices"),
          make<float>({1, 33, 9, 16, {41, 12}, false, 4}, "KJ 8 and 2, scalar path with N % 4 == 0; 3 slices"),
          make<double>({2, 36, 6, 22, {4, 16, 32, 40}, true, 3}, "every width boundary; 4-wide path; 3 slices"),
          make<BF16>({1, 40, 7, 20, {1, 9, 36}, true, 1}, "16-bit data, 4-wide path, ragged tiles"),
      });
}
