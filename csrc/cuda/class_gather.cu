// CUDA backend of class_gather, host side: the checks that keep the kernels'
// memory accesses in bounds, workspace allocation and launch. Device code:
// class_gather_kernel.cuh; tile geometry, workspace layout and launch sizes:
// class_gather_launch.h. fp32, fp16 and bf16 data (fp32 accumulation and
// statistic), the dtypes fastctx/ops/class_gather.py sends to this backend.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "cuda/class_gather_kernel.cuh"
#include "cuda/class_gather_launch.h"
#include "cuda/host.h"

namespace fastctx {
namespace {

bool parse_mode(c10::string_view mode, const char* op) {
  TORCH_CHECK(mode == "ocr" || mode == "paper", op, ": mode must be \"ocr\" or \"paper\", got \"", std::string(mode),
              "\"");
  return mode == "ocr";
}

struct Dims {
  int64_t B, C, K, N;
};

// The checks the kernels' memory accesses rely on; fastctx/ops validates user input before.
Dims check_inputs(const at::Tensor& feats, const at::Tensor& probs, const char* op) {
  TORCH_CHECK(feats.is_cuda(), op, ": expected feats to be a CUDA tensor, got one on ", feats.device());
  const at::ScalarType dtype = feats.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected feats of dtype float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(probs.device() == feats.device() && probs.scalar_type() == dtype, op, ": expected probs on ",
              feats.device(), " with feats' dtype ", dtype, ", got ", probs.device(), " ", probs.scalar_type());
  TORCH_CHECK(feats.dim() == 4 && probs.dim() == 4, op, ": expected feats [B, C, H, W] and probs [B, K, H, W], got ",
              feats.sizes(), " and ", probs.sizes());
  TORCH_CHECK(feats.is_contiguous() && probs.is_contiguous(), op, ": expected contiguous (NCHW) feats and probs");
  TORCH_CHECK(probs.size(0) == feats.size(0) && probs.size(2) == feats.size(2) && probs.size(3) == feats.size(3), op,
              ": feats ", feats.sizes(), " and probs ", probs.sizes(), " must share the batch and the spatial size");
  const Dims d{feats.size(0), feats.size(1), probs.size(1), feats.size(2) * feats.size(3)};
  TORCH_CHECK(d.B >= 1 && d.C >= 1 && d.K >= 1 && d.N >= 1, op, ": expected non-empty feats and probs, got ",
              feats.sizes(), " and ", probs.sizes());
  const std::string k_error = class_k_error(d.K);
  TORCH_CHECK(k_error.empty(), op, ": ", k_error);
  return d;
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
                const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device() && t.scalar_type() == dtype && t.is_contiguous() && t.sizes() == sizes, op,
              ": expected a contiguous ", name, " on ", ref.device(), " of dtype ", dtype, " and shape ", sizes,
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// The kernels' shared memory is a constant of the instantiation (KP), so the limit is raised to exactly it.
template <auto kKernel>
void check_smem(int64_t bytes, int KP, const char* op) {
  require_dynamic_smem<kKernel>(bytes, bytes, op, "K padded to " + std::to_string(KP) + " classes",
                                "use the triton or reference backend on this GPU");
}

template <typename scalar_t, int KP>
std::tuple<at::Tensor, at::Tensor> class_gather_fwd_impl(const at::Tensor& feats, const at::Tensor& probs, bool ocr,
                                                         double scale, const Dims& d, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kFwd = class_gather_fwd_kernel<scalar_t, acc_t, KP>;
  const ClassGatherPlan plan =
      class_gather_plan(d.B, d.C, d.K, d.N, sizeof(scalar_t), sizeof(acc_t),
                        is_aligned16(feats.data_ptr()) && is_aligned16(probs.data_ptr()), sm_count());
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  check_smem<kFwd>(plan.fwd_smem_bytes, KP, op);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = feats.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::Tensor part = at::empty({plan.part_elems}, acc_opts);
  at::Tensor centres = at::empty({d.B, d.K, d.C}, feats.options());
  at::Tensor stat = at::empty({d.B, d.K}, acc_opts);
  ClassGatherFwdParams<scalar_t, acc_t> p{};
  p.feats = feats.data_ptr<scalar_t>();
  p.probs = probs.data_ptr<scalar_t>();
  p.part = part.data_ptr<acc_t>();
  p.part_sum = p.part + plan.part_sum;
  p.part_shift = p.part + plan.part_shift;
  p.C = d.C;
  p.N = d.N;
  p.tiles = plan.tiles;
  p.parts = plan.parts;
  p.cblocks = plan.cblocks;
  p.K = static_cast<int>(d.K);
  p.scale = static_cast<acc_t>(scale);
  p.ocr = ocr;
  p.vec = plan.vec;
  kFwd<<<to_dim3(plan.fwd_grid), kThreads, plan.fwd_smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  class_gather_merge_kernel<scalar_t, acc_t><<<to_dim3(plan.merge_grid), kThreads, 0, stream>>>(
      p.part, p.part_sum, p.part_shift, centres.data_ptr<scalar_t>(), stat.data_ptr<acc_t>(), d.C, p.K, plan.parts,
      ocr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {centres, stat};
}

template <typename scalar_t, int KP>
std::tuple<at::Tensor, at::Tensor> class_gather_bwd_impl(const at::Tensor& grad, const at::Tensor& feats,
                                                         const at::Tensor& probs, const at::Tensor& centres,
                                                         const at::Tensor& stat, bool ocr, double scale,
                                                         const Dims& d, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kBwd = class_gather_bwd_kernel<scalar_t, acc_t, KP>;
  at::Tensor grad_feats = at::empty_like(feats);
  at::Tensor grad_probs = at::empty_like(probs);
  const bool aligned = is_aligned16(feats.data_ptr()) && is_aligned16(probs.data_ptr()) &&
                       is_aligned16(grad_feats.data_ptr()) && is_aligned16(grad_probs.data_ptr());
  const ClassGatherPlan plan =
      class_gather_plan(d.B, d.C, d.K, d.N, sizeof(scalar_t), sizeof(acc_t), aligned, sm_count());
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  check_smem<kBwd>(plan.bwd_smem_bytes, KP, op);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = feats.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::Tensor ws = at::empty({plan.ws_elems}, acc_opts);
  ClassGatherBwdParams<scalar_t, acc_t> p{};
  p.grad = grad.data_ptr<scalar_t>();
  p.feats = feats.data_ptr<scalar_t>();
  p.probs = probs.data_ptr<scalar_t>();
  p.centres = centres.data_ptr<scalar_t>();
  p.stat = stat.data_ptr<acc_t>();
  p.gs = ws.data_ptr<acc_t>();
  p.offset = p.gs + plan.ws_offset;
  p.grad_feats = grad_feats.data_ptr<scalar_t>();
  p.grad_probs = grad_probs.data_ptr<scalar_t>();
  p.B = d.B;
  p.C = d.C;
  p.N = d.N;
  p.K = static_cast<int>(d.K);
  p.scale = static_cast<acc_t>(scale);
  p.ocr = ocr;
  p.vec = plan.vec;
  class_gather_prep_kernel<scalar_t, acc_t><<<to_dim3(plan.prep_grid), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  kBwd<<<to_dim3(plan.bwd_grid), kThreads, plan.bwd_smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_feats, grad_probs};
}

// Runs f(scalar_t{}, std::integral_constant<int, KP>{}) for the data dtype
// (checked by check_inputs) and K's padded class count.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t K, F&& f) {
  const auto padded = [&](auto t) { class_dispatch_padded(class_padded(K), [&](auto kp) { f(t, kp); }); };
  switch (dtype) {
    case at::kFloat: return padded(float{});
    case at::kHalf: return padded(at::Half{});
    case at::kBFloat16: return padded(at::BFloat16{});
    default: TORCH_CHECK(false, "class_gather (CUDA): no kernels for dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> class_gather_fwd_cuda(const at::Tensor& feats, const at::Tensor& probs,
                                                         c10::string_view mode, double scale) {
  constexpr const char* op = "class_gather_fwd (CUDA)";
  const bool ocr = parse_mode(mode, op);
  const Dims d = check_inputs(feats, probs, op);
  const c10::cuda::CUDAGuard guard(feats.device());
  std::tuple<at::Tensor, at::Tensor> out;
  dispatch(feats.scalar_type(), d.K, [&](auto t, auto kp) {
    out = class_gather_fwd_impl<decltype(t), decltype(kp)::value>(feats, probs, ocr, scale, d, op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> class_gather_bwd_cuda(const at::Tensor& grad, const at::Tensor& feats,
                                                         const at::Tensor& probs, const at::Tensor& centres,
                                                         const at::Tensor& stat, c10::string_view mode,
                                                         double scale) {
  constexpr const char* op = "class_gather_bwd (CUDA)";
  const bool ocr = parse_mode(mode, op);
  const Dims d = check_inputs(feats, probs, op);
  check_like(grad, "grad", {d.B, d.K, d.C}, feats.scalar_type(), feats, op);
  check_like(centres, "centres", {d.B, d.K, d.C}, feats.scalar_type(), feats, op);
  check_like(stat, "stat", {d.B, d.K}, at::toOpMathType(feats.scalar_type()), feats, op);
  const c10::cuda::CUDAGuard guard(feats.device());
  std::tuple<at::Tensor, at::Tensor> out;
  dispatch(feats.scalar_type(), d.K, [&](auto t, auto kp) {
    out = class_gather_bwd_impl<decltype(t), decltype(kp)::value>(grad, feats, probs, centres, stat, ocr, scale, d,
                                                                  op);
  });
  return out;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("class_gather_fwd", &fastctx::class_gather_fwd_cuda);
  m.impl("class_gather_bwd", &fastctx::class_gather_bwd_cuda);
}
