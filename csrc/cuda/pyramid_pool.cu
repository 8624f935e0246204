// CUDA backend of pyramid_pool, host side: the checks that keep the kernels'
// memory accesses in bounds, allocation and launch. Device code:
// pyramid_pool_kernel.cuh; launch geometry: pyramid_pool_launch.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/pyramid_pool_kernel.cuh"
#include "cuda/pyramid_pool_launch.h"

namespace fastctx {
namespace {

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " to be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " to be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

// Launches kKernel with the plan's dynamic shared memory. Its limit is raised
// once per device to what the device allows: the scales, not the kernel,
// bound the size, so there is no smaller largest size to set it to.
template <auto kKernel, typename... Args>
void launch(const PyramidPoolPlan& plan, const char* op, Args... args) {
  const DynamicSmemLimit limit = dynamic_smem_limit<kKernel>(INT64_MAX);
  C10_CUDA_CHECK(limit.error);
  TORCH_CHECK(plan.smem_bytes <= limit.bytes, op, ": needs ", plan.smem_bytes,
              " bytes of shared memory for these scales and sizes, the device allows ", limit.bytes,
              " per block (use fewer or smaller scales)");
  kKernel<<<static_cast<unsigned>(plan.grid.x), kThreads, plan.smem_bytes, at::cuda::getCurrentCUDAStream()>>>(
      args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pyramid_pool_fwd_cuda(const at::Tensor& x, at::IntArrayRef scales) {
  constexpr const char* op = "pyramid_pool_fwd (CUDA)";
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape [B, C, H, W], got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int acc_size = static_cast<int>(at::elementSize(at::toOpMathType(x.scalar_type())));
  const PyramidPoolPlan plan =
      pyramid_pool_fwd_plan(scales.data(), static_cast<int64_t>(scales.size()), B, C, H, W, acc_size);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, C, plan.table.total_bins}, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(H >= 1 && W >= 1, op, ": expected H >= 1 and W >= 1, got ", x.sizes());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pyramid_pool_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<pyramid_pool_fwd_kernel<scalar_t, acc_t>>(plan, op, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                      plan.table, H, W, plan.tile_w, plan.tile_rows);
  });
  return out;
}

at::Tensor pyramid_pool_bwd_cuda(const at::Tensor& grad, at::IntArrayRef scales, int64_t height, int64_t width) {
  constexpr const char* op = "pyramid_pool_bwd (CUDA)";
  check_floating(grad, op, "grad");
  TORCH_CHECK(height >= 1 && width >= 1, op, ": expected height >= 1 and width >= 1, got ", height, ", ", width);
  TORCH_CHECK(grad.dim() == 3, op, ": expected grad of shape [B, C, sum(s*s)], got ", grad.sizes());
  const int64_t B = grad.size(0), C = grad.size(1), H = height, W = width;
  const PyramidPoolPlan plan =
      pyramid_pool_bwd_plan(scales.data(), static_cast<int64_t>(scales.size()), B, C, H, W,
                            static_cast<int>(at::elementSize(at::toOpMathType(grad.scalar_type()))));
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  TORCH_CHECK(grad.size(2) == plan.table.total_bins, op, ": expected grad of shape [B, C, sum(s*s)] = [B, C, ",
              plan.table.total_bins, "], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_x = at::empty({B, C, H, W}, grad.options());
  if (grad_x.numel() == 0) return grad_x;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pyramid_pool_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<pyramid_pool_bwd_kernel<scalar_t, acc_t>>(plan, op, grad.data_ptr<scalar_t>(),
                                                      grad_x.data_ptr<scalar_t>(), plan.table, H, W, plan.block_w,
                                                      plan.row_tiles, plan.col_tiles);
  });
  return grad_x;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("pyramid_pool_fwd", &fastctx::pyramid_pool_fwd_cuda);
  m.impl("pyramid_pool_bwd", &fastctx::pyramid_pool_bwd_cuda);
}
