// CPU backend of upsample_add (see docs/kernels.md, "upsample_add"): IIWA's
//   out[b, y, x, c] = residual[b, y, x, c] + bilinear(tokens)[b, y, x, c]   (align_corners=True)
// tokens [B, h, w, C] and residual [B, H, W, C] are channels last: every loop
// runs along C, contiguous and vectorised; no permuted copies.
//
// Source indices and weights per output row / column are PyTorch's
// (area_pixel_compute_scale + guard_index_and_lambda, align_corners=True):
// scale = (in - 1) / (out - 1) (0 when out == 1), src = scale * dst,
// i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), l1 = clamp(src - i0, 0, 1),
// l0 = 1 - l1. Both taps are always applied, even at weight 0, so a NaN or inf
// in a neighbouring token spreads exactly as in eager PyTorch.
//
// Forward, per output row (b, y): the two token rows are blended into one
// [w, C] row, then each output pixel blends two entries of it and adds the residual.
// Backward, grad_tokens = U^T grad as a gather, per token row (b, i): the output
// rows touching i (a contiguous range, as i0 and i1 are monotone in y) are
// summed with their weights into one [W, C] row, then each token (i, j) sums the
// output columns touching j. Separable, yet with eager's NaN pattern: a sum of
// tap products is NaN for an infinite gradient iff a touching tap of either
// axis has weight 0, here as in eager's four-term scatter. Every sum has a fixed order: no atomics, results
// independent of the thread count.
//
// upsample_add_layer_norm: the same forward with a LayerNorm over C of each pixel's stored sum, computed
// while the row is in L1 (stats in SIMD lanes), plus its backward (grad_sum = grad_out + the norm's input
// gradient; the affine gradients reduced per fixed block of pixels, then in block order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/output.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "upsample_add (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "upsample_add: ", name, " must be 4-D [B, H, W, C] (channels last), got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "upsample_add: ", name, " must be contiguous (channels last)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              "upsample_add (cpu): ", name, " must be float32, float64 or bfloat16, got ", t.scalar_type());
}

// The two taps of every output index along one axis (in -> out).
template <typename acc_t>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  // For each input index, the range [lo, hi) of output indices whose taps touch it (empty: lo == hi).
  std::vector<int64_t> lo, hi;

  Taps(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out), lo(in, 0), hi(in, 0) {
    const acc_t scale = out > 1 ? static_cast<acc_t>(in - 1) / static_cast<acc_t>(out - 1) : acc_t(0);
    for (int64_t d = 0; d < out; ++d) {
      const acc_t src = scale * static_cast<acc_t>(d);
      const int64_t a = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const acc_t lambda = std::min(std::max(src - static_cast<acc_t>(a), acc_t(0)), acc_t(1));
      i0[d] = a;
      i1[d] = a + (a < in - 1 ? 1 : 0);
      l1[d] = lambda;
      l0[d] = acc_t(1) - lambda;
    }
    for (int64_t d = out - 1; d >= 0; --d) lo[i0[d]] = lo[i1[d]] = d;  // smallest d touching each input
    for (int64_t d = 0; d < out; ++d) hi[i0[d]] = hi[i1[d]] = d + 1;
  }

};

// dst[k] += the taps of output index d on input index i applied to src[k]. When both taps are i (the last
// index: i1 clamped to i0), they are applied one by one as the eager backward's scatter does, so an
// infinite gradient times the 0-weight tap gives NaN there too.
template <typename acc_t, typename src_t>
inline void add_taps(acc_t* dst, const src_t* src, int64_t n, const Taps<acc_t>& taps, int64_t d, int64_t i) {
  const bool first = taps.i0[d] == i, second = taps.i1[d] == i;
  if (first && second) {
    const acc_t a = taps.l0[d], b = taps.l1[d];
    for (int64_t k = 0; k < n; ++k) dst[k] += a * static_cast<acc_t>(src[k]) + b * static_cast<acc_t>(src[k]);
  } else {
    const acc_t a = first ? taps.l0[d] : taps.l1[d];
    for (int64_t k = 0; k < n; ++k) dst[k] += a * static_cast<acc_t>(src[k]);
  }
}

