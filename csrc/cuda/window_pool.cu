// CUDA backend of window_pool, host side: the checks that keep the kernels'
// memory accesses in bounds, allocation and launch. Device code:
// window_pool_kernel.cuh; launch geometry: window_pool_launch.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "cuda/host.h"
#include "cuda/window_pool_kernel.cuh"
#include "cuda/window_pool_launch.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const char* name, int64_t dim, const char* shape, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " to be a CUDA tensor, got one on ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": expected ", name,
              " of dtype float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " of shape ", shape, " (channels last), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous (channels last)");
}

std::pair<int64_t, int64_t> window_of(at::IntArrayRef window, const char* op) {
  TORCH_CHECK(window.size() == 2 && window[0] >= 1 && window[1] >= 1, op, ": expected window [Wh, Ww] >= 1, got ",
              window);
  return {window[0], window[1]};
}

at::Tensor window_pool_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& pos_opt,
                                at::IntArrayRef window) {
  constexpr const char* op = "window_pool_fwd (CUDA)";
  check_data(x, "x", 4, "[B, Hp, Wp, C]", op);
  const auto [Wh, Ww] = window_of(window, op);
  const int64_t B = x.size(0), Hp = x.size(1), Wp = x.size(2), C = x.size(3);
  TORCH_CHECK(Hp % Wh == 0 && Wp % Ww == 0, op, ": expected x's H, W = ", Hp, ", ", Wp,
              " to be multiples of the window ", window);
  const int64_t Hg = Hp / Wh, Wg = Wp / Ww;
  const bool has_pos = pos_opt.has_value() && pos_opt->defined();
  if (has_pos) {
    const at::Tensor& pos = *pos_opt;
    TORCH_CHECK(pos.device() == x.device() && pos.scalar_type() == x.scalar_type() && pos.is_contiguous(), op,
                ": expected pos to be a contiguous tensor of x's dtype ", x.scalar_type(), " on ", x.device(),
                ", got ", pos.scalar_type(), " on ", pos.device());
    TORCH_CHECK(pos.dim() == 3 && pos.size(0) == Hg && pos.size(1) == Wg && pos.size(2) == C, op,
                ": expected pos of shape [Hg, Wg, C] = [", Hg, ", ", Wg, ", ", C, "], got ", pos.sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, Hg, Wg, C}, x.options());
  if (out.numel() == 0) return out;

  const bool aligned = is_aligned16(x.data_ptr()) && is_aligned16(out.data_ptr()) &&
                       (!has_pos || is_aligned16(pos_opt->data_ptr()));
  const WindowPoolPlan plan = window_pool_plan("window_pool_fwd", B * Hg * Wg, B * Hp * Wp, C,
                                               static_cast<int>(x.element_size()), aligned, B);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* kernel = plan.vec_width > 1 ? &window_pool_fwd_kernel<scalar_t, acc_t, kVecWidth<scalar_t>>
                                      : &window_pool_fwd_kernel<scalar_t, acc_t, 1>;
    kernel<<<to_dim3(plan.grid), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), has_pos ? pos_opt->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        static_cast<int>(plan.items), static_cast<int>(Hg), static_cast<int>(Wg), static_cast<int>(Wh),
        static_cast<int>(Ww), static_cast<int>(C), window_pool_inv_count<acc_t>(Wh, Ww), plan.lanes, plan.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_pool_bwd_cuda(const at::Tensor& grad, at::IntArrayRef window,
                                                        bool pos_grad) {
  constexpr const char* op = "window_pool_bwd (CUDA)";
  check_data(grad, "grad", 4, "[B, Hg, Wg, C]", op);
  const auto [Wh, Ww] = window_of(window, op);
  const int64_t B = grad.size(0), Hg = grad.size(1), Wg = grad.size(2), C = grad.size(3);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_x = at::empty({B, Hg * Wh, Wg * Ww, C}, grad.options());
  at::Tensor grad_pos = pos_grad ? at::empty({Hg, Wg, C}, grad.options()) : at::empty({0}, grad.options());
  if (grad.numel() == 0) {
    grad_x.zero_();
    grad_pos.zero_();  // B == 0: an empty sum
    return {grad_x, grad_pos};
  }

  const auto stream = at::cuda::getCurrentCUDAStream();
  const int elem = static_cast<int>(grad.element_size());
  const int64_t pixels = B * Hg * Wh * Wg * Ww;
  const WindowPoolPlan plan = window_pool_plan("window_pool_bwd", pixels, pixels, C, elem,
                                               is_aligned16(grad.data_ptr()) && is_aligned16(grad_x.data_ptr()), B);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  WindowPoolPlan pos_plan;
  if (pos_grad) {
    pos_plan = window_pool_plan("window_pool_pos_grad", Hg * Wg, pixels, C, elem,
                                is_aligned16(grad.data_ptr()) && is_aligned16(grad_pos.data_ptr()), B);
    TORCH_CHECK(pos_plan.error.empty(), op, ": ", pos_plan.error);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "window_pool_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* grad_x_kernel = plan.vec_width > 1 ? &window_pool_bwd_kernel<scalar_t, acc_t, kVecWidth<scalar_t>>
                                             : &window_pool_bwd_kernel<scalar_t, acc_t, 1>;
    grad_x_kernel<<<to_dim3(plan.grid), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), static_cast<int>(plan.items), static_cast<int>(Hg),
        static_cast<int>(Wg), static_cast<int>(Wh), static_cast<int>(Ww), static_cast<int>(C),
        window_pool_inv_count<acc_t>(Wh, Ww), plan.lanes, plan.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (pos_grad) {
      auto* pos_kernel = pos_plan.vec_width > 1 ? &window_pool_pos_grad_kernel<scalar_t, acc_t, kVecWidth<scalar_t>>
                                                : &window_pool_pos_grad_kernel<scalar_t, acc_t, 1>;
      pos_kernel<<<to_dim3(pos_plan.grid), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad_pos.data_ptr<scalar_t>(), static_cast<int>(B),
          static_cast<int>(pos_plan.items), static_cast<int>(C), pos_plan.lanes, pos_plan.rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_pos};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("window_pool_fwd", &fastctx::window_pool_fwd_cuda);
  m.impl("window_pool_bwd", &fastctx::window_pool_bwd_cuda);
}
