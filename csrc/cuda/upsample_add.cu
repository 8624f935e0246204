// CUDA backend of upsample_add, host side: the checks that keep the kernels'
// memory accesses in bounds, allocation and launch. Device code:
// upsample_add_kernel.cuh; launch geometry: upsample_add_launch.h.
// grad_residual is the incoming gradient itself (the op's autograd returns
// it), so the backward has one kernel, grad_tokens.
//
// upsample_add_layer_norm: the forward is one kernel (out, normed, mean,
// rstd); the backward one kernel for grad_sum (and the blocks' partials of
// grad_weight / grad_bias when affine_grads), then sum_partials_kernel per
// parameter, reducing the partials in block order (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda/host.h"
#include "cuda/upsample_add_kernel.cuh"
#include "cuda/upsample_add_launch.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const char* name, const char* shape, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " to be a CUDA tensor, got one on ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": expected ", name,
              " of dtype float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " of shape ", shape, " (channels last), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous (channels last)");
}

// tokens [B, h, w, C] and residual [B, H, W, C]: CUDA data of one dtype and device, the same B and C, h, w >= 1.
void check_pair(const at::Tensor& tokens, const at::Tensor& residual, const char* op) {
  check_data(tokens, "tokens", "[B, h, w, C]", op);
  check_data(residual, "residual", "[B, H, W, C]", op);
  TORCH_CHECK(tokens.device() == residual.device(), op, ": expected tokens on residual's device ",
              residual.device(), ", got ", tokens.device());
  TORCH_CHECK(tokens.scalar_type() == residual.scalar_type(), op, ": expected tokens of residual's dtype ",
              residual.scalar_type(), ", got ", tokens.scalar_type());
  TORCH_CHECK(tokens.size(0) == residual.size(0) && tokens.size(3) == residual.size(3), op,
              ": expected tokens [B, h, w, C] and residual [B, H, W, C] with the same B and C, got ", tokens.sizes(),
              " and ", residual.sizes());
  TORCH_CHECK(tokens.size(1) >= 1 && tokens.size(2) >= 1, op, ": expected tokens with h, w >= 1, got ",
              tokens.sizes());
}

at::Tensor upsample_add_fwd_cuda(const at::Tensor& tokens, const at::Tensor& residual) {
  constexpr const char* op = "upsample_add_fwd (CUDA)";
  check_pair(tokens, residual, op);
  const int64_t B = residual.size(0), H = residual.size(1), W = residual.size(2), C = residual.size(3);
  const int64_t h = tokens.size(1), w = tokens.size(2);
  const c10::cuda::CUDAGuard guard(residual.device());
  at::Tensor out = at::empty_like(residual);
  if (out.numel() == 0) return out;

  const bool aligned = is_aligned16(tokens.data_ptr()) && is_aligned16(residual.data_ptr()) &&
                       is_aligned16(out.data_ptr());
  const UpsampleAddPlan plan = upsample_add_plan("upsample_add_fwd", false, B, h, w, H, W, C,
                                                 static_cast<int>(residual.element_size()), aligned);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "upsample_add_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    upsample_add_fwd_kernel<scalar_t, acc_t><<<to_dim3(plan.grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        tokens.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        static_cast<int>(plan.items), static_cast<int>(h), static_cast<int>(w), static_cast<int>(H),
        static_cast<int>(W), C, upsample_add_scale<acc_t>(h, H), upsample_add_scale<acc_t>(w, W), plan.lanes,
        plan.rows, plan.vec_width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor upsample_add_bwd_cuda(const at::Tensor& grad, int64_t height, int64_t width) {
  constexpr const char* op = "upsample_add_bwd (CUDA)";
  check_data(grad, "grad", "[B, H, W, C]", op);
  TORCH_CHECK(height >= 1 && width >= 1, op, ": expected a token grid of at least 1x1, got ", height, "x", width);
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), C = grad.size(3);
  const int64_t h = height, w = width;
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_tokens = at::empty({B, h, w, C}, grad.options());
  if (grad_tokens.numel() == 0) return grad_tokens;
  if (grad.numel() == 0) return grad_tokens.zero_();  // H or W == 0: nothing touches a token

  const bool aligned = is_aligned16(grad.data_ptr()) && is_aligned16(grad_tokens.data_ptr());
  const UpsampleAddPlan plan = upsample_add_plan("upsample_add_bwd", true, B, h, w, H, W, C,
                                                 static_cast<int>(grad.element_size()), aligned);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "upsample_add_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    upsample_add_bwd_kernel<scalar_t, acc_t><<<to_dim3(plan.grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), grad_tokens.data_ptr<scalar_t>(), static_cast<int>(plan.items),
        static_cast<int>(h), static_cast<int>(w), static_cast<int>(H), static_cast<int>(W), C,
        upsample_add_scale<acc_t>(h, H), upsample_add_scale<acc_t>(w, W), plan.lanes, plan.rows, plan.vec_width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_tokens;
}

