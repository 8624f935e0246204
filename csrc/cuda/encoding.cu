// CUDA backend of EncNet's Encoding layer, host side: the checks that keep
// the kernels' memory accesses in bounds, workspace allocation and launch.
// Device code: encoding_kernel.cuh; tile geometry, workspace layout and
// launch sizes: encoding_launch.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/encoding_kernel.cuh"
#include "cuda/encoding_launch.h"
#include "cuda/host.h"

namespace fastctx {
namespace {

void check_encoding_inputs(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                           bool channels_first, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x to be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected x of dtype float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": expected x of shape ", channels_first ? "[B, D, N]" : "[B, N, D]", ", got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": expected x to be contiguous");
  const int64_t D = channels_first ? x.size(1) : x.size(2);
  TORCH_CHECK(D >= 1, op, ": expected D >= 1 channels, got ", D);
  TORCH_CHECK(codewords.dim() == 2 && codewords.size(1) == D, op, ": expected codewords of shape [K, ", D,
              "] (D from x), got ", codewords.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == codewords.size(0), op, ": expected scale of shape [",
              codewords.size(0), "], got ", scale.sizes());
  for (const auto* t : {&codewords, &scale}) {
    TORCH_CHECK(t->device() == x.device(), op, ": expected codewords and scale on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": expected codewords and scale of dtype ",
                x.scalar_type(), " (x's), got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": expected codewords and scale to be contiguous");
  }
}

// The call's plan, after raising the tile kernel's shared-memory limit (once)
// to its fixed size and reading its occupancy there.
template <auto kTileKernel>
EncodingPlan make_plan(bool backward, const at::Tensor& x, const at::Tensor& codewords, bool channels_first,
                       bool grad_x_aligned16, const char* op) {
  const int KP = encoding_padded_codes(codewords.size(0));
  const int acc_size = static_cast<int>(at::elementSize(at::toOpMathType(x.scalar_type())));
  const int64_t smem = encoding_tile_smem_bytes(KP, backward, acc_size);
  require_dynamic_smem<kTileKernel>(smem, smem, op, "the tile kernel",
                                    acc_size > 4 ? "float64 doubles the float32 footprint: use float32/float16/bfloat16"
                                                 : "use the triton or reference backend on this GPU");
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kTileKernel, kThreads, smem));
  const int64_t B = x.size(0), N = channels_first ? x.size(2) : x.size(1);
  EncodingPlan plan = encoding_plan(backward, B, N, codewords.size(1), codewords.size(0), channels_first, acc_size,
                                    x.numel() * x.element_size(), grad_x_aligned16,
                                    sm_count(), per_sm);
  TORCH_CHECK(plan.error.empty(), op, ": ", plan.error);
  return plan;
}

template <typename scalar_t, int KP>
at::Tensor encoding_fwd_impl(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                             bool channels_first) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kTileKernel = encoding_tile_kernel<scalar_t, acc_t, KP, false>;
  const EncodingPlan plan = make_plan<kTileKernel>(false, x, codewords, channels_first, false, "encoding_fwd (CUDA)");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t B = x.size(0), K = codewords.size(0), D = codewords.size(1);

