// CUDA backend of window_attention, host side: the checks that keep the
// kernels' memory accesses in bounds, workspace allocation and launch. Device
// code: window_attention_kernel.cuh; launch sizes: window_attention_launch.h.
// fp32, fp16 and bf16 data (fp32 accumulation), the dtypes
// fastctx/ops/window_attention.py sends to this backend.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/host.h"
#include "cuda/window_attention_kernel.cuh"
#include "cuda/window_attention_launch.h"

namespace fastctx {
namespace {

struct Dims {
  int64_t B, H, W, C, heads, Wh, Ww, sh, sw;
};

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), op, ": expected a contiguous ", dim, "-D ", name, ", got shape ",
              t.sizes(), " and strides ", t.strides());
}

// The checks the kernels' memory accesses rely on; fastctx/ops validates user input before.
Dims check_inputs(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                  const std::optional<at::Tensor>& pad_qkv, int64_t heads, at::IntArrayRef window,
                  at::IntArrayRef shift, const char* op) {
  TORCH_CHECK(qkv.is_cuda(), op, ": expected qkv to be a CUDA tensor, got one on ", qkv.device());
  const at::ScalarType dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected qkv of dtype float32, float16 or bfloat16, got ", dtype);
  check_tensor(qkv, "qkv", 4, qkv, op);
  TORCH_CHECK(window.size() == 2 && shift.size() == 2, op, ": expected window and shift pairs, got ", window,
              " and ", shift);
  TORCH_CHECK(window[0] >= 1 && window[1] >= 1 && shift[0] >= 0 && shift[1] >= 0 && shift[0] < window[0] &&
                  shift[1] < window[1],
              op, ": expected window >= 1 and 0 <= shift < window, got window ", window, " and shift ", shift);
  Dims d{};
  d.B = qkv.size(0);
  d.H = qkv.size(1);
  d.W = qkv.size(2);
  const int64_t channels3 = qkv.size(3);
  TORCH_CHECK(heads >= 1 && channels3 > 0 && channels3 % 3 == 0 && (channels3 / 3) % heads == 0, op,
              ": expected qkv's last dimension 3C with C divisible by heads = ", heads, ", got ", channels3);
  TORCH_CHECK(d.B >= 1 && d.H >= 1 && d.W >= 1, op, ": expected B, H, W >= 1, got qkv of shape ", qkv.sizes());
  d.C = channels3 / 3;
  d.heads = heads;
  d.Wh = window[0];
  d.Ww = window[1];
  d.sh = shift[0];
  d.sw = shift[1];
  const int64_t entries = (2 * d.Wh - 1) * (2 * d.Ww - 1);
  if (bias_table.has_value()) {
    check_tensor(*bias_table, "bias_table", 2, qkv, op);
    TORCH_CHECK(bias_table->size(0) == entries && bias_table->size(1) == heads, op,
                ": expected bias_table [(2Wh-1)(2Ww-1), heads] = [", entries, ", ", heads, "], got ",
                bias_table->sizes());
  }
  if (pad_qkv.has_value()) {
    check_tensor(*pad_qkv, "pad_qkv", 1, qkv, op);
    TORCH_CHECK(pad_qkv->size(0) == channels3, op, ": expected pad_qkv [3C] = [", channels3, "], got ",
                pad_qkv->sizes());
  }
  return d;
}

bool aligned(const std::optional<at::Tensor>& t) { return !t.has_value() || is_aligned16(t->data_ptr()); }

WindowAttentionPlan plan_for(const Dims& d, bool has_table, bool has_pad, bool aligned16, const char* op) {
  WindowAttentionPlan plan = window_attention_plan(d.B, d.H, d.W, d.C, d.heads, d.Wh, d.Ww, d.sh, d.sw, has_table,
                                                   has_pad, sizeof(float), aligned16);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  return plan;
}

// The shared memory of a launch depends on the window and head_dim, so the
// kernel's limit is raised to the device's maximum once and each launch checked.
template <auto kKernel>
void check_smem(int64_t bytes, const WindowAttentionPlan& plan, const char* op) {
  require_dynamic_smem<kKernel>(bytes, int64_t(1) << 30, op,
                                "a window of " + std::to_string(plan.N) + " tokens with head_dim " +
                                    std::to_string(plan.d),
                                "use the triton, cpu or reference backend for this window size on this GPU");
}

template <typename scalar_t, typename acc_t>
WindowAttentionParams<scalar_t, acc_t> params(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                                              const std::optional<at::Tensor>& pad_qkv, double scale,
                                              const WindowAttentionPlan& plan) {
  return window_attention_params<WindowAttentionParams<scalar_t, acc_t>>(
      plan, qkv.data_ptr<scalar_t>(), bias_table.has_value() ? bias_table->data_ptr<scalar_t>() : nullptr,
      pad_qkv.has_value() ? pad_qkv->data_ptr<scalar_t>() : nullptr, scale);
}

