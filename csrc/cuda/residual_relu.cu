// CUDA backend of residual_relu, host side: the checks that keep the kernels'
// memory accesses in bounds, allocation and launch. Device code:
// residual_relu_kernel.cuh; launch geometry: residual_relu_launch.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/residual_relu_kernel.cuh"
#include "cuda/residual_relu_launch.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": expected ", name, " of shape ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

void check_acc(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  const auto acc = at::toOpMathType(ref.scalar_type());
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected ", name, " on ", ref.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, " (the accumulation type of ",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(1), op, ": expected ", name, " of shape [C] = [",
              ref.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

void check_input(const at::Tensor& y, const char* op) {
  TORCH_CHECK(y.is_cuda(), op, ": expected CUDA tensors, got y on ", y.device());
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), op, ": expected float32, float16 or bfloat16 data, got ",
              y.scalar_type());
  TORCH_CHECK(y.dim() == 4, op, ": expected y of shape [B, C, H, W], got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), op, ": expected y to be contiguous");
}

std::tuple<at::Tensor, at::Tensor> residual_relu_fwd_cuda(const at::Tensor& y, const at::Tensor& residual,
                                                          const at::Tensor& scale, const at::Tensor& shift,
                                                          bool save_mask) {
  constexpr const char* op = "residual_relu_fwd (CUDA)";
  check_input(y, op);
  check_data(residual, y, op, "residual");
  check_acc(scale, y, op, "scale");
  check_acc(shift, y, op, "shift");
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t B = y.size(0), C = y.size(1), N = y.size(2) * y.size(3);
  at::Tensor out = at::empty_like(y);
  at::Tensor mask = save_mask ? at::empty({B, C, tile_ceil_div(N, 8)}, y.options().dtype(at::kByte))
                              : at::empty({0}, y.options().dtype(at::kByte));
  if (y.numel() == 0) return {out, mask};

  const bool aligned = is_aligned16(y.data_ptr()) && is_aligned16(residual.data_ptr()) &&
                       is_aligned16(out.data_ptr());
  const ResidualReluPlan plan = residual_relu_plan(B, C, N, static_cast<int>(y.element_size()), aligned);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_relu_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    residual_relu_fwd_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(plan.grid.x), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            y.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), scale.data_ptr<acc_t>(),
            shift.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), save_mask ? mask.data_ptr<uint8_t>() : nullptr, C,
            N, plan.chunks, plan.vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_relu_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& scale,
    const at::Tensor& shift) {
  constexpr const char* op = "residual_relu_bwd (CUDA)";
  check_input(y, op);
  check_data(grad, y, op, "grad");
  const int64_t B = y.size(0), C = y.size(1), N = y.size(2) * y.size(3);
  TORCH_CHECK(mask.is_cuda() && mask.device() == y.device() && mask.scalar_type() == at::kByte &&
                  mask.is_contiguous(),
              op, ": expected mask to be the forward's contiguous uint8 tensor on ", y.device(), ", got ",
              mask.scalar_type(), " on ", mask.device());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == C && mask.size(2) == tile_ceil_div(N, 8),
              op, ": expected mask of shape [B, C, ceil(H*W/8)] = [", B, ", ", C, ", ", tile_ceil_div(N, 8),
              "], got ", mask.sizes());
  check_acc(scale, y, op, "scale");
  check_acc(shift, y, op, "shift");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_res = at::empty_like(y);
  at::Tensor grad_scale = at::zeros_like(scale);
  at::Tensor grad_shift = at::zeros_like(shift);
  if (y.numel() == 0) return {grad_y, grad_res, grad_scale, grad_shift};

  const bool aligned = is_aligned16(grad.data_ptr()) && is_aligned16(y.data_ptr()) &&
                       is_aligned16(grad_y.data_ptr()) && is_aligned16(grad_res.data_ptr());
  const ResidualReluPlan plan = residual_relu_plan(B, C, N, static_cast<int>(y.element_size()), aligned);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_relu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor part = at::empty({2, C, plan.partials}, scale.options());
    acc_t* part_scale = part.data_ptr<acc_t>();
    acc_t* part_shift = part_scale + C * plan.partials;
    const auto stream = at::cuda::getCurrentCUDAStream();
    residual_relu_bwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(plan.grid.x), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), scale.data_ptr<acc_t>(),
        shift.data_ptr<acc_t>(), grad_y.data_ptr<scalar_t>(), grad_res.data_ptr<scalar_t>(), part_scale,
        part_shift, B, C, N, plan.chunks, plan.vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_sum_kernel<acc_t><<<static_cast<unsigned>(plan.sum_grid.x), kThreads, 0, stream>>>(
        part_scale, part_shift, grad_scale.data_ptr<acc_t>(), grad_shift.data_ptr<acc_t>(), C, plan.partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_y, grad_res, grad_scale, grad_shift};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("residual_relu_fwd", &fastctx::residual_relu_fwd_cuda);
  m.impl("residual_relu_bwd", &fastctx::residual_relu_bwd_cuda);
}