void check_pair(const at::Tensor& tokens, const at::Tensor& residual) {
  check_data(tokens, "tokens");
  check_data(residual, "residual");
  TORCH_CHECK(tokens.scalar_type() == residual.scalar_type(), "upsample_add: residual has dtype ",
              residual.scalar_type(), ", expected tokens' ", tokens.scalar_type());
  TORCH_CHECK(tokens.size(0) == residual.size(0) && tokens.size(3) == residual.size(3),
              "upsample_add: tokens [B, h, w, C] and residual [B, H, W, C] must share B and C, got ",
              tokens.sizes(), " and ", residual.sizes());
  TORCH_CHECK(tokens.size(1) >= 1 && tokens.size(2) >= 1, "upsample_add: tokens must have h, w >= 1, got ",
              tokens.sizes());
}

// out = residual + bilinear(tokens), one output row (b, y) per step; after each pixel's C sums are stored,
// pixel_done(p, sum_row) runs on them while they are in L1 (the LayerNorm epilogue; a no-op for the sum).
template <typename scalar_t, typename PixelDone>
void upsample_add_rows(const at::Tensor& tokens, const at::Tensor& residual, at::Tensor& out,
                       PixelDone&& pixel_done) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = residual.size(0), H = residual.size(1), W = residual.size(2), C = residual.size(3);
  const int64_t h = tokens.size(1), w = tokens.size(2);
  const Taps<acc_t> ty(h, H), tx(w, W);
  const scalar_t* tp = tokens.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * H, cpu::task_grain((W + w) * C), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> blend(w * C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, y = r % H;
      const scalar_t* t0 = tp + (b * h + ty.i0[y]) * w * C;
      const scalar_t* t1 = tp + (b * h + ty.i1[y]) * w * C;
      const acc_t a0 = ty.l0[y], a1 = ty.l1[y];
      for (int64_t k = 0; k < w * C; ++k) {
        blend[k] = a0 * static_cast<acc_t>(t0[k]) + a1 * static_cast<acc_t>(t1[k]);
      }
      const scalar_t* res = rp + r * W * C;
      scalar_t* dst = op + r * W * C;
      for (int64_t x = 0; x < W; ++x) {
        const acc_t* s0 = blend.data() + tx.i0[x] * C;
        const acc_t* s1 = blend.data() + tx.i1[x] * C;
        const acc_t b0 = tx.l0[x], b1 = tx.l1[x];
        const scalar_t* rr = res + x * C;
        scalar_t* d = dst + x * C;
        for (int64_t c = 0; c < C; ++c) {
          d[c] = static_cast<scalar_t>(static_cast<acc_t>(rr[c]) + (b0 * s0[c] + b1 * s1[c]));
        }
        pixel_done(r * W + x, static_cast<const scalar_t*>(d));
      }
    }
  });
}

at::Tensor upsample_add_fwd(const at::Tensor& tokens, const at::Tensor& residual) {
  check_pair(tokens, residual);
  auto out = cpu::empty_output_like(residual);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "upsample_add_fwd", [&] {
    upsample_add_rows<scalar_t>(tokens, residual, out, [](int64_t, const scalar_t*) {});
  });
  return out;
}

void check_affine(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == like.size(3) && t->is_contiguous(),
              "upsample_add_layer_norm (cpu): ", name, " must be a contiguous CPU tensor of shape [C] = [",
              like.size(3), "], got ", t->sizes(), " on ", t->device());
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), "upsample_add_layer_norm: ", name, " has dtype ",
              t->scalar_type(), ", expected the data's ", like.scalar_type());
}