template <typename scalar_t>
at::Tensor fwd_impl(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                    const std::optional<at::Tensor>& pad_qkv, double scale, const Dims& d, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kFwd = window_attention_fwd_kernel<scalar_t, acc_t>;
  at::Tensor out = at::empty({d.B, d.H, d.W, d.C}, qkv.options());
  const bool aligned16 = is_aligned16(qkv.data_ptr()) && is_aligned16(out.data_ptr()) && aligned(pad_qkv);
  const WindowAttentionPlan plan = plan_for(d, bias_table.has_value(), pad_qkv.has_value(), aligned16, op);
  check_smem<kFwd>(plan.fwd_smem_bytes, plan, op);
  WindowAttentionParams<scalar_t, acc_t> p = params<scalar_t, acc_t>(qkv, bias_table, pad_qkv, scale, plan);
  p.out = out.data_ptr<scalar_t>();
  kFwd<<<to_dim3(plan.fwd_grid), kThreads, plan.fwd_smem_bytes, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& grad, const at::Tensor& qkv,
                                                        const std::optional<at::Tensor>& bias_table,
                                                        const std::optional<at::Tensor>& pad_qkv, double scale,
                                                        const Dims& d, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kBwd = window_attention_bwd_kernel<scalar_t, acc_t>;
  at::Tensor grad_qkv = at::empty_like(qkv);
  at::Tensor grad_table = bias_table.has_value() ? at::empty_like(*bias_table) : qkv.new_empty({0});
  at::Tensor grad_pad = pad_qkv.has_value() ? at::empty_like(*pad_qkv) : qkv.new_empty({0});
  const bool aligned16 = is_aligned16(qkv.data_ptr()) && is_aligned16(grad.data_ptr()) &&
                         is_aligned16(grad_qkv.data_ptr()) && aligned(pad_qkv);
  const WindowAttentionPlan plan = plan_for(d, bias_table.has_value(), pad_qkv.has_value(), aligned16, op);
  check_smem<kBwd>(plan.bwd_smem_bytes, plan, op);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_options = qkv.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor kv = at::empty({plan.kv_elems}, acc_options);
  at::Tensor partial = at::empty({plan.partial_elems}, acc_options);
  WindowAttentionParams<scalar_t, acc_t> p = params<scalar_t, acc_t>(qkv, bias_table, pad_qkv, scale, plan);
  p.grad = grad.data_ptr<scalar_t>();
  p.grad_qkv = grad_qkv.data_ptr<scalar_t>();
  p.kv = kv.data_ptr<acc_t>();
  p.partial = plan.partial_elems > 0 ? partial.data_ptr<acc_t>() : nullptr;
  // Chunks of windows share the dK/dV workspace, one launch after the other on the stream.
  for (int64_t w0 = 0; w0 < plan.windows; w0 += plan.chunk_windows) {
    p.window_begin = w0;
    kBwd<<<to_dim3(plan.bwd_grid(w0)), kThreads, plan.bwd_smem_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (plan.slot > 0) {
    window_attention_sum_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_grid), kThreads, 0, stream>>>(
        p.partial, bias_table.has_value() ? grad_table.data_ptr<scalar_t>() : nullptr,
        pad_qkv.has_value() ? grad_pad.data_ptr<scalar_t>() : nullptr, plan.windows, plan.heads, plan.slot,
        plan.table_slot, plan.d, plan.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_qkv, grad_table, grad_pad};
}

template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "window_attention (CUDA): no kernels for dtype ", dtype);
  }
}

at::Tensor window_attention_fwd_cuda(const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                                     const std::optional<at::Tensor>& pad_qkv, int64_t heads, at::IntArrayRef window,
                                     at::IntArrayRef shift, double scale) {
  constexpr const char* op = "window_attention_fwd (CUDA)";
  const Dims d = check_inputs(qkv, bias_table, pad_qkv, heads, window, shift, op);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor out;
  dispatch(qkv.scalar_type(), [&](auto t) { out = fwd_impl<decltype(t)>(qkv, bias_table, pad_qkv, scale, d, op); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& pad_qkv, int64_t heads, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  constexpr const char* op = "window_attention_bwd (CUDA)";
  const Dims d = check_inputs(qkv, bias_table, pad_qkv, heads, window, shift, op);
  check_tensor(grad, "grad", 4, qkv, op);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({d.B, d.H, d.W, d.C}), op, ": expected grad of shape [B, H, W, C] = ",
              at::IntArrayRef({d.B, d.H, d.W, d.C}), ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(qkv.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  dispatch(qkv.scalar_type(), [&](auto t) {
    grads = bwd_impl<decltype(t)>(grad, qkv, bias_table, pad_qkv, scale, d, op);
  });
  return grads;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("window_attention_fwd", &fastctx::window_attention_fwd_cuda);
  m.impl("window_attention_bwd", &fastctx::window_attention_bwd_cuda);
}
