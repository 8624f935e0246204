#pragma once
// Scalar maths of EncNet's Encoding layer (docs/kernels.md, "encoding"),
// shared by the CPU backend and any CUDA kernel. No ATen types: plain
// pointers and the accumulation type acc_t (float for fp32 data, double for
// fp64).
//
// Distances are first taken between *centred* values x' = x - m, c' = c - m
// with m = mean_k c_k. The squared distance is translation invariant, and with
// centred operands ||x'||^2 - 2 x'.c' + ||c'||^2 does not cancel when ||x|| is
// large and the codewords are clustered (within O(1) of each other). Centring
// removes only the shared offset, though: with codewords far apart (spread s)
// a feature near codeword k still has ||x'||^2 ~ ||c'_k||^2 ~ s^2 D against a
// small distance, and the expansion's rounding error ~eps (||x'||^2 +
// ||c'_k||^2) swamps it. The CPU backend recomputes such entries directly as
// sum_d (x_d - c_kd)^2 from the raw values, and their residual x - c_k enters
// the sums (E, the gradients) directly instead of as x' - c'_k:
// encoding_expansion_imprecise / encoding_logit_floor below decide which. The
// CUDA (and Triton) kernels apply the same rule per pixel and redo a flagged
// pixel whole (docs/kernels.md, "encoding").
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fastctx {

// exp in acc_t precision on host and device (an unqualified exp(float) on the
// host may resolve to the double overload).
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_exp(acc_t v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  return std::exp(v);
#endif
}

// exp of a non-positive argument (a softmax logit minus the row max). Where the
// result would be denormal, return 0: libm's underflow path is several times
// slower, peaked softmaxes hit it for most entries, and the difference
// (< 1.2e-38 in fp32) is invisible next to a row sum >= 1.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_exp_nonpos(acc_t v) {
  const acc_t lo = sizeof(acc_t) == 4 ? acc_t(-87.0f) : acc_t(-708.0);
  return v < lo ? acc_t(0) : encoding_exp(v);
}

// v where it is finite, else 0 (v - v == 0 is false for +-inf and NaN). For
// offsets that are free to choose: the centring mean m_d (an infinite
// codeword entry must stay infinite in c' while x' stays finite, as in the
// reference's x - c) and the softmax-gradient shift (an infinite shift would
// turn the row's infinite gradients into inf - inf).
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_finite_or_zero(acc_t v) {
  return v - v == acc_t(0) ? v : acc_t(0);
}

// ||x' - c'||^2 from its expanded terms, clamped at 0: rounding can still
// leave a tiny negative value when x' == c', and a negative distance would
// flip the sign of its contribution to grad_scale.
// Non-finite values follow the reference's sum_d (x_d - c_d)^2: NaN stays
// NaN (the clamp's comparison is false for it), and where exactly one of
// the norms is infinite the distance is +inf (the expansion would give
// inf - inf = NaN there).
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_sq_dist(acc_t x_sq, acc_t x_dot_c, acc_t c_sq) {
  const acc_t inf = static_cast<acc_t>(INFINITY);
  if ((x_sq == inf && c_sq < inf) || (c_sq == inf && x_sq < inf)) return inf;
  const acc_t d = x_sq - acc_t(2) * x_dot_c + c_sq;
  return d < acc_t(0) ? acc_t(0) : d;
}

// Spread codewords. The expanded distance of (x_i, c_k) carries a rounding
// error of about eps (||x'||^2 + ||c'_k||^2), the direct sum_d (x_d - c_kd)^2
// (the reference's) about eps dist: the expansion is kept where the ratio is
// at most kEncodingDirectRatio (its error then stays within that factor of the
// reference's; the residual x' - c'_k in E and the gradients likewise, within
// its square root). This never triggers for clustered codewords, where x' and
// c'_k are as large as x - c_k on average.
constexpr float kEncodingDirectRatio = 16.0f;
// Logits more than this below the row max have weight < e^-64: their precision
// does not matter, whatever it is.
constexpr float kEncodingLogitMargin = 64.0f;

// Whether the expanded distance of one entry is too imprecise to keep (finite
// norms only: non-finite entries keep the expansion's reference semantics, see
// encoding_sq_dist).
template <typename acc_t>
FASTCTX_HOST_DEVICE bool encoding_expansion_imprecise(acc_t x_sq, acc_t c_sq, acc_t dist) {
  const acc_t norms = x_sq + c_sq;
  return norms < static_cast<acc_t>(INFINITY) && norms > acc_t(kEncodingDirectRatio) * dist;
}

// Rounding-error bound of an expanded logit s_k dist_k over D channels: the
// dot product bound D eps sum_d |x'_d c'_kd| <= D eps (||x'||^2 + ||c'_k||^2)
// (the norms' own errors are of the same size), times |s_k|.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_logit_error(acc_t x_sq, acc_t c_sq, acc_t s, int64_t D) {
  const acc_t eps = sizeof(acc_t) == 4 ? acc_t(1.1920929e-7f) : acc_t(2.220446049250313e-16);
  const acc_t abs_s = s < acc_t(0) ? -s : s;
  return abs_s * (x_sq + c_sq) * (acc_t(D) * eps);
}

// Logits below this can be left imprecise: even with every expanded logit off
// by up to max_err (its bound, the largest of the row), such an entry stays
// kEncodingLogitMargin below the row max.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_logit_floor(acc_t row_max, acc_t max_err) {
  return row_max - acc_t(kEncodingLogitMargin) - acc_t(2) * max_err;
}

// In-place softmax of one pixel's K logits (stride 1). Subtracting the row
// maximum keeps exp() <= 1 so nothing overflows, whatever the scale's sign
// or size; the maximum term contributes exp(0) = 1, so the sum is >= 1.
// Non-finite logits give torch.softmax's result: a NaN anywhere, a +inf, or
// a row of -inf make the whole row NaN (through exp(NaN) or inf - inf); a
// -inf next to finite logits gets 0.
template <typename acc_t>
FASTCTX_HOST_DEVICE void encoding_softmax_row(acc_t* v, int64_t K) {
  acc_t mx = v[0];
  for (int64_t k = 1; k < K; ++k) mx = v[k] > mx ? v[k] : mx;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t e = encoding_exp_nonpos(v[k] - mx);
    v[k] = e;
    sum += e;
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t k = 0; k < K; ++k) v[k] *= inv;
}

// Softmax backward for one entry: dL_ik = A_ik (dA_ik - sum_j A_ij dA_ij),
// where a_dot_da is that row sum. Callers pass dA shifted by the row's value
// at its winning codeword (the result is the same since sum_j A_ij = 1): near
// one-hot rows then no longer subtract two nearly equal terms.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t encoding_softmax_grad(acc_t a, acc_t da, acc_t a_dot_da) {
  return a * (da - a_dot_da);
}

}  // namespace fastctx
