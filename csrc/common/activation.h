#pragma once
// Scalar activations shared by the CPU and CUDA backends. All arithmetic is in
// the accumulation type (float for fp32/fp16/bf16 inputs, double for fp64).
#include <cmath>

#include "macros.h"

namespace fastctx {

// Overflow-free logistic: exp of a non-positive argument only. NaN takes the
// second branch and stays NaN; +inf and -inf give 1 and 0, as torch.sigmoid.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t stable_sigmoid(acc_t v) {
  if (v >= acc_t(0)) {
    return acc_t(1) / (acc_t(1) + exp(-v));
  }
  const acc_t e = exp(v);
  return e / (acc_t(1) + e);
}

// d sigmoid / d logit expressed through the activation itself.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t sigmoid_grad_from_output(acc_t a) {
  return a * (acc_t(1) - a);
}

// NaN and inf propagate as in PyTorch. Comparisons are false for NaN, so every
// test below is written with the comparison whose false branch keeps the value.

// relu(NaN) = NaN (torch.relu's clamp_min propagates NaN); relu(-0) = +0.
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t relu(acc_t v) {
  return v <= acc_t(0) ? acc_t(0) : v;
}

// Whether relu's backward passes the gradient at output (or input) `v`. Like
// torch's threshold_backward it blocks only v <= 0, so the gradient passes at
// NaN (and +inf). The forward saves this bit, never `v > 0`.
template <typename acc_t>
FASTCTX_HOST_DEVICE bool relu_active(acc_t v) {
  return !(v <= acc_t(0));
}

// Residual epilogue of the Adaptive Context Module:
//   u = y*scale + shift (BatchNorm as an affine map), out = relu(relu(u) + r).
template <typename acc_t>
FASTCTX_HOST_DEVICE acc_t residual_relu(acc_t y, acc_t r, acc_t scale, acc_t shift) {
  return relu(relu(y * scale + shift) + r);
}

// Gradient of residual_relu. `active` is relu_active(out) (the forward's saved
// bit); the inner one is recomputed from y (relu_active(u) == relu_active(relu(u))).
// Returns d/du (to be scaled by `scale` for dy and accumulated for dscale/dshift)
// and d/dr. A blocked gradient is 0 even where it would be NaN or inf, as in
// torch; the caller's products (d/du * scale, d/du * y) still create NaN from a
// non-finite scale or y, as autograd's do.
template <typename acc_t>
FASTCTX_HOST_DEVICE void residual_relu_grad(
    acc_t grad, acc_t y, bool active, acc_t scale, acc_t shift, acc_t* grad_u, acc_t* grad_r) {
  const acc_t g = active ? grad : acc_t(0);
  *grad_r = g;
  *grad_u = relu_active(y * scale + shift) ? g : acc_t(0);
}

}  // namespace fastctx
