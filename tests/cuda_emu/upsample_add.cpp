// upsample_add's CUDA kernels (csrc/cuda/upsample_add_kernel.cuh, launched as
// upsample_add_plan says) under emu.h, against a float64 reference: the
// forward (residual + the four taps) and grad_tokens, the reference's written
// as eager PyTorch's backward is, a scatter of (l_y l_x) grad to the four taps
// of every output pixel, so its NaN / inf pattern is eager's.
//
// Cases: upsampling and downsampling (some tokens touched by no output row),
// h = 1, w = 1, H = 1 (the scale-0 axes), a 1x1 token grid, the vector path
// and the scalar one (C = 13, or a misaligned pointer), rows wider than a
// block (C looped), and NaN / inf in tokens and grad, at taps of weight 0 and
// at the last row / column (both taps the same token).
#include "emu.h"
#include "driver.h"

#include "cuda/upsample_add_kernel.cuh"
#include "cuda/upsample_add_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, h, w, H, W, C;
};

// PyTorch's taps (align_corners=True) along one axis, the weights in the accumulation type.
template <typename acc>
struct RefTaps {
  std::vector<int> i0, i1;
  std::vector<double> l0, l1;
  RefTaps(int in, int out) {
    const acc scale = out > 1 ? static_cast<acc>(in - 1) / static_cast<acc>(out - 1) : acc(0);
    for (int d = 0; d < out; ++d) {
      const acc src = scale * static_cast<acc>(d);
      const int a = std::min(static_cast<int>(std::floor(src)), in - 1);
      const acc l = std::min(std::max(src - static_cast<acc>(a), acc(0)), acc(1));
      i0.push_back(a);
      i1.push_back(a + (a < in - 1 ? 1 : 0));
      l1.push_back(l);
      l0.push_back(acc(1) - l);
    }
  }
};