// A [C] parameter of the layer norm (weight or bias): absent, or T[C] on the data's device.
void check_param(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& data, int64_t C,
                 const char* op) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == data.device(), op, ": expected ", name, " on ", data.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == data.scalar_type(), op, ": expected ", name, " of the data's dtype ",
              data.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": expected ", name, " of shape [C] = [", C, "], got ",
              t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": expected ", name, " to be contiguous");
}

const void* param_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

// mean or rstd of the forward: A[B, H, W] on the data's device (A: float32, float64 for float64 data).
void check_stat(const at::Tensor& t, const char* name, const at::Tensor& data, const char* op) {
  const auto acc = at::toOpMathType(data.scalar_type());
  TORCH_CHECK(t.device() == data.device(), op, ": expected ", name, " on ", data.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, " (the forward's), got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == data.size(0) && t.size(1) == data.size(1) && t.size(2) == data.size(2),
              op, ": expected ", name, " of shape [B, H, W] = ", data.sizes().slice(0, 3), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_add_layer_norm_fwd_cuda(
    const at::Tensor& tokens, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "upsample_add_layer_norm_fwd (CUDA)";
  check_pair(tokens, residual, op);
  const int64_t B = residual.size(0), H = residual.size(1), W = residual.size(2), C = residual.size(3);
  const int64_t h = tokens.size(1), w = tokens.size(2);
  check_param(weight, "weight", residual, C, op);
  check_param(bias, "bias", residual, C, op);
  const c10::cuda::CUDAGuard guard(residual.device());
  at::Tensor out = at::empty_like(residual);
  at::Tensor normed = at::empty_like(residual);
  const auto stat_options = residual.options().dtype(at::toOpMathType(residual.scalar_type()));
  at::Tensor mean = at::empty({B, H, W}, stat_options);
  at::Tensor rstd = at::empty({B, H, W}, stat_options);
  if (mean.numel() == 0) return {out, normed, mean, rstd};
  if (C == 0) {  // the op answers this case itself; the kernel's maths would give 0 / 0
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, normed, mean, rstd};
  }

  const bool aligned = is_aligned16(tokens.data_ptr()) && is_aligned16(residual.data_ptr()) &&
                       is_aligned16(out.data_ptr()) && is_aligned16(normed.data_ptr()) &&
                       is_aligned16(param_ptr(weight)) && is_aligned16(param_ptr(bias));
  const UpsampleLnPlan plan = upsample_add_layer_norm_plan(
      "upsample_add_layer_norm_fwd", false, B, h * w, H * W, C, static_cast<int>(residual.element_size()),
      static_cast<int>(mean.element_size()), aligned);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "upsample_add_layer_norm_fwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* kernel = plan.cached ? &upsample_add_layer_norm_fwd_kernel<scalar_t, acc_t, true>
                               : &upsample_add_layer_norm_fwd_kernel<scalar_t, acc_t, false>;
    kernel<<<to_dim3(plan.fwd_grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            tokens.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
            static_cast<const scalar_t*>(param_ptr(weight)), static_cast<const scalar_t*>(param_ptr(bias)),
            out.data_ptr<scalar_t>(), normed.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
            static_cast<int>(plan.pixels), static_cast<int>(h), static_cast<int>(w), static_cast<int>(H),
            static_cast<int>(W), static_cast<int>(C), upsample_add_scale<acc_t>(h, H), upsample_add_scale<acc_t>(w, W),
            acc_t(1) / static_cast<acc_t>(C), static_cast<acc_t>(eps), plan.lanes, plan.rows, plan.chunks, plan.vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, normed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_add_layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& grad_normed, const at::Tensor& out, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight, bool affine_grads) {
  constexpr const char* op = "upsample_add_layer_norm_bwd (CUDA)";
  check_data(out, "out", "[B, H, W, C]", op);
  const auto check_like_out = [&](const at::Tensor& t, const char* name) {
    check_data(t, name, "[B, H, W, C]", op);
    TORCH_CHECK(t.device() == out.device(), op, ": expected ", name, " on out's device ", out.device(), ", got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == out.scalar_type(), op, ": expected ", name, " of out's dtype ", out.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == out.sizes(), op, ": expected ", name, " of out's shape ", out.sizes(), ", got ",
                t.sizes());
  };
  check_like_out(grad_out, "grad_out");
  check_like_out(grad_normed, "grad_normed");
  check_stat(mean, "mean", out, op);
  check_stat(rstd, "rstd", out, op);
  const int64_t B = out.size(0), H = out.size(1), W = out.size(2), C = out.size(3);
  check_param(weight, "weight", out, C, op);
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor grad_sum = at::empty_like(out);
  at::Tensor grad_weight = at::empty({affine_grads ? C : 0}, out.options());
  at::Tensor grad_bias = at::empty({affine_grads ? C : 0}, out.options());
  if (out.numel() == 0) {  // no pixels: the sums over them are 0 (C = 0: nothing to write)
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_sum, grad_weight, grad_bias};
  }

  const bool aligned = is_aligned16(grad_out.data_ptr()) && is_aligned16(grad_normed.data_ptr()) &&
                       is_aligned16(out.data_ptr()) && is_aligned16(grad_sum.data_ptr()) &&
                       is_aligned16(param_ptr(weight));
  const UpsampleLnPlan plan = upsample_add_layer_norm_plan("upsample_add_layer_norm_bwd", true, B, 0, H * W, C,
                                                           static_cast<int>(out.element_size()),
                                                           static_cast<int>(mean.element_size()), aligned);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_add_layer_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    // The blocks' partials of grad_weight and grad_bias, [2][nblk][C]: each block writes its whole slice.
    at::Tensor part = affine_grads ? at::empty({2, plan.bwd_grid.x, C}, mean.options()) : at::Tensor();
    acc_t* part_w = affine_grads ? part.data_ptr<acc_t>() : nullptr;
    acc_t* part_b = affine_grads ? part_w + plan.bwd_grid.x * C : nullptr;
    auto* kernel = plan.cached ? &upsample_add_layer_norm_bwd_kernel<scalar_t, acc_t, true>
                               : &upsample_add_layer_norm_bwd_kernel<scalar_t, acc_t, false>;
    kernel<<<to_dim3(plan.bwd_grid), kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), grad_normed.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), static_cast<const scalar_t*>(param_ptr(weight)),
        grad_sum.data_ptr<scalar_t>(), part_w, part_b, static_cast<int>(plan.pixels), static_cast<int>(C),
        static_cast<int>(plan.per_block), plan.lanes, plan.rows, plan.chunks, plan.vec,
        acc_t(1) / static_cast<acc_t>(C));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (affine_grads) {
      // In block order per column (sum_partials_kernel's fixed split): the bits depend on the shape only.
      sum_partials_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_grid), kThreads, 0, stream>>>(
          part_w, grad_weight.data_ptr<scalar_t>(), plan.bwd_grid.x, C, 1, C, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_grid), kThreads, 0, stream>>>(
          part_b, grad_bias.data_ptr<scalar_t>(), plan.bwd_grid.x, C, 1, C, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_sum, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("upsample_add_fwd", &fastctx::upsample_add_fwd_cuda);
  m.impl("upsample_add_bwd", &fastctx::upsample_add_bwd_cuda);
  m.impl("upsample_add_layer_norm_fwd", &fastctx::upsample_add_layer_norm_fwd_cuda);
  m.impl("upsample_add_layer_norm_bwd", &fastctx::upsample_add_layer_norm_bwd_cuda);
}
