// CUDA backend of gla_context, host side: the checks that keep the kernels'
// memory accesses in bounds, allocation, streams and launch. Device code:
// gla_context_kernel.cuh; launch geometry: gla_context_launch.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/gla_context_kernel.cuh"
#include "cuda/gla_context_launch.h"
#include "cuda/host.h"

namespace fastctx {
namespace {

void check_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

// The per-group channel count C, after checking every tensor against the
// shapes the kernels index with.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& pooled, at::IntArrayRef group_sizes, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x to be a CUDA tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected float32, float16 or bfloat16 data, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape [B, G*C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": expected x to be contiguous");
  const int64_t G = static_cast<int64_t>(group_sizes.size());
  TORCH_CHECK(G >= 1, op, ": expected at least one group");
  TORCH_CHECK(x.size(1) % G == 0 && x.size(1) > 0, op, ": expected x's channel count ", x.size(1),
              " to be a positive multiple of the ", G, " groups");
  const int64_t B = x.size(0), C = x.size(1) / G;
  int64_t S_tot = 0;
  for (const int64_t s : group_sizes) S_tot += s;
  check_tensor(weight, x, op, "weight", {S_tot, C});
  check_tensor(bias, x, op, "bias", {B, S_tot});
  check_tensor(pooled, x, op, "pooled", {B, C, S_tot});
  return C;
}

// Raises the kernel's shared-memory limit (once) and checks the launch fits it.
template <auto kKernel>
void check_smem(const GlaLaunch& l, bool backward, int acc_size, const char* op) {
  require_dynamic_smem<kKernel>(l.smem_bytes, gla_max_smem_bytes(backward, l.kj, acc_size), op,
                                "a group of " + std::to_string(l.table.size[0]) + " rows",
                                "use smaller groups, or float32 instead of float64");
}

// Calls launch(i, stream) for i < n: launch 0 on the current stream, the
// others on pool streams forked from it and joined back before returning, so
// the launches overlap on the GPU as a single grid would, and everything
// enqueued later on the current stream is ordered after all of them.
template <typename F>
void run_concurrently(size_t n, const F& launch) {
  const c10::cuda::CUDAStream main = at::cuda::getCurrentCUDAStream();
  if (n == 0) return;
  c10::cuda::CUDAEvent fork;
  if (n > 1) fork.record(main);
  launch(size_t{0}, main);
  std::vector<c10::cuda::CUDAEvent> joins(n - 1);
  for (size_t i = 1; i < n; ++i) {
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
    fork.block(side);
    launch(i, side);
    joins[i - 1].record(side);
  }
  for (auto& e : joins) e.block(main);
}

at::Tensor gla_context_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& pooled, at::IntArrayRef group_sizes) {
  constexpr const char* op = "gla_context_fwd (CUDA)";
  const int64_t C = check_inputs(x, weight, bias, pooled, group_sizes, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor z = at::empty_like(x);
  const int64_t G = static_cast<int64_t>(group_sizes.size()), B = x.size(0), N = x.size(2) * x.size(3);
  const int acc_size = static_cast<int>(at::elementSize(at::toOpMathType(x.scalar_type())));
  const GlaPlan plan = gla_context_plan(false, group_sizes.data(), G, B, C, N, acc_size,
                                        is_aligned16(x.data_ptr()) && is_aligned16(z.data_ptr()), sm_count());
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  if (z.numel() == 0) return z;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gla_context_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GlaFwdParams<scalar_t> p;
    p.x = x.data_ptr<scalar_t>();
    p.weight = weight.data_ptr<scalar_t>();
    p.bias = bias.data_ptr<scalar_t>();
    p.pooled = pooled.data_ptr<scalar_t>();
    p.z = z.data_ptr<scalar_t>();
    p.N = N;
    p.G = static_cast<int>(G);
    p.C = static_cast<int>(C);
    p.S_tot = static_cast<int>(plan.S_tot);
    p.vec = plan.vec;
    run_concurrently(plan.launches.size(), [&](size_t i, cudaStream_t stream) {
      const GlaLaunch& l = plan.launches[i];
      GlaFwdParams<scalar_t> lp = p;
      lp.groups = l.table;
      lp.rows_alloc = l.rows_alloc;
      gla_dispatch_width(l.kj, [&](auto kj) {
        constexpr auto kKernel = gla_fwd_kernel<scalar_t, acc_t, decltype(kj)::value>;
        check_smem<kKernel>(l, false, acc_size, op);
        kKernel<<<to_dim3(l.grid), kThreads, l.smem_bytes, stream>>>(lp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gla_context_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& pooled, at::IntArrayRef group_sizes) {
  constexpr const char* op = "gla_context_bwd (CUDA)";
  const int64_t C = check_inputs(x, weight, bias, pooled, group_sizes, op);
  check_tensor(grad, x, op, "grad", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty_like(bias);
  at::Tensor grad_pooled = at::empty_like(pooled);
  const int64_t G = static_cast<int64_t>(group_sizes.size()), B = x.size(0), N = x.size(2) * x.size(3);
  const int acc_size = static_cast<int>(at::elementSize(at::toOpMathType(x.scalar_type())));
  const bool aligned =
      is_aligned16(x.data_ptr()) && is_aligned16(grad.data_ptr()) && is_aligned16(grad_x.data_ptr());
  const GlaPlan plan = gla_context_plan(true, group_sizes.data(), G, B, C, N, acc_size, aligned, sm_count());
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  if (x.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    grad_pooled.zero_();
    return {grad_x, grad_weight, grad_bias, grad_pooled};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gla_context_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor part = at::empty({2 * plan.part_elems + plan.part_bias_elems}, acc_opts);
    GlaBwdParams<scalar_t, acc_t> p;
    p.grad = grad.data_ptr<scalar_t>();
    p.x = x.data_ptr<scalar_t>();
    p.weight = weight.data_ptr<scalar_t>();
    p.bias = bias.data_ptr<scalar_t>();
    p.pooled = pooled.data_ptr<scalar_t>();
    p.grad_x = grad_x.data_ptr<scalar_t>();
    p.part_w = part.data_ptr<acc_t>();
    p.part_p = p.part_w + plan.part_elems;
    p.part_b = p.part_p + plan.part_elems;
    p.N = N;
    p.tiles = plan.tiles;
    p.nblk = static_cast<int>(plan.nblk);
    p.G = static_cast<int>(G);
    p.C = static_cast<int>(C);
    p.S_tot = static_cast<int>(plan.S_tot);
    p.vec = plan.vec;
    run_concurrently(plan.launches.size(), [&](size_t i, cudaStream_t stream) {
      const GlaLaunch& l = plan.launches[i];
      GlaBwdParams<scalar_t, acc_t> lp = p;
      lp.groups = l.table;
      lp.rows_alloc = l.rows_alloc;
      gla_dispatch_width(l.kj, [&](auto kj) {
        constexpr auto kKernel = gla_bwd_kernel<scalar_t, acc_t, decltype(kj)::value>;
        check_smem<kKernel>(l, true, acc_size, op);
        kKernel<<<to_dim3(l.grid), kThreads, l.smem_bytes, stream>>>(lp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });

    // All launches have joined the current stream; every (b, nb, k, c) of
    // the partials has been written by exactly one block.
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t wc = plan.S_tot * C;
    // grad_weight[k][c]: sum over every (b, nb) slice.
    sum_partials_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_weight_grid), kThreads, 0, stream>>>(
        p.part_w, grad_weight.data_ptr<scalar_t>(), B * plan.nblk, wc, plan.S_tot, C, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_pooled[b][c][k]: sum over nb; the [k][c] slices are written transposed.
    sum_partials_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_pooled_grid), kThreads, 0, stream>>>(
        p.part_p, grad_pooled.data_ptr<scalar_t>(), plan.nblk, wc, plan.S_tot, C, true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_bias[b][k]: sum over nb.
    sum_partials_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_bias_grid), kThreads, 0, stream>>>(
        p.part_b, grad_bias.data_ptr<scalar_t>(), plan.nblk, plan.S_tot, 1, plan.S_tot, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight, grad_bias, grad_pooled};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("gla_context_fwd", &fastctx::gla_context_fwd_cuda);
  m.impl("gla_context_bwd", &fastctx::gla_context_bwd_cuda);
}
