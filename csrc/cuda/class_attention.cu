// CUDA backend of class_attention, host side: the checks that keep the
// kernels' memory accesses in bounds, workspace allocation and launch. Device
// code: class_attention_kernel.cuh; launch sizes: class_attention_launch.h.
// fp32, fp16 and bf16 data (fp32 accumulation and lse), the dtypes
// fastctx/ops/class_attention.py sends to this backend.
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

#include "cuda/class_attention_kernel.cuh"
#include "cuda/class_attention_launch.h"
#include "cuda/host.h"

namespace fastctx {
namespace {

// Sizes, and which form: query (with keys) or logits.
struct Dims {
  int64_t B, K, Cq, Cv, N, H, W;  // Cq = 0 in the logits form
  bool query_form;
};

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), op, ": expected a contiguous ", dim, "-D ", name, ", got shape ",
              t.sizes(), " and strides ", t.strides());
}

// The checks the kernels' memory accesses rely on; fastctx/ops validates user input before.
Dims check_inputs(const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& keys,
                  const at::Tensor& values, const std::optional<at::Tensor>& logits, const char* op) {
  TORCH_CHECK(values.is_cuda(), op, ": expected values to be a CUDA tensor, got one on ", values.device());
  const at::ScalarType dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected values of dtype float32, float16 or bfloat16, got ", dtype);
  check_tensor(values, "values", 3, values, op);
  TORCH_CHECK(query.has_value() != logits.has_value(), op, ": expected exactly one of query and logits");
  Dims d{};
  d.B = values.size(0);
  d.K = values.size(1);
  d.Cv = values.size(2);
  d.query_form = query.has_value();
  const at::Tensor& source = d.query_form ? *query : *logits;
  check_tensor(source, d.query_form ? "query" : "logits", 4, values, op);
  d.H = source.size(2);
  d.W = source.size(3);
  d.N = d.H * d.W;
  if (d.query_form) {
    TORCH_CHECK(keys.has_value(), op, ": expected keys with a query");
    check_tensor(*keys, "keys", 3, values, op);
    d.Cq = query->size(1);
    TORCH_CHECK(query->size(0) == d.B && keys->size(0) == d.B && keys->size(1) == d.K && keys->size(2) == d.Cq, op,
                ": expected query [B, Cq, H, W] and keys [B, K, Cq] for values [B, K, Cv] ", values.sizes(),
                ", got ", query->sizes(), " and ", keys->sizes());
  } else {
    TORCH_CHECK(logits->size(0) == d.B && logits->size(1) == d.K, op,
                ": expected logits [B, K, H, W] for values [B, K, Cv] ", values.sizes(), ", got ", logits->sizes());
  }
  TORCH_CHECK(d.B >= 1 && d.K >= 1 && d.Cv >= 1 && d.N >= 1 && (!d.query_form || d.Cq >= 1), op,
              ": expected non-empty tensors, got values ", values.sizes(), " and a map ", source.sizes());
  const std::string k_error = class_k_error(d.K);
  TORCH_CHECK(k_error.empty(), op, ": ", k_error);
  return d;
}

// The kernels' shared memory is a constant of the instantiation (KP), so the limit is raised to exactly it.
template <auto kKernel>
void check_smem(int64_t bytes, int KP, const char* op) {
  require_dynamic_smem<kKernel>(bytes, bytes, op, "K padded to " + std::to_string(KP) + " classes",
                                "use the triton or reference backend on this GPU");
}

template <typename scalar_t, typename acc_t>
ClassAttentionParams<scalar_t, acc_t> params(const std::optional<at::Tensor>& query,
                                             const std::optional<at::Tensor>& keys, const at::Tensor& values,
                                             const std::optional<at::Tensor>& logits, double scale, const Dims& d,
                                             const ClassAttentionPlan& plan) {
  ClassAttentionParams<scalar_t, acc_t> p{};
  p.query = d.query_form ? query->data_ptr<scalar_t>() : nullptr;
  p.keys = d.query_form ? keys->data_ptr<scalar_t>() : nullptr;
  p.values = values.data_ptr<scalar_t>();
  p.logits = d.query_form ? nullptr : logits->data_ptr<scalar_t>();
  p.Cq = d.Cq;
  p.Cv = d.Cv;
  p.N = d.N;
  p.tiles = plan.tiles;
  p.parts = plan.parts;
  p.K = static_cast<int>(d.K);
  p.scale = static_cast<acc_t>(scale);
  p.vec = plan.vec;
  return p;
}