// The LayerNorm row kernels, on rows in the accumulation type (float or double; bf16 rows are converted
// first). Their sums over C run in Simd lanes (a fixed order: the same result on every call and thread):
// a scalar float sum is one dependent add per channel, which the compiler may not reorder into vectors.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// sum over c < n of the vectors term(c, acc) adds to acc at c, c + kLanes, ... (n a multiple of kLanes;
// added in place: a vector returned by value trips GCC's ABI note on the baseline clone): four
// accumulators, so the adds of one are not waiting on the last (a single chain runs at one add per
// latency), summed in a fixed order.
template <typename T, typename Term>
__attribute__((always_inline)) inline T lane_sum(int64_t n, Term&& term) {
  using S = cpu::Simd<T>;
  using vec = typename S::vec;
  constexpr int64_t L = S::kLanes;
  vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t c = 0;
  for (; c + 4 * L <= n; c += 4 * L) {
    term(c, a0);
    term(c + L, a1);
    term(c + 2 * L, a2);
    term(c + 3 * L, a3);
  }
  for (; c < n; c += L) term(c, a0);
  const vec v = (a0 + a1) + (a2 + a3);
  T total = 0;
  for (int j = 0; j < L; ++j) total += v[j];
  return total;
}

// Mean and rstd of x[0, C): the mean as x0 + the mean of x - x0 (x0 = x[0]: the deviations are small,
// so their sum keeps its digits where a plain fp32 sum of values far from zero rounds at every add), then
// the sum of squares about it (E[x^2] - mean^2 would cancel).
template <typename T>
__attribute__((always_inline)) inline void row_moments_body(const T* x, int64_t C, T eps, T* mean, T* rstd) {
  using S = cpu::Simd<T>;
  using vec = typename S::vec;
  const int64_t c_vec = C - C % S::kLanes;
  const T x0 = x[0];
  T shifted = lane_sum<T>(c_vec, [&](int64_t c, vec& acc) { acc += S::load(x + c) - x0; });
  for (int64_t c = c_vec; c < C; ++c) shifted += x[c] - x0;
  const T mu = x0 + shifted / static_cast<T>(C);
  T squares = lane_sum<T>(c_vec, [&](int64_t c, vec& acc) {
    const vec d = S::load(x + c) - mu;
    acc += d * d;
  });
  for (int64_t c = c_vec; c < C; ++c) squares += (x[c] - mu) * (x[c] - mu);
  *mean = mu;
  *rstd = T(1) / std::sqrt(squares / static_cast<T>(C) + eps);
}

// y = (x - mean) rstd w + b.
template <typename T>
__attribute__((always_inline)) inline void normalize_row_body(const T* x, int64_t C, T mean, T rstd, const T* w,
                                                              const T* b, T* y) {
  for (int64_t c = 0; c < C; ++c) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
}