template <typename T>
Outcome run(Shape s, bool aligned, bool nonfinite, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t C = s.C, tokens = int64_t(s.B) * s.h * s.w, pixels = int64_t(s.B) * s.H * s.W;
  const int off = aligned ? 0 : 1;  // a misaligned run offsets every buffer by one element
  std::vector<T> tbuf = random_vector<T>(tokens * C + off, -1, 1, rng);
  std::vector<T> rbuf = random_vector<T>(pixels * C + off, -1, 1, rng);
  std::vector<T> gbuf = random_vector<T>(pixels * C + off, -1, 1, rng);
  if (nonfinite) {
    // tokens: inf in the first token, NaN in the last (channels 1 and 2).
    tbuf[off + 1] = T(INFINITY);
    tbuf[off + (tokens - 1) * C + 2] = T(NAN);
    // grad: -inf at the last output row (both row taps the last token row, l1 = 0), +inf in row 2 and
    // column 2 (with (h-1) | (H-1) a tap of weight 0), NaN in the first pixel's channel 3.
    gbuf[off + ((int64_t(s.H) - 1) * s.W + 1) * C] = T(-INFINITY);
    gbuf[off + (2 * int64_t(s.W) + 2) * C + 1] = T(INFINITY);
    gbuf[off + 3] = T(NAN);
  }
  const T* tok = tbuf.data() + off;
  const T* res = rbuf.data() + off;
  const T* g = gbuf.data() + off;
  std::vector<T> obuf(pixels * C + off, T(-7.f)), gtbuf(tokens * C + off, T(-7.f));
  const bool ptr_aligned = is_aligned16(tok) && is_aligned16(res) && is_aligned16(g) &&
                           is_aligned16(obuf.data() + off) && is_aligned16(gtbuf.data() + off);

  Outcome o;
  const UpsampleAddPlan fwd = upsample_add_plan("upsample_add_fwd", false, s.B, s.h, s.w, s.H, s.W, C, sizeof(T),
                                                ptr_aligned);
  const UpsampleAddPlan bwd = upsample_add_plan("upsample_add_bwd", true, s.B, s.h, s.w, s.H, s.W, C, sizeof(T),
                                                ptr_aligned);
  o.require(fwd.error.empty() && bwd.error.empty(), "plan_error");
  const acc sy = upsample_add_scale<acc>(s.h, s.H), sx = upsample_add_scale<acc>(s.w, s.W);
  emu_launch(dim3(fwd.grid.x), kThreads, [&] {
    upsample_add_fwd_kernel<T, acc>(tok, res, obuf.data() + off, int(fwd.items), s.h, s.w, s.H, s.W, C, sy, sx,
                                    fwd.lanes, fwd.rows, fwd.vec_width);
  });
  emu_launch(dim3(bwd.grid.x), kThreads, [&] {
    upsample_add_bwd_kernel<T, acc>(g, gtbuf.data() + off, int(bwd.items), s.h, s.w, s.H, s.W, C, sy, sx,
                                    bwd.lanes, bwd.rows, bwd.vec_width);
  });

  const RefTaps<acc> ty(s.h, s.H), tx(s.w, s.W);
  std::vector<double> want(pixels * C), want_gt(tokens * C, 0);
  for (int b = 0; b < s.B; ++b)
    for (int y = 0; y < s.H; ++y)
      for (int x = 0; x < s.W; ++x) {
        const int64_t p = (int64_t(b) * s.H + y) * s.W + x;
        const int64_t t00 = (int64_t(b) * s.h + ty.i0[y]) * s.w + tx.i0[x], t01 = t00 - tx.i0[x] + tx.i1[x];
        const int64_t t10 = (int64_t(b) * s.h + ty.i1[y]) * s.w + tx.i0[x], t11 = t10 - tx.i0[x] + tx.i1[x];
        const double a0 = ty.l0[y], a1 = ty.l1[y], b0 = tx.l0[x], b1 = tx.l1[x];
        for (int64_t c = 0; c < C; ++c) {
          const double s0 = a0 * value(tok[t00 * C + c]) + a1 * value(tok[t10 * C + c]);
          const double s1 = a0 * value(tok[t01 * C + c]) + a1 * value(tok[t11 * C + c]);
          want[p * C + c] = value(res[p * C + c]) + (b0 * s0 + b1 * s1);
          const double gv = value(g[p * C + c]);
          // Eager's backward: the four taps one by one, each (l_y l_x) * grad.
          want_gt[t00 * C + c] += (a0 * b0) * gv;
          want_gt[t01 * C + c] += (a0 * b1) * gv;
          want_gt[t10 * C + c] += (a1 * b0) * gv;
          want_gt[t11 * C + c] += (a1 * b1) * gv;
        }
      }

  const auto view = [&](const std::vector<T>& buf) { return std::vector<T>(buf.begin() + off, buf.end()); };
  const Tol tol = tol_for<T>();
  o.check_pattern("out", view(obuf), want, tol);
  o.check_pattern("grad_tokens", view(gtbuf), want_gt, tol);
  char buf[128];
  std::snprintf(buf, sizeof buf, " vec=%d lanes=%d rows=%d", fwd.vec_width > 1, fwd.lanes, fwd.rows);
  o.detail = buf + o.detail;
  return o;
}

template <typename T>
Case make(Shape s, bool aligned, bool nonfinite, const char* what) {
  static uint32_t seed = 7;
  const uint32_t sd = seed++;
  char name[200];
  std::snprintf(name, sizeof name, "%s B=%d %dx%d->%dx%d C=%d aligned=%d (%s)", dtype_name<T>(), s.B, s.h, s.w, s.H,
                s.W, s.C, aligned, what);
  return Case{name, [=] { return run<T>(s, aligned, nonfinite, sd); }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  return run_cases("upsample_add",
                   {
                       make<float>({2, 3, 4, 7, 9, 16}, true, false, "upsampling, vector path"),
                       make<float>({2, 7, 9, 3, 4, 13}, true, false, "downsampling, C = 13: scalar path"),
                       make<float>({1, 1, 5, 4, 6, 8}, true, false, "h = 1"),
                       make<float>({2, 3, 2, 1, 5, 20}, false, false, "H = 1, misaligned: scalar path"),
                       make<float>({1, 2, 3, 3, 4, 600}, true, false, "C > 256 vectors: C looped"),
                       make<double>({2, 2, 2, 5, 5, 6}, true, false, "f64 vectors of 2"),
                       make<double>({1, 1, 1, 3, 1, 11}, true, false, "1x1 token grid, W = 1"),
                       make<BF16>({1, 4, 4, 8, 16, 24}, true, false, "bf16 vectors of 8"),
                       make<BF16>({2, 3, 2, 5, 7, 13}, true, false, "bf16 scalar path"),
                       make<float>({1, 4, 3, 7, 5, 8}, true, true, "inf and NaN, taps of weight 0"),
                   });
}
