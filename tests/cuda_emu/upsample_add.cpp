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
//
// upsample_add_layer_norm (cases "ln ..."): the fused forward and backward
// against float64 (statistics of the stored out row, two passes, the mean
// shifted by the row's first value as the contract's; the backward's
// reference from the kernel's saved mean and rstd, a row whose sums of g or
// g xhat are not finite by eager's CPU algebra instead), out bit for bit
// equal to upsample_add_fwd's kernel, grad_weight / grad_bias through
// sum_partials_kernel; each case runs again on the other path (vector <->
// scalar, by misaligning or aligning the buffers) and every output must match
// bit for bit. Rows of 1 to 256 lanes, cached and re-read (C > 4096), pixels
// not a multiple of the rows per block, several backward steps per row (a
// lowered block cap), with and without weight / bias / affine_grads, fp32,
// fp64, bf16, NaN and inf. Rows far from zero (out ~ 300 + N(0, 1): a plain
// fp32 row sum is off by ~1e-4 in the mean, beyond the fp32 tolerance of
// normed), cached and re-read. Non-finite backward rows: +inf in one weight
// entry (every row; at channel 0 too, where masked elements of a chunk must
// add nothing), +inf or NaN in one grad_normed entry, on rows about zero so
// that the fallback's infinities take both signs: grad_sum, grad_weight and
// grad_bias must have the reference's NaN and +-inf at the same places.
#include <cstring>

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