// LayerNorm's input gradient of one row plus grad_out: with xhat = (x - mean) rstd and g = gn w,
// dx = go + rstd (g - mean(g) - xhat mean(g xhat)). xhat and g go to scratch rows; when pw is given, the
// affine gradients' partial sums gain gn xhat (pw) and gn (pb).
template <typename T>
__attribute__((always_inline)) inline void norm_input_grad_body(const T* x, const T* gn, const T* go, const T* w,
                                                                int64_t C, T mean, T rstd, T* xhat, T* g, T* dx,
                                                                T* pw, T* pb) {
  using S = cpu::Simd<T>;
  using vec = typename S::vec;
  for (int64_t c = 0; c < C; ++c) {
    xhat[c] = (x[c] - mean) * rstd;
    g[c] = gn[c] * w[c];
  }
  const int64_t c_vec = C - C % S::kLanes;
  T sum_g = lane_sum<T>(c_vec, [&](int64_t c, vec& acc) { acc += S::load(g + c); });
  T sum_gx = lane_sum<T>(c_vec, [&](int64_t c, vec& acc) { acc += S::load(g + c) * S::load(xhat + c); });
  for (int64_t c = c_vec; c < C; ++c) {
    sum_g += g[c];
    sum_gx += g[c] * xhat[c];
  }
  const T inv_c = T(1) / static_cast<T>(C);
  if (std::isfinite(sum_g) && std::isfinite(sum_gx)) {
    const T mean_g = sum_g * inv_c, mean_gx = sum_gx * inv_c;
    for (int64_t c = 0; c < C; ++c) dx[c] = go[c] + rstd * (g[c] - mean_g - xhat[c] * mean_gx);
  } else {
    // An inf in the weight or grad_normed: eager's CPU kernel's algebra, so NaN and inf land where eager
    // puts them (dx = rstd g + b x + c with its row sums of g x and g; it cancels for rows far from zero,
    // which is why finite rows take the form above).
    T ds = 0;
    for (int64_t c = 0; c < C; ++c) ds += g[c] * x[c];
    const T b = (sum_g * mean - ds) * rstd * rstd * rstd * inv_c;
    const T shift = -b * mean - sum_g * rstd * inv_c;
    for (int64_t c = 0; c < C; ++c) dx[c] = go[c] + (rstd * g[c] + b * x[c] + shift);
  }
  if (pw != nullptr) {
    for (int64_t c = 0; c < C; ++c) {
      pw[c] += gn[c] * xhat[c];
      pb[c] += gn[c];
    }
  }
}

#define FASTCTX_NORM_ROW_KERNELS(T)                                                                   \
  FASTCTX_SIMD_CLONES void row_moments(const T* x, int64_t C, T eps, T* mean, T* rstd) {              \
    row_moments_body(x, C, eps, mean, rstd);                                                          \
  }                                                                                                   \
  FASTCTX_SIMD_CLONES void normalize_row(const T* x, int64_t C, T mean, T rstd, const T* w, const T* b, \
                                         T* y) {                                                      \
    normalize_row_body(x, C, mean, rstd, w, b, y);                                                    \
  }                                                                                                   \
  FASTCTX_SIMD_CLONES void norm_input_grad(const T* x, const T* gn, const T* go, const T* w, int64_t C, \
                                           T mean, T rstd, T* xhat, T* g, T* dx, T* pw, T* pb) {      \
    norm_input_grad_body(x, gn, go, w, C, mean, rstd, xhat, g, dx, pw, pb);                          \
  }
FASTCTX_NORM_ROW_KERNELS(float)
FASTCTX_NORM_ROW_KERNELS(double)
#undef FASTCTX_NORM_ROW_KERNELS

// A row of C values as acc_t: the row itself when scalar_t is acc_t, else converted into buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* as_acc(const scalar_t* row, int64_t C, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return row;
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(row[c]);
    return buf;
  }
}

