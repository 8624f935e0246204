// CUDA backend of upsample_add, host side: the checks that keep the kernels'
// memory accesses in bounds, allocation and launch. Device code:
// upsample_add_kernel.cuh; launch geometry: upsample_add_launch.h.
// grad_residual is the incoming gradient itself (the op's autograd returns
// it), so the backward has one kernel, grad_tokens.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

at::Tensor upsample_add_fwd_cuda(const at::Tensor& tokens, const at::Tensor& residual) {
  constexpr const char* op = "upsample_add_fwd (CUDA)";
  check_data(tokens, "tokens", "[B, h, w, C]", op);
  check_data(residual, "residual", "[B, H, W, C]", op);
  TORCH_CHECK(tokens.device() == residual.device(), op, ": expected tokens on residual's device ",
              residual.device(), ", got ", tokens.device());
  TORCH_CHECK(tokens.scalar_type() == residual.scalar_type(), op, ": expected tokens of residual's dtype ",
              residual.scalar_type(), ", got ", tokens.scalar_type());
  TORCH_CHECK(tokens.size(0) == residual.size(0) && tokens.size(3) == residual.size(3), op,
              ": expected tokens [B, h, w, C] and residual [B, H, W, C] with the same B and C, got ", tokens.sizes(),
              " and ", residual.sizes());
  const int64_t B = residual.size(0), H = residual.size(1), W = residual.size(2), C = residual.size(3);
  const int64_t h = tokens.size(1), w = tokens.size(2);
  TORCH_CHECK(h >= 1 && w >= 1, op, ": expected tokens with h, w >= 1, got ", tokens.sizes());
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

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("upsample_add_fwd", &fastctx::upsample_add_fwd_cuda);
  m.impl("upsample_add_bwd", &fastctx::upsample_add_bwd_cuda);
}