  at::Tensor ws = at::empty({plan.ws_elems}, acc_opts);
  acc_t* w = ws.data_ptr<acc_t>();
  encoding_prep_kernel<scalar_t, acc_t, KP><<<to_dim3(plan.prep_grid), kThreads, 0, stream>>>(
      codewords.data_ptr<scalar_t>(), static_cast<int>(K), D, plan.Dp, true, w + plan.ws_mean, w + plan.ws_cpk,
      w + plan.ws_cpt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  encoding_norms_kernel<acc_t><<<to_dim3(plan.norms_grid), 32, 0, stream>>>(
      w + plan.ws_cpk, nullptr, KP, static_cast<int>(plan.Dp), w + plan.ws_cn, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor part = at::empty({plan.part_elems}, acc_opts);
  EncParams<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.scale = scale.data_ptr<scalar_t>();
  p.mean = w + plan.ws_mean;
  p.cpk = w + plan.ws_cpk;
  p.cpt = w + plan.ws_cpt;
  p.cn = w + plan.ws_cn;
  p.part = part.data_ptr<acc_t>();
  p.part_a = p.part + plan.part_a;
  at::Tensor flags = at::empty({plan.flag_bytes}, x.options().dtype(at::kByte));
  p.codewords = codewords.data_ptr<scalar_t>();
  p.flags = flags.data_ptr<uint8_t>();
  p.N = static_cast<int>(channels_first ? x.size(2) : x.size(1));
  p.D = static_cast<int>(D);
  p.Dp = static_cast<int>(plan.Dp);
  p.tiles = static_cast<int>(plan.tiles);
  p.parts = static_cast<int>(plan.parts);
  p.K = static_cast<int>(K);
  p.cf = channels_first;
  kTileKernel<<<to_dim3(plan.tile_grid), kThreads, plan.smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  encoding_fixup_kernel<scalar_t, acc_t, KP, false><<<to_dim3(plan.tile_grid), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor out = at::empty({B, K, D}, x.options());
  encoding_fwd_reduce_kernel<scalar_t, acc_t><<<to_dim3(plan.reduce_grid), kThreads, 0, stream>>>(
      p.part, p.part_a, p.cpk, out.data_ptr<scalar_t>(), plan.parts, static_cast<int>(K), KP, D, plan.Dp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename scalar_t, int KP>
std::tuple<at::Tensor, at::Tensor, at::Tensor> encoding_bwd_impl(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& codewords,
                                                                 const at::Tensor& scale, bool channels_first) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr auto kTileKernel = encoding_tile_kernel<scalar_t, acc_t, KP, true>;
  at::Tensor grad_x = at::empty_like(x);
  const EncodingPlan plan = make_plan<kTileKernel>(true, x, codewords, channels_first,
                                                   is_aligned16(grad_x.data_ptr()), "encoding_bwd (CUDA)");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t B = x.size(0), K = codewords.size(0), D = codewords.size(1);

  at::Tensor ws = at::empty({plan.ws_elems}, acc_opts);
  acc_t* w = ws.data_ptr<acc_t>();
  encoding_prep_kernel<scalar_t, acc_t, KP><<<to_dim3(plan.prep_grid), kThreads, 0, stream>>>(
      codewords.data_ptr<scalar_t>(), static_cast<int>(K), D, plan.Dp, true, w + plan.ws_mean, w + plan.ws_cpk,
      w + plan.ws_cpt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  encoding_prep_kernel<scalar_t, acc_t, KP><<<to_dim3(plan.prep_grad_grid), kThreads, 0, stream>>>(
      grad.data_ptr<scalar_t>(), static_cast<int>(K), D, plan.Dp, false, nullptr, w + plan.ws_gkd,
      w + plan.ws_gt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  encoding_norms_kernel<acc_t><<<to_dim3(plan.norms_grid), 32, 0, stream>>>(
      w + plan.ws_cpk, w + plan.ws_gkd, KP, static_cast<int>(plan.Dp), w + plan.ws_cn, w + plan.ws_gk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor part = at::empty({plan.part_elems}, acc_opts);
  EncParams<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.scale = scale.data_ptr<scalar_t>();
  p.mean = w + plan.ws_mean;
  p.cpk = w + plan.ws_cpk;
  p.cpt = w + plan.ws_cpt;
  p.gkd = w + plan.ws_gkd;
  p.gt = w + plan.ws_gt;
  p.cn = w + plan.ws_cn;
  p.gk = w + plan.ws_gk;
  p.grad_x = grad_x.data_ptr<scalar_t>();
  p.part = part.data_ptr<acc_t>();
  p.part_a = p.part + plan.part_a;
  p.part_v = p.part + plan.part_v;
  p.part_s = p.part + plan.part_s;
  at::Tensor flags = at::empty({plan.flag_bytes}, x.options().dtype(at::kByte));
  p.codewords = codewords.data_ptr<scalar_t>();
  p.flags = flags.data_ptr<uint8_t>();
  p.N = static_cast<int>(channels_first ? x.size(2) : x.size(1));
  p.D = static_cast<int>(D);
  p.Dp = static_cast<int>(plan.Dp);
  p.tiles = static_cast<int>(plan.tiles);
  p.parts = static_cast<int>(plan.parts);
  p.K = static_cast<int>(K);
  p.cf = channels_first;
  p.vec_out = plan.vec_out;
  kTileKernel<<<to_dim3(plan.tile_grid), kThreads, plan.smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  encoding_fixup_kernel<scalar_t, acc_t, KP, true><<<to_dim3(plan.tile_grid), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor grad_c = at::empty_like(codewords);
  at::Tensor grad_s = at::empty_like(scale);
  encoding_bwd_reduce_kernel<scalar_t, acc_t><<<to_dim3(plan.reduce_grid), kThreads, 0, stream>>>(
      p.part, p.part_a, p.part_v, p.part_s, p.cpk, grad.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
      grad_s.data_ptr<scalar_t>(), B, plan.parts, static_cast<int>(K), KP, D, plan.Dp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_c, grad_s};
}

at::Tensor encoding_fwd_cuda(const at::Tensor& x, const at::Tensor& codewords, const at::Tensor& scale,
                             bool channels_first) {
  constexpr const char* op = "encoding_fwd (CUDA)";
  check_encoding_inputs(x, codewords, scale, channels_first, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = channels_first ? x.size(2) : x.size(1);
  const int64_t K = codewords.size(0), D = codewords.size(1);
  TORCH_CHECK(K >= 1 && K <= kEncMaxCodes, op, ": expected 1 <= K <= ", kEncMaxCodes, " codewords, got ", K);
  if (B == 0 || N == 0) return at::zeros({B, K, D}, x.options());  // empty sums
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encoding_fwd_cuda", [&] {
    out = encoding_padded_codes(K) == 32 ? encoding_fwd_impl<scalar_t, 32>(x, codewords, scale, channels_first)
                                         : encoding_fwd_impl<scalar_t, 64>(x, codewords, scale, channels_first);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoding_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& codewords,
                                                                 const at::Tensor& scale, bool channels_first) {
  constexpr const char* op = "encoding_bwd (CUDA)";
  check_encoding_inputs(x, codewords, scale, channels_first, op);
  const int64_t B = x.size(0), N = channels_first ? x.size(2) : x.size(1);
  const int64_t K = codewords.size(0), D = codewords.size(1);
  TORCH_CHECK(K >= 1 && K <= kEncMaxCodes, op, ": expected 1 <= K <= ", kEncMaxCodes, " codewords, got ", K);
  TORCH_CHECK(grad.device() == x.device() && grad.scalar_type() == x.scalar_type(), op, ": expected grad on ",
              x.device(), " with dtype ", x.scalar_type(), ", got ", grad.device(), " ", grad.scalar_type());
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == K && grad.size(2) == D, op,
              ": expected grad of shape [B, K, D] = [", B, ", ", K, ", ", D, "], got ", grad.sizes());
  TORCH_CHECK(grad.is_contiguous(), op, ": expected grad to be contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  if (B == 0 || N == 0) return {at::zeros_like(x), at::zeros_like(codewords), at::zeros_like(scale)};
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encoding_bwd_cuda", [&] {
    out = encoding_padded_codes(K) == 32
              ? encoding_bwd_impl<scalar_t, 32>(grad, x, codewords, scale, channels_first)
              : encoding_bwd_impl<scalar_t, 64>(grad, x, codewords, scale, channels_first);
  });
  return out;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CUDA, m) {
  m.impl("encoding_fwd", &fastctx::encoding_fwd_cuda);
  m.impl("encoding_bwd", &fastctx::encoding_bwd_cuda);
}