// weight or bias as C acc_t values (fill where absent: 1 for the weight, 0 for the bias).
template <typename acc_t>
std::vector<acc_t> affine_row(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> row(C, fill);
  if (t.has_value()) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t->scalar_type(), "affine_row", [&] {
      const scalar_t* p = t->const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<acc_t>(p[c]);
    });
  }
  return row;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_add_layer_norm_fwd(
    const at::Tensor& tokens, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  check_pair(tokens, residual);
  check_affine(weight, "weight", residual);
  check_affine(bias, "bias", residual);
  TORCH_CHECK(residual.size(3) >= 1, "upsample_add_layer_norm: C must be >= 1, got ", residual.sizes());
  const int64_t B = residual.size(0), H = residual.size(1), W = residual.size(2), C = residual.size(3);
  const auto stats = residual.options().dtype(at::toOpMathType(residual.scalar_type()));
  auto out = cpu::empty_output_like(residual);
  auto normed = cpu::empty_output_like(residual);
  auto mean = at::empty({B, H, W}, stats), rstd = at::empty({B, H, W}, stats);
  if (out.numel() == 0) return {out, normed, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "upsample_add_layer_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> w = affine_row<acc_t>(weight, C, acc_t(1)), b = affine_row<acc_t>(bias, C, acc_t(0));
    scalar_t* np = normed.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* sp = rstd.mutable_data_ptr<acc_t>();
    const acc_t epsilon = static_cast<acc_t>(eps);
    // Scratch rows for bf16 data, one pair per thread (the epilogue runs inside upsample_add_rows' tasks).
    constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
    std::vector<acc_t> scratch(kConvert ? at::get_num_threads() * 2 * C : 0);
    upsample_add_rows<scalar_t>(tokens, residual, out, [&](int64_t p, const scalar_t* row) {
      acc_t* buf = kConvert ? scratch.data() + at::get_thread_num() * 2 * C : nullptr;
      const acc_t* x = as_acc(row, C, buf);
      row_moments(x, C, epsilon, mp + p, sp + p);
      if constexpr (kConvert) {
        normalize_row(x, C, mp[p], sp[p], w.data(), b.data(), buf + C);
        for (int64_t c = 0; c < C; ++c) np[p * C + c] = static_cast<scalar_t>(buf[C + c]);
      } else {
        // scalar_t is acc_t here (the cast only makes the branch compile in the bf16 instantiation)
        normalize_row(x, C, mp[p], sp[p], w.data(), b.data(), reinterpret_cast<acc_t*>(np + p * C));
      }
    });
  });
  return {out, normed, mean, rstd};
}

// Pixels per block of the affine gradients' partial sums: fixed, so the blocks and the order they are
// summed in do not depend on the thread count.
constexpr int64_t kAffinePixels = 128;

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_add_layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_normed, const at::Tensor& out, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight, bool affine_grads) {
  check_data(grad_out, "grad_out");
  check_data(grad_normed, "grad_normed");
  check_data(out, "out");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_normed.sizes() == out.sizes(),
              "upsample_add_layer_norm_bwd: grad_out ", grad_out.sizes(), " and grad_normed ", grad_normed.sizes(),
              " must have out's shape ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type() && grad_normed.scalar_type() == out.scalar_type(),
              "upsample_add_layer_norm_bwd: the gradients must have out's dtype ", out.scalar_type());
  check_affine(weight, "weight", out);
  const int64_t B = out.size(0), H = out.size(1), W = out.size(2), C = out.size(3), P = B * H * W;
  const auto stats = at::toOpMathType(out.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == stats &&
                    t->sizes() == at::IntArrayRef({B, H, W}),
                "upsample_add_layer_norm_bwd: mean and rstd must be contiguous ", stats, " [B, H, W] = [", B, ", ",
                H, ", ", W, "], got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(C >= 1, "upsample_add_layer_norm_bwd: C must be >= 1, got ", out.sizes());
  auto grad_sum = cpu::empty_output_like(out);
  auto grad_weight = at::empty({affine_grads ? C : 0}, out.options());
  auto grad_bias = at::empty({affine_grads ? C : 0}, out.options());
  if (P == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_sum, grad_weight, grad_bias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "upsample_add_layer_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* gn = grad_normed.const_data_ptr<scalar_t>();
    const scalar_t* xp = out.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* sp = rstd.const_data_ptr<acc_t>();
    const std::vector<acc_t> w = affine_row<acc_t>(weight, C, acc_t(1));
    scalar_t* gs = grad_sum.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (P + kAffinePixels - 1) / kAffinePixels;
    // per block: sum of grad_normed * xhat (C), then sum of grad_normed (C)
    std::vector<acc_t> partial(affine_grads ? blocks * 2 * C : 0);
    constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
    at::parallel_for(0, blocks, cpu::task_grain(kAffinePixels * 4 * C), [&](int64_t k0, int64_t k1) {
      // xhat, g, and for bf16 data the rows of out, grad_normed, grad_out and grad_sum as acc_t
      std::vector<acc_t> rows((kConvert ? 6 : 2) * C);
      acc_t *xhat = rows.data(), *g = xhat + C, *buf = g + C;
      for (int64_t k = k0; k < k1; ++k) {
        acc_t* pw = affine_grads ? partial.data() + k * 2 * C : nullptr;
        if (pw) std::fill(pw, pw + 2 * C, acc_t(0));
        for (int64_t p = k * kAffinePixels; p < std::min(P, (k + 1) * kAffinePixels); ++p) {
          const acc_t* x = as_acc(xp + p * C, C, buf);
          const acc_t* dn = as_acc(gn + p * C, C, buf + C);
          const acc_t* dout = as_acc(go + p * C, C, buf + 2 * C);
          if constexpr (kConvert) {
            norm_input_grad(x, dn, dout, w.data(), C, mp[p], sp[p], xhat, g, buf + 3 * C, pw, pw ? pw + C : nullptr);
            for (int64_t c = 0; c < C; ++c) gs[p * C + c] = static_cast<scalar_t>(buf[3 * C + c]);
          } else {
            norm_input_grad(x, dn, dout, w.data(), C, mp[p], sp[p], xhat, g, reinterpret_cast<acc_t*>(gs + p * C), pw,
                            pw ? pw + C : nullptr);  // scalar_t is acc_t here
          }
        }
      }
    });
    if (affine_grads) {
      scalar_t* dw = grad_weight.mutable_data_ptr<scalar_t>();
      scalar_t* db = grad_bias.mutable_data_ptr<scalar_t>();
      std::vector<acc_t> tw(C, acc_t(0)), tb(C, acc_t(0));
      for (int64_t k = 0; k < blocks; ++k) {  // in block order
        const acc_t* pw = partial.data() + k * 2 * C;
        for (int64_t c = 0; c < C; ++c) {
          tw[c] += pw[c];
          tb[c] += pw[C + c];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        dw[c] = static_cast<scalar_t>(tw[c]);
        db[c] = static_cast<scalar_t>(tb[c]);
      }
    }
  });
  return {grad_sum, grad_weight, grad_bias};
}

