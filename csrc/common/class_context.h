#pragma once
// Scalar maths of the class-context ops, class_gather and class_attention
// (contract: docs/kernels.md; maths: fastctx/ops/class_gather.py and
// fastctx/ops/class_attention.py), shared by the CPU backend and the CUDA
// kernels. acc_t is float for fp32/fp16/bf16 data, double for fp64.
//
// Online softmax over pixels ("ocr" class_gather). The pixels of one class
// are cut into partials; a partial j keeps
//     shift_j = softmax_shift(max of its values v),
//     sum_j   = sum_n exp(v_n - shift_j),
//     acc_j   = sum_n exp(v_n - shift_j) F_n  (a vector),
// and partials are merged, in a fixed order, onto the largest shift M:
//     sum = sum_j exp(shift_j - M) sum_j,  lse = M + log(sum),
//     centre = sum_j exp(shift_j - M) acc_j / sum.
// Non-finite values end as torch.softmax leaves them: a NaN or a +inf among
// a class's values makes the class NaN (exp(NaN) or exp(inf - inf)), -inf
// values weigh 0, and a class of only -inf values is NaN (0 / 0).
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fastctx {

// exp and log in acc_t precision on host and device (an unqualified exp(float)
// on the host may resolve to the double overload).
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t class_exp(acc_t v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  return std::exp(v);
#endif
}

template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t class_log(acc_t v) {
#if defined(__CUDA_ARCH__)
  return log(v);
#else
  return std::log(v);
#endif
}

// The offset a softmax partial subtracts before exp: the partial's maximum,
// or 0 when that maximum is -inf (all its values are -inf or NaN). Then -inf
// values give exp(-inf) = 0, not exp(-inf + inf) = NaN, while NaN values
// still give NaN. The maximum may be taken ignoring NaN: a NaN value reaches
// the partial's sum through exp either way.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t softmax_shift(acc_t max) {
  return max == -static_cast<acc_t>(INFINITY) ? acc_t(0) : max;
}

// Whether a partial takes part in the merge. One of only -inf values has sum
// 0 and contributes nothing (its shift, 0, is no maximum and must not set
// M); any other partial has sum >= 1 (its maximum gives exp(0)), or NaN.
template <typename acc_t>
FASTCTX_HOST_DEVICE bool softmax_partial_counts(acc_t sum) {
  return !(sum == acc_t(0));
}

// The common shift M of `count` partials (shifts and sums `stride` apart):
// the largest shift among those that count, -inf when none does.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t softmax_merge_shift(const acc_t* shift, const acc_t* sum, int64_t count,
                                              int64_t stride) {
  acc_t m = -static_cast<acc_t>(INFINITY);
  for (int64_t j = 0; j < count; ++j) {
    const acc_t s = shift[j * stride];
    if (softmax_partial_counts(sum[j * stride]) && s > m) m = s;
  }
  return m;
}

// The factor that rescales a partial onto the common shift M (0 for one that
// does not count). exp(shift - M) <= 1: it cannot overflow.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t softmax_merge_factor(acc_t shift, acc_t sum, acc_t merged_shift) {
  return softmax_partial_counts(sum) ? class_exp(shift - merged_shift) : acc_t(0);
}

}  // namespace fastctx