// Output pixel (b, y, x): its index and its four taps (token indices, weights), as both references use them.
struct RefPixel {
  int64_t p, t00, t01, t10, t11;
  double a0, a1, b0, b1;
  template <typename Taps>
  RefPixel(const Shape& s, const Taps& ty, const Taps& tx, int b, int y, int x)
      : p((int64_t(b) * s.H + y) * s.W + x),
        t00((int64_t(b) * s.h + ty.i0[y]) * s.w + tx.i0[x]),
        t01(t00 - tx.i0[x] + tx.i1[x]),
        t10((int64_t(b) * s.h + ty.i1[y]) * s.w + tx.i0[x]),
        t11(t10 - tx.i0[x] + tx.i1[x]),
        a0(ty.l0[y]),
        a1(ty.l1[y]),
        b0(tx.l0[x]),
        b1(tx.l1[x]) {}
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
        const RefPixel px(s, ty, tx, b, y, x);
        const int64_t p = px.p, t00 = px.t00, t01 = px.t01, t10 = px.t10, t11 = px.t11;
        const double a0 = px.a0, a1 = px.a1, b0 = px.b0, b1 = px.b1;
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

// ---- upsample_add_layer_norm ------------------------------------------------------

// Non-finite backward inputs (a bit set): +inf in one weight entry, +inf / NaN in one grad_normed entry.
enum LnInject : int { kInjectNone = 0, kWeightInf = 1, kGradInf = 2, kGradNan = 4 };

struct LnCase {
  bool aligned = true, weight = true, bias = true, affine = true, nonfinite = false;
  int64_t max_blocks = kUpsampleLnBwdBlocks;  // the backward's block cap (lowered: several steps per row)
  double center = 8.0;  // added to the residual: every row's mean
  bool far = false;     // residual center + N(0, 1), tokens 0.1 N(0, 1): out ~ center + N(0, 1)
  int inject = kInjectNone;
  int inject_channel = -1;  // the injected column (-1: C / 3)
};

// Raw bits of a buffer, for the bit-for-bit comparisons.
template <typename T>
std::vector<unsigned char> bits_of(const T* p, size_t n) {
  std::vector<unsigned char> b(n * sizeof(T));
  std::memcpy(b.data(), p, b.size());
  return b;
}

// One forward + backward of the fused kernels on buffers offset by `off` elements (1: misaligned).
template <typename T>
struct LnRun {
  using acc = typename Acc<T>::type;
  UpsampleLnPlan fwd, bwd;
  std::vector<T> out, normed, grad_sum, grad_weight, grad_bias;  // without the offset
  std::vector<acc> mean, rstd;
};

template <typename T>
struct LnInputs {
  std::vector<T> tok, res, weight, bias, gout, gnorm;  // unshifted data
};

template <typename T>
std::vector<T> shifted(const std::vector<T>& v, int off) {
  std::vector<T> b(v.size() + off, T(-7.f));
  std::copy(v.begin(), v.end(), b.begin() + off);
  return b;
}

template <typename T>
LnRun<T> run_ln_kernels(Shape s, const LnInputs<T>& in, const LnCase& lc, int off, float eps) {
  using acc = typename Acc<T>::type;
  const int64_t C = s.C, pixels = int64_t(s.B) * s.H * s.W;
  std::vector<T> tok = shifted(in.tok, off), res = shifted(in.res, off), wt = shifted(in.weight, off),
                 bs = shifted(in.bias, off), gout = shifted(in.gout, off), gnorm = shifted(in.gnorm, off);
  std::vector<T> out(pixels * C + off, T(-7.f)), normed(pixels * C + off, T(-7.f)), gsum(pixels * C + off, T(-7.f));
  LnRun<T> r;
  r.mean.assign(pixels, acc(-7));
  r.rstd.assign(pixels, acc(-7));
  const T* w = lc.weight ? wt.data() + off : nullptr;
  const T* b = lc.bias ? bs.data() + off : nullptr;
  const bool fwd_aligned = is_aligned16(tok.data() + off) && is_aligned16(res.data() + off) &&
                           is_aligned16(out.data() + off) && is_aligned16(normed.data() + off) && is_aligned16(w) &&
                           is_aligned16(b);
  r.fwd = upsample_add_layer_norm_plan("upsample_add_layer_norm_fwd", false, s.B, int64_t(s.h) * s.w,
                                       int64_t(s.H) * s.W, C, sizeof(T), sizeof(acc), fwd_aligned);
  const acc sy = upsample_add_scale<acc>(s.h, s.H), sx = upsample_add_scale<acc>(s.w, s.W);
  if (r.fwd.error.empty()) {
    auto* kernel = r.fwd.cached ? &upsample_add_layer_norm_fwd_kernel<T, acc, true>
                                : &upsample_add_layer_norm_fwd_kernel<T, acc, false>;
    emu_launch(dim3(r.fwd.fwd_grid.x), kThreads, [&] {
      kernel(tok.data() + off, res.data() + off, w, b, out.data() + off,
                                                 normed.data() + off, r.mean.data(), r.rstd.data(), int(pixels), s.h,
                                                 s.w, s.H, s.W, int(C), sy, sx, acc(1) / acc(C), acc(eps),
                                                 r.fwd.lanes, r.fwd.rows, r.fwd.chunks, r.fwd.vec);
    });
  }
  // The backward reads the forward's out, mean and rstd.
  const bool bwd_aligned = is_aligned16(gout.data() + off) && is_aligned16(gnorm.data() + off) &&
                           is_aligned16(out.data() + off) && is_aligned16(gsum.data() + off) && is_aligned16(w);
  r.bwd = upsample_add_layer_norm_plan("upsample_add_layer_norm_bwd", true, s.B, 0, int64_t(s.H) * s.W, C, sizeof(T),
                                       sizeof(acc), bwd_aligned, lc.max_blocks);
  const int64_t nblk = r.bwd.bwd_grid.x;
  std::vector<acc> part(lc.affine ? 2 * nblk * C : 0, acc(NAN));  // NaN: a partial left unwritten shows
  r.grad_weight.assign(lc.affine ? C : 0, T(-7.f));
  r.grad_bias.assign(lc.affine ? C : 0, T(-7.f));
  if (r.bwd.error.empty()) {
    acc* pw = lc.affine ? part.data() : nullptr;
    acc* pb = lc.affine ? part.data() + nblk * C : nullptr;
    auto* kernel = r.bwd.cached ? &upsample_add_layer_norm_bwd_kernel<T, acc, true>
                                : &upsample_add_layer_norm_bwd_kernel<T, acc, false>;
    emu_launch(dim3(nblk), kThreads, [&] {
      kernel(gout.data() + off, gnorm.data() + off, out.data() + off,
                                                 r.mean.data(), r.rstd.data(), w, gsum.data() + off, pw, pb,
                                                 int(pixels), int(C), int(r.bwd.per_block), r.bwd.lanes, r.bwd.rows,
                                                 r.bwd.chunks, r.bwd.vec, acc(1) / acc(C));
    });
    if (lc.affine) {
      emu_launch(dim3(r.bwd.sum_grid.x), kThreads, [&] {
        sum_partials_kernel<T, acc>(pw, r.grad_weight.data(), nblk, C, 1, C, false);
      });
      emu_launch(dim3(r.bwd.sum_grid.x), kThreads, [&] {
        sum_partials_kernel<T, acc>(pb, r.grad_bias.data(), nblk, C, 1, C, false);
      });
    }
  }
  r.out.assign(out.begin() + off, out.end());
  r.normed.assign(normed.begin() + off, normed.end());
  r.grad_sum.assign(gsum.begin() + off, gsum.end());
  return r;
}

// Elements whose bits differ (NaN payloads included: the kernels are deterministic).
template <typename T>
int64_t bit_mismatches(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return -1;
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return n;
}

template <typename T>
Outcome run_ln(Shape s, LnCase lc, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t C = s.C, tokens = int64_t(s.B) * s.h * s.w, pixels = int64_t(s.B) * s.H * s.W;
  const float eps = 1e-5f;
  LnInputs<T> in;
  in.tok = random_vector<T>(tokens * C, -1, 1, rng);
  in.res = random_vector<T>(pixels * C, -1, 1, rng);
  in.weight = random_vector<T>(C, 0.5, 1.5, rng);
  in.bias = random_vector<T>(C, -0.5, 0.5, rng);
  in.gout = random_vector<T>(pixels * C, -1, 1, rng);
  in.gnorm = random_vector<T>(pixels * C, -1, 1, rng);
  // A common offset in every row (the mean), so a one-pass E[x^2] - mean^2 variance would fail fp32.
  if (lc.far) {  // out ~ center + N(0, 1): rows far from zero
    std::normal_distribution<double> n01(0.0, 1.0);
    for (auto& v : in.res) v = T(lc.center + n01(rng));
    for (auto& v : in.tok) v = T(0.1 * n01(rng));
  } else {
    for (auto& v : in.res) v = T(value(v) + lc.center);
  }
  const int64_t ic = lc.inject_channel >= 0 ? lc.inject_channel : C / 3;
  if (lc.inject & kWeightInf) in.weight[ic] = T(INFINITY);
  if (lc.inject & kGradInf) {
    // The row's mean > 0 and out < 0 at the inf: b = (sum_g mean - ds) rstd^3 / C is then -inf (not NaN) and
    // grad_sum mixes -inf and NaN by the sign of out.
    const int64_t p = pixels / 2;
    for (int64_t c = 0; c < C; ++c) in.res[p * C + c] = T(value(in.res[p * C + c]) + 0.5);
    in.res[p * C + ic] = T(-3.0);
    in.gnorm[p * C + ic] = T(INFINITY);
  }
  if (lc.inject & kGradNan) in.gnorm[(pixels / 3) * C + (ic + 1) % C] = T(NAN);
  if (lc.nonfinite) {
    in.tok[1] = T(INFINITY);                            // first token: the pixels blending it get +inf
    in.tok[(tokens - 1) * C + 2] = T(NAN);              // last token: NaN
    in.gnorm[(pixels / 2) * C + C - 1] = T(-INFINITY);  // a middle pixel's last channel
  }
  const int off = lc.aligned ? 0 : 1;
  const LnRun<T> r = run_ln_kernels(s, in, lc, off, eps);

  Outcome o;
  o.require(r.fwd.error.empty() && r.bwd.error.empty(), "plan_error");

  // out: upsample_add_fwd's kernel on the same inputs, bit for bit, and the float64 sum within tolerance.
  {
    std::vector<T> tok = shifted(in.tok, off), res = shifted(in.res, off), ref(pixels * C + off, T(-7.f));
    const bool aligned = is_aligned16(tok.data() + off) && is_aligned16(res.data() + off) &&
                         is_aligned16(ref.data() + off);
    const UpsampleAddPlan p = upsample_add_plan("upsample_add_fwd", false, s.B, s.h, s.w, s.H, s.W, C, sizeof(T),
                                                aligned);
    const acc sy = upsample_add_scale<acc>(s.h, s.H), sx = upsample_add_scale<acc>(s.w, s.W);
    emu_launch(dim3(p.grid.x), kThreads, [&] {
      upsample_add_fwd_kernel<T, acc>(tok.data() + off, res.data() + off, ref.data() + off, int(p.items), s.h, s.w,
                                      s.H, s.W, C, sy, sx, p.lanes, p.rows, p.vec_width);
    });
    const int64_t diff = bit_mismatches(r.out, std::vector<T>(ref.begin() + off, ref.end()));
    o.require(diff == 0, "out_differs_from_upsample_add_fwd");
    char buf[64];
    std::snprintf(buf, sizeof buf, " out_bits=%ld", static_cast<long>(diff));
    o.detail += buf;
  }
  const RefTaps<acc> ty(s.h, s.H), tx(s.w, s.W);
  std::vector<double> want_out(pixels * C), want_normed(pixels * C), want_mean(pixels), want_rstd(pixels);
  std::vector<double> want_gsum(pixels * C), want_gw(lc.affine ? C : 0, 0.0), want_gb(lc.affine ? C : 0, 0.0);
  int64_t fallback_rows = 0;  // backward rows the reference computes with eager's algebra
  for (int b = 0; b < s.B; ++b)
    for (int y = 0; y < s.H; ++y)
      for (int x = 0; x < s.W; ++x) {
        const RefPixel px(s, ty, tx, b, y, x);
        const int64_t p = px.p, t00 = px.t00, t01 = px.t01, t10 = px.t10, t11 = px.t11;
        const double a0 = px.a0, a1 = px.a1, b0 = px.b0, b1 = px.b1;
        for (int64_t c = 0; c < C; ++c) {
          const double s0 = a0 * value(in.tok[t00 * C + c]) + a1 * value(in.tok[t10 * C + c]);
          const double s1 = a0 * value(in.tok[t01 * C + c]) + a1 * value(in.tok[t11 * C + c]);
          want_out[p * C + c] = value(in.res[p * C + c]) + (b0 * s0 + b1 * s1);
        }
        // The statistics of the stored (rounded) out row, two passes in float64, the mean shifted by the
        // row's first value (x0 + sum (x - x0) / C: NaN where x0 is infinite, as the contract's).
        const T* row = r.out.data() + p * C;
        const double x0 = value(row[0]);
        double mean = 0, var = 0;
        for (int64_t c = 0; c < C; ++c) mean += value(row[c]) - x0;
        mean = x0 + mean / double(C);
        for (int64_t c = 0; c < C; ++c) var += (value(row[c]) - mean) * (value(row[c]) - mean);
        var /= double(C);
        const double rstd = 1.0 / std::sqrt(var + double(acc(eps)));
        want_mean[p] = mean;
        want_rstd[p] = rstd;
        for (int64_t c = 0; c < C; ++c) {
          double n = (value(row[c]) - mean) * rstd;
          if (lc.weight) n *= value(in.weight[c]);
          if (lc.bias) n += value(in.bias[c]);
          want_normed[p * C + c] = n;
        }
        // Backward from the kernel's saved mean and rstd (the inputs the backward kernel reads).
        const double km = r.mean[p], kr = r.rstd[p];
        double sg = 0, sgx = 0, ds = 0;
        for (int64_t c = 0; c < C; ++c) {
          const double xh = (value(row[c]) - km) * kr;
          const double g = value(in.gnorm[p * C + c]) * (lc.weight ? value(in.weight[c]) : 1.0);
          sg += g;
          sgx += g * xh;
          ds += g * value(row[c]);
        }
        // sum g or sum g xhat not finite: eager's CPU algebra, dx = rstd g + b x + shift.
        const bool finite = std::isfinite(sg) && std::isfinite(sgx);
        const double bb = (sg * km - ds) * kr * kr * kr / double(C);
        const double shift = -bb * km - sg * kr / double(C);
        for (int64_t c = 0; c < C; ++c) {
          const double xh = (value(row[c]) - km) * kr, gn = value(in.gnorm[p * C + c]);
          const double g = gn * (lc.weight ? value(in.weight[c]) : 1.0);
          want_gsum[p * C + c] =
              finite ? value(in.gout[p * C + c]) + kr * (g - sg / double(C) - xh * (sgx / double(C)))
                     : value(in.gout[p * C + c]) + (kr * g + bb * value(row[c]) + shift);
          fallback_rows += !finite && c == 0;
          if (lc.affine) {
            want_gw[c] += gn * xh;
            want_gb[c] += gn;
          }
        }
      }
  const auto infs = [](const std::vector<double>& v) {
    return static_cast<long>(std::count_if(v.begin(), v.end(), [](double x) { return std::isinf(x); }));
  };
  const Tol tol = tol_for<T>();
  o.check_pattern("out", r.out, want_out, tol);
  o.check_pattern("mean", r.mean, want_mean, tol);
  o.check_pattern("rstd", r.rstd, want_rstd, tol);
  o.check_pattern("normed", r.normed, want_normed, tol);
  o.check_pattern("grad_sum", r.grad_sum, want_gsum, tol);
  if (lc.affine) {
    o.check_pattern("grad_weight", r.grad_weight, want_gw, tol);
    o.check_pattern("grad_bias", r.grad_bias, want_gb, tol);
  } else {
    o.require(r.grad_weight.empty() && r.grad_bias.empty(), "affine_grads_written");
  }

  // Determinism: the same call again, on the other path (vector <-> scalar) when C allows both, must give
  // every output bit for bit (the element -> thread map, hence each sum's order, is the same on both paths).
  const int vw = 16 / int(sizeof(T));
  const bool other = C % vw == 0;
  const LnRun<T> r2 = run_ln_kernels(s, in, lc, other ? 1 - off : off, eps);
  o.require(r2.fwd.vec != r.fwd.vec || !other, "rerun_took_the_same_path");
  int64_t rerun = 0;
  for (const int64_t d : {bit_mismatches(r.out, r2.out), bit_mismatches(r.normed, r2.normed),
                          bit_mismatches(r.mean, r2.mean), bit_mismatches(r.rstd, r2.rstd),
                          bit_mismatches(r.grad_sum, r2.grad_sum), bit_mismatches(r.grad_weight, r2.grad_weight),
                          bit_mismatches(r.grad_bias, r2.grad_bias)})
    rerun += d < 0 ? 1 : d;
  o.require(rerun == 0, "rerun_differs");

  char buf[360];
  std::snprintf(buf, sizeof buf,
                " vec=%d lanes=%d rows=%d chunks=%d cached=%d bwd_lanes=%d bwd_rows=%d bwd_chunks=%d bwd_cached=%d"
                " nblk=%ld steps=%ld weight=%d bias=%d affine=%d inject=%d fallback_rows=%ld rerun_vec=%d"
                " rerun_bits=%ld",
                r.fwd.vec, r.fwd.lanes, r.fwd.rows, r.fwd.chunks, r.fwd.cached, r.bwd.lanes, r.bwd.rows,
                r.bwd.chunks, r.bwd.cached, static_cast<long>(r.bwd.bwd_grid.x),
                static_cast<long>(r.bwd.per_block / r.bwd.rows), lc.weight, lc.bias, lc.affine, lc.inject,
                static_cast<long>(fallback_rows), r2.fwd.vec, static_cast<long>(rerun));
  o.detail = buf + o.detail;
  if (lc.inject != kInjectNone) {  // the infinities expected (NaN counts: check_pattern's)
    std::snprintf(buf, sizeof buf, " inf: grad_sum=%ld grad_weight=%ld grad_bias=%ld", infs(want_gsum),
                  infs(want_gw), infs(want_gb));
    o.detail += buf;
  }
  return o;
}

template <typename T>
Case make_ln(Shape s, LnCase lc, const char* what) {
  static uint32_t seed = 101;
  const uint32_t sd = seed++;
  char name[200];
  std::snprintf(name, sizeof name, "ln %s B=%d %dx%d->%dx%d C=%d aligned=%d (%s)", dtype_name<T>(), s.B, s.h, s.w,
                s.H, s.W, s.C, lc.aligned, what);
  return Case{name, [=] { return run_ln<T>(s, lc, sd); }};
}

LnCase ln(bool aligned = true, bool weight = true, bool bias = true, bool affine = true,
          int64_t max_blocks = kUpsampleLnBwdBlocks, bool nonfinite = false) {
  LnCase c;
  c.aligned = aligned;
  c.weight = weight;
  c.bias = bias;
  c.affine = affine;
  c.max_blocks = max_blocks;
  c.nonfinite = nonfinite;
  return c;
}

// Rows far from zero: out ~ center + N(0, 1).
LnCase ln_far(double center, int64_t max_blocks = kUpsampleLnBwdBlocks) {
  LnCase c = ln(true, true, true, true, max_blocks);
  c.far = true;
  c.center = center;
  return c;
}

// Non-finite backward inputs on rows about zero (residual U(-1, 1), no offset).
LnCase ln_inject(int inject, int channel = -1, bool aligned = true, int64_t max_blocks = kUpsampleLnBwdBlocks) {
  LnCase c = ln(aligned, true, true, true, max_blocks);
  c.center = 0.0;
  c.inject = inject;
  c.inject_channel = channel;
  return c;
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
                       // upsample_add_layer_norm
                       make_ln<float>({2, 3, 4, 7, 9, 96}, ln(), "lanes 8 x 3 chunks, 126 pixels: last block part"),
                       make_ln<float>({2, 7, 9, 3, 4, 13}, ln(), "C = 13: scalar path, one lane per row"),
                       make_ln<float>({1, 3, 5, 9, 11, 96}, ln(false, true, false, true, 2), "misaligned, no bias"),
                       make_ln<float>({2, 3, 3, 5, 6, 64}, ln(true, false, false, false),
                                      "no weight, no bias, no affine grads"),
                       make_ln<float>({1, 2, 3, 5, 7, 600}, ln(true, true, true, true, 3),
                                      "2 warps per row: shared-memory row sums"),
                       make_ln<float>({1, 2, 2, 3, 3, 2500}, ln(true, true, true, true, 4), "256 lanes, cached"),
                       make_ln<float>({1, 2, 2, 3, 3, 1500}, ln(true, true, true, true, 4),
                                      "backward: 256 lanes, cached"),
                       make_ln<float>({1, 2, 2, 3, 2, 4100}, ln(true, true, true, true, 2),
                                      "C > 4096: rows re-read"),
                       make_ln<float>({1, 2, 2, 2, 3, 4099}, ln(false, false, true, true, 2),
                                      "C > 4096, scalar path re-read"),
                       make_ln<float>({1, 4, 3, 7, 5, 40}, ln(true, true, true, true, 2, true), "inf and NaN"),
                       make_ln<double>({2, 2, 2, 5, 5, 6}, ln(), "f64 vectors of 2"),
                       make_ln<double>({1, 3, 2, 5, 9, 40}, ln(false, true, true, true, 3), "f64 misaligned"),
                       make_ln<double>({1, 1, 2, 2, 2, 2100}, ln(true, false, true, true), "f64 C > 2048: re-read"),
                       make_ln<BF16>({1, 4, 4, 8, 16, 24}, ln(), "bf16 vectors of 8"),
                       make_ln<BF16>({2, 3, 2, 5, 7, 13}, ln(true, true, true, true, 3), "bf16 scalar path"),
                       make_ln<BF16>({1, 2, 2, 3, 4, 768}, ln(true, true, false, true, 2), "bf16 C = 768"),
                       // Rows far from zero: the shifted mean.
                       make_ln<float>({2, 3, 4, 7, 9, 96}, ln_far(300.0, 8), "far from zero, C = 96"),
                       make_ln<float>({1, 3, 3, 5, 6, 768}, ln_far(300.0, 4), "far from zero, C = 768"),
                       make_ln<float>({1, 2, 2, 6, 6, 4100}, ln_far(300.0, 3), "far from zero, C > 4096: re-read"),
                       // Non-finite backward rows: eager's algebra.
                       make_ln<float>({2, 3, 4, 7, 9, 96}, ln_inject(kWeightInf, 5, true, 8), "weight +inf"),
                       make_ln<float>({1, 3, 5, 9, 11, 40}, ln_inject(kWeightInf, 0, false, 4),
                                      "weight +inf at channel 0, misaligned"),
                       make_ln<float>({2, 3, 4, 7, 9, 96}, ln_inject(kGradInf, -1, true, 8), "grad_normed +inf"),
                       make_ln<float>({2, 3, 4, 7, 9, 96}, ln_inject(kGradNan, -1, true, 8), "grad_normed NaN"),
                       make_ln<float>({1, 2, 2, 3, 4, 2100}, ln_inject(kGradInf | kGradNan, -1, true, 3),
                                      "grad_normed +inf and NaN, backward re-read"),
                       make_ln<float>({1, 2, 2, 2, 3, 2100}, ln_inject(kWeightInf, 7, true, 2),
                                      "weight +inf, backward re-read"),
                       make_ln<double>({1, 3, 2, 5, 9, 40}, ln_inject(kWeightInf | kGradNan, 3, true, 3),
                                       "f64 weight +inf, grad_normed NaN"),
                   });
}