at::Tensor upsample_add_bwd(const at::Tensor& grad, int64_t height, int64_t width) {
  check_data(grad, "grad");
  TORCH_CHECK(height >= 1 && width >= 1, "upsample_add: the token grid must be at least 1x1, got ", height, "x",
              width);
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), C = grad.size(3);
  const int64_t h = height, w = width;
  auto grad_tokens = at::empty({B, h, w, C}, grad.options());
  if (grad_tokens.numel() == 0) return grad_tokens;
  if (grad.numel() == 0) return grad_tokens.zero_();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "upsample_add_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Taps<acc_t> ty(h, H), tx(w, W);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = grad_tokens.mutable_data_ptr<scalar_t>();
    const int64_t rows_per_token = H / h + 2;  // about: a token row gathers this many output rows
    at::parallel_for(0, B * h, cpu::task_grain(rows_per_token * W * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> col(W * C), acc(C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / h, i = r % h;
        // col[x, c] = sum over the output rows y touching token row i of weight(y, i) * grad[b, y, x, c].
        std::fill(col.begin(), col.end(), acc_t(0));
        for (int64_t y = ty.lo[i]; y < ty.hi[i]; ++y) add_taps(col.data(), gp + (b * H + y) * W * C, W * C, ty, y, i);
        scalar_t* dst = op + r * w * C;
        for (int64_t j = 0; j < w; ++j) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t x = tx.lo[j]; x < tx.hi[j]; ++x) add_taps(acc.data(), col.data() + x * C, C, tx, x, j);
          for (int64_t c = 0; c < C; ++c) dst[j * C + c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
  return grad_tokens;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("upsample_add_fwd", &fastctx::upsample_add_fwd);
  m.impl("upsample_add_bwd", &fastctx::upsample_add_bwd);
  m.impl("upsample_add_layer_norm_fwd", &fastctx::upsample_add_layer_norm_fwd);
  m.impl("upsample_add_layer_norm_bwd", &fastctx::upsample_add_layer_norm_bwd);
}