template <typename scalar_t, int KP, bool QUERY>
std::tuple<at::Tensor, at::Tensor> class_attention_fwd_impl(const std::optional<at::Tensor>& query,
                                                            const std::optional<at::Tensor>& keys,
                                                            const at::Tensor& values,
                                                            const std::optional<at::Tensor>& logits, double scale,
                                                            const Dims& d, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kFwd = class_attention_fwd_kernel<scalar_t, acc_t, KP, QUERY>;
  const at::Tensor& source = QUERY ? *query : *logits;
  at::Tensor out = at::empty({d.B, d.Cv, d.H, d.W}, values.options());
  at::Tensor lse = at::empty({d.B, d.N}, values.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const ClassAttentionPlan plan =
      class_attention_plan(d.B, d.K, d.Cq, d.Cv, d.N, sizeof(scalar_t), sizeof(acc_t),
                           is_aligned16(source.data_ptr()) && is_aligned16(out.data_ptr()), sm_count());
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  check_smem<kFwd>(plan.fwd_smem_bytes, KP, op);
  ClassAttentionParams<scalar_t, acc_t> p = params<scalar_t, acc_t>(query, keys, values, logits, scale, d, plan);
  p.lse = lse.data_ptr<acc_t>();
  p.out = out.data_ptr<scalar_t>();
  kFwd<<<to_dim3(plan.fwd_grid), kThreads, plan.fwd_smem_bytes, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

template <typename scalar_t, int KP, bool QUERY>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_attention_bwd_impl(
    const at::Tensor& grad, const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& keys,
    const at::Tensor& values, const std::optional<at::Tensor>& logits, const at::Tensor& lse, double scale,
    const Dims& d, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kBwd = class_attention_bwd_kernel<scalar_t, acc_t, KP, QUERY>;
  const at::Tensor& source = QUERY ? *query : *logits;
  const auto options = values.options();
  at::Tensor grad_query = QUERY ? at::empty_like(*query) : at::empty({0}, options);
  at::Tensor grad_keys = QUERY ? at::empty_like(*keys) : at::empty({0}, options);
  at::Tensor grad_values = at::empty_like(values);
  at::Tensor grad_logits = QUERY ? at::empty({0}, options) : at::empty_like(*logits);
  const at::Tensor& grad_source = QUERY ? grad_query : grad_logits;
  const bool aligned = is_aligned16(grad.data_ptr()) && is_aligned16(source.data_ptr()) &&
                       is_aligned16(grad_source.data_ptr());
  const ClassAttentionPlan plan =
      class_attention_plan(d.B, d.K, d.Cq, d.Cv, d.N, sizeof(scalar_t), sizeof(acc_t), aligned, sm_count());
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  check_smem<kBwd>(plan.bwd_smem_bytes, KP, op);
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor slot = at::empty({plan.slot_elems}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  ClassAttentionParams<scalar_t, acc_t> p = params<scalar_t, acc_t>(query, keys, values, logits, scale, d, plan);
  p.grad = grad.data_ptr<scalar_t>();
  p.lse = lse.data_ptr<acc_t>();
  p.grad_query = QUERY ? grad_query.data_ptr<scalar_t>() : nullptr;
  p.grad_logits = QUERY ? nullptr : grad_logits.data_ptr<scalar_t>();
  p.slot = slot.data_ptr<acc_t>();
  kBwd<<<to_dim3(plan.bwd_grid), kThreads, plan.bwd_smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  class_attention_sum_kernel<scalar_t, acc_t><<<to_dim3(plan.sum_grid), kThreads, 0, stream>>>(
      p.slot, grad_values.data_ptr<scalar_t>(), QUERY ? grad_keys.data_ptr<scalar_t>() : nullptr, d.B, d.K, d.Cv,
      d.Cq, plan.parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_query, grad_keys, grad_values, grad_logits};
}

// Runs f(scalar_t{}, std::integral_constant<int, KP>{}, std::bool_constant<QUERY>{})
// for the data dtype (checked by check_inputs), K's padded class count and the form.
template <typename F>
void dispatch(at::ScalarType dtype, const Dims& d, F&& f) {
  const auto padded = [&](auto t) {
    class_dispatch_padded(class_padded(d.K), [&](auto kp) {
      if (d.query_form) {
        f(t, kp, std::true_type{});
      } else {
        f(t, kp, std::false_type{});
      }
    });
  };
  switch (dtype) {
    case at::kFloat: return padded(float{});
    case at::kHalf: return padded(at::Half{});
    case at::kBFloat16: return padded(at::BFloat16{});
    default: TORCH_CHECK(false, "class_attention (CUDA): no kernels for dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> class_attention_fwd_cuda(const std::optional<at::Tensor>& query,
                                                            const std::optional<at::Tensor>& keys,
                                                            const at::Tensor& values,
                                                            const std::optional<at::Tensor>& logits, double scale) {
  constexpr const char* op = "class_attention_fwd (CUDA)";
  const Dims d = check_inputs(query, keys, values, logits, op);
  const c10::cuda::CUDAGuard guard(values.device());
  std::tuple<at::Tensor, at::Tensor> out;
  dispatch(values.scalar_type(), d, [&](auto t, auto kp, auto q) {
    out = class_attention_fwd_impl<decltype(t), decltype(kp)::value, decltype(q)::value>(query, keys, values, logits,
                                                                                          scale, d, op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_attention_bwd_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& keys,
    const at::Tensor& values, const std::optional<at::Tensor>& logits, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  constexpr const char* op = "class_attention_bwd (CUDA)";
  const Dims d = check_inputs(query, keys, values, logits, op);
  check_tensor(grad, "grad", 4, values, op);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({d.B, d.Cv, d.H, d.W}), op, ": expected grad of shape [B, Cv, H, W] = ",
              at::IntArrayRef({d.B, d.Cv, d.H, d.W}), ", got ", grad.sizes());
  const at::ScalarType acc = at::toOpMathType(values.scalar_type());
  TORCH_CHECK(lse.device() == values.device() && lse.scalar_type() == acc && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({d.B, d.N}),
              op, ": expected a contiguous lse on ", values.device(), " of dtype ", acc, " and shape [B, N] = [", d.B,
              ", ", d.N, "], got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  (void)out;  // the softmax backward's row sums come from the attention and dA (class_attention_kernel.cuh)
  const c10::cuda::CUDAGuard guard(values.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  dispatch(values.scalar_type(), d, [&](auto t, auto kp, auto q) {
    grads = class_attention_bwd_impl<decltype(t), decltype(kp)::value, decltype(q)::value>(grad, query, keys, values,
                                                                                            logits, lse, scale, d, op);
  });
  return grads;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("class_attention_fwd", &fastctx::class_attention_fwd_cuda);
  m.impl("class_attention_bwd", &fastctx::class_attention_bwd_cuda);
}
