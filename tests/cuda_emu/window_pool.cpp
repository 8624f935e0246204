// window_pool's CUDA kernels (csrc/cuda/window_pool_kernel.cuh, launched as
// window_pool_plan says) under emu.h, against a float64 reference: the
// forward with and without pos, grad_x and grad_pos.
//
// Cases: the vector path (C a multiple of the 16-byte width) and the scalar
// one (C = 13, or a misaligned pointer), several rows per block and rows
// wider than a block (lanes = 256, C looped), 4x8 and 7x7 windows, 1x1
// windows and one-row / one-column token grids, B = 1 (grad_pos is a copy),
// and NaN / inf in x and grad (each must spread to exactly its window / token).
#include "emu.h"
#include "driver.h"

#include "cuda/window_pool_kernel.cuh"
#include "cuda/window_pool_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, Hg, Wg, Wh, Ww, C;
};

template <typename T>
Outcome run(Shape s, bool aligned, bool nonfinite, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t Hp = int64_t(s.Hg) * s.Wh, Wp = int64_t(s.Wg) * s.Ww, C = s.C;
  const int64_t tokens = int64_t(s.B) * s.Hg * s.Wg, grid_tokens = int64_t(s.Hg) * s.Wg;
  const int64_t pixels = int64_t(s.B) * Hp * Wp;
  // A misaligned run offsets every buffer by one element: the plan must pick the scalar path.
  const int off = aligned ? 0 : 1;
  std::vector<T> xbuf = random_vector<T>(pixels * C + off, -1, 1, rng);
  std::vector<T> posbuf = random_vector<T>(grid_tokens * C + off, -1, 1, rng);
  std::vector<T> gbuf = random_vector<T>(tokens * C + off, -1, 1, rng);
  if (nonfinite) {  // one inf and one NaN in x (distinct windows), the same in grad (distinct tokens)
    xbuf[off + 3] = T(INFINITY);
    xbuf[off + pixels * C - 2] = T(NAN);
    gbuf[off + 1] = T(-INFINITY);
    gbuf[off + tokens * C - 1] = T(NAN);
  }
  const T* x = xbuf.data() + off;
  const T* pos = posbuf.data() + off;
  const T* g = gbuf.data() + off;
  std::vector<T> obuf(tokens * C + off, T(-7.f)), onbuf(tokens * C + off, T(-7.f));
  std::vector<T> gxbuf(pixels * C + off, T(-7.f)), gpbuf(grid_tokens * C + off, T(-7.f));
  const bool ptr_aligned = is_aligned16(x) && is_aligned16(pos) && is_aligned16(g) &&
                           is_aligned16(obuf.data() + off) && is_aligned16(gxbuf.data() + off) &&
                           is_aligned16(gpbuf.data() + off);

  Outcome o;
  const WindowPoolPlan fwd = window_pool_plan("window_pool_fwd", tokens, pixels, C, sizeof(T), ptr_aligned, s.B);
  const WindowPoolPlan bwd = window_pool_plan("window_pool_bwd", pixels, pixels, C, sizeof(T), ptr_aligned, s.B);
  const WindowPoolPlan pp =
      window_pool_plan("window_pool_pos_grad", grid_tokens, pixels, C, sizeof(T), ptr_aligned, s.B);
  const acc inv = window_pool_inv_count<acc>(s.Wh, s.Ww);
  o.require(fwd.error.empty() && bwd.error.empty() && pp.error.empty(), "plan_error");
  // The kernels' VW as the .cu picks it: 16-byte vectors when the plan allows.
  constexpr int V = kVecWidth<T>;
  const auto fwd_kernel = fwd.vec_width > 1 ? &window_pool_fwd_kernel<T, acc, V> : &window_pool_fwd_kernel<T, acc, 1>;
  const auto bwd_kernel = bwd.vec_width > 1 ? &window_pool_bwd_kernel<T, acc, V> : &window_pool_bwd_kernel<T, acc, 1>;
  const auto pos_kernel =
      pp.vec_width > 1 ? &window_pool_pos_grad_kernel<T, acc, V> : &window_pool_pos_grad_kernel<T, acc, 1>;
  emu_launch(dim3(fwd.grid.x), kThreads, [&] {
    fwd_kernel(x, pos, obuf.data() + off, int(tokens), s.Hg, s.Wg, s.Wh, s.Ww, s.C, inv, fwd.lanes, fwd.rows);
  });
  emu_launch(dim3(fwd.grid.x), kThreads, [&] {
    fwd_kernel(x, nullptr, onbuf.data() + off, int(tokens), s.Hg, s.Wg, s.Wh, s.Ww, s.C, inv, fwd.lanes, fwd.rows);
  });
  emu_launch(dim3(bwd.grid.x), kThreads, [&] {
    bwd_kernel(g, gxbuf.data() + off, int(pixels), s.Hg, s.Wg, s.Wh, s.Ww, s.C, inv, bwd.lanes, bwd.rows);
  });
  emu_launch(dim3(pp.grid.x), kThreads,
             [&] { pos_kernel(g, gpbuf.data() + off, s.B, int(grid_tokens), s.C, pp.lanes, pp.rows); });

  // float64 reference, straight from the definition.
  const double count = double(s.Wh) * s.Ww;
  std::vector<double> want(tokens * C), want_nopos(tokens * C), want_gx(pixels * C), want_gp(grid_tokens * C, 0);
  for (int b = 0; b < s.B; ++b)
    for (int i = 0; i < s.Hg; ++i)
      for (int j = 0; j < s.Wg; ++j)
        for (int64_t c = 0; c < C; ++c) {
          double sum = 0;
          for (int dh = 0; dh < s.Wh; ++dh)
            for (int dw = 0; dw < s.Ww; ++dw) sum += value(x[((b * Hp + i * s.Wh + dh) * Wp + j * s.Ww + dw) * C + c]);
          const int64_t t = (int64_t(b) * s.Hg + i) * s.Wg + j;
          want_nopos[t * C + c] = sum / count;
          want[t * C + c] = sum / count + value(pos[(int64_t(i) * s.Wg + j) * C + c]);
          want_gp[(int64_t(i) * s.Wg + j) * C + c] += value(g[t * C + c]);
        }
  for (int64_t p = 0; p < pixels; ++p) {
    const int64_t xx = p % Wp, y = (p / Wp) % Hp, b = p / (Wp * Hp);
    const T* token = g + ((b * s.Hg + y / s.Wh) * s.Wg + xx / s.Ww) * C;
    for (int64_t c = 0; c < C; ++c) want_gx[p * C + c] = value(token[c]) / count;
  }

  const auto view = [&](const std::vector<T>& buf) { return std::vector<T>(buf.begin() + off, buf.end()); };
  const Tol tol = tol_for<T>();
  o.check_pattern("out", view(obuf), want, tol);
  o.check_pattern("out_nopos", view(onbuf), want_nopos, tol);
  o.check_pattern("grad_x", view(gxbuf), want_gx, tol);
  o.check_pattern("grad_pos", view(gpbuf), want_gp, tol);
  char buf[128];
  std::snprintf(buf, sizeof buf, " vec=%d lanes=%d rows=%d", fwd.vec_width > 1, fwd.lanes, fwd.rows);
  o.detail = buf + o.detail;
  return o;
}

// pool_div, the kernels' division by the window's pixel count, against the
// IEEE division (the CPU kernel's) bit for bit: counts 1..64, values spread
// over the normal range, both signs, zero and the non-finite ones.
template <typename acc>
Case pool_div_case() {
  char name[64];
  std::snprintf(name, sizeof name, "%s pool_div = a / n", dtype_name<acc>());
  return Case{name, [] {
                std::mt19937 rng(3);
                std::uniform_real_distribution<double> mant(1, 2);
                std::uniform_int_distribution<int> expo(-120, 120);
                std::vector<acc> values = {acc(0), acc(-0.0), acc(INFINITY), acc(-INFINITY), acc(NAN)};
                for (int k = 0; k < 4000; ++k)
                  values.push_back(static_cast<acc>((k % 2 ? -1 : 1) * std::ldexp(mant(rng), expo(rng))));
                int64_t bad = 0;
                for (int n = 1; n <= 64; ++n) {
                  const acc count = static_cast<acc>(n), inv = window_pool_inv_count<acc>(n, 1);
                  for (const acc a : values) {
                    const acc got = pool_div(a, count, inv), want = a / count;
                    bad += std::isnan(want) ? !std::isnan(got) : std::memcmp(&got, &want, sizeof(acc)) != 0;
                  }
                }
                Outcome o;
                o.require(bad == 0, "pool_div_differs");
                o.detail += " pool_div_mismatches=" + std::to_string(bad);
                return o;
              }};
}

template <typename T>
Case make(Shape s, bool aligned, bool nonfinite, const char* what) {
  static uint32_t seed = 5;
  const uint32_t sd = seed++;
  char name[200];
  std::snprintf(name, sizeof name, "%s B=%d grid=%dx%d window=%dx%d C=%d aligned=%d (%s)", dtype_name<T>(), s.B,
                s.Hg, s.Wg, s.Wh, s.Ww, s.C, aligned, what);
  return Case{name, [=] { return run<T>(s, aligned, nonfinite, sd); }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  return run_cases("window_pool",
                   {
                       make<float>({2, 3, 2, 4, 8, 16}, true, false, "4x8 windows, vector path, 64 rows per block"),
                       make<float>({2, 2, 3, 7, 7, 13}, true, false, "7x7 windows, C = 13: scalar path"),
                       make<float>({1, 1, 4, 2, 3, 20}, false, false, "misaligned: scalar path, one token row, B = 1"),
                       make<float>({2, 3, 1, 3, 2, 600}, true, false, "one token column, C > 256 vectors: C looped"),
                       make<double>({2, 2, 2, 1, 1, 11}, true, false, "1x1 windows, odd C"),
                       make<double>({3, 2, 2, 2, 2, 6}, true, false, "f64 vectors of 2"),
                       make<BF16>({2, 2, 2, 4, 4, 24}, true, false, "bf16 vectors of 8"),
                       make<BF16>({1, 2, 1, 3, 5, 13}, true, false, "bf16 scalar path"),
                       make<float>({2, 2, 2, 2, 3, 8}, true, true, "inf and NaN in x and grad"),
                       pool_div_case<float>(),
                       pool_div_case<double>(),
                   });
}
