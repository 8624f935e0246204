// CPU backend of residual_relu (see docs/kernels.md, "residual_relu"):
//   out = relu(relu(y * scale[c] + shift[c]) + residual)
// Forward and backward are one pass each over (b, c) planes. For the backward
// the forward saves relu_active(out) (out > 0, or NaN) as a bit mask (LSB
// first, ceil(H*W / 8) bytes per plane): the backward then reads 1 bit per
// element instead of out. The backward's channel sums (grad_scale, grad_shift)
// are first summed per plane into a [B, C] partial buffer, then over b in a
// fixed order: deterministic, no atomics. The scalar maths is
// common/activation.h, shared with CUDA.
//
// The checks here are the ones the loops' memory accesses rely on (device,
// dtype, contiguity, shapes); fastctx/ops validates user input before.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/activation.h"
#include "cpu/parallel.h"
#include "cpu/output.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "residual_relu (cpu): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, "residual_relu: ", name, " must be 4-D [B, C, H, W], got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "residual_relu: ", name, " must be contiguous (NCHW)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "residual_relu (cpu): ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "residual_relu: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "residual_relu: ", name, " must have shape ", like.sizes(),
              ", got ", t.sizes());
}

// scale/shift are "acc" tensors: float32 for float32 data, float64 for float64.
void check_affine(const at::Tensor& t, const char* name, const at::Tensor& y) {
  const auto acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.device().is_cpu(), "residual_relu (cpu): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == y.size(1), "residual_relu: ", name, " must be [C=",
              y.size(1), "], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "residual_relu: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == acc, "residual_relu: ", name, " must be ", acc, " for ",
              y.scalar_type(), " data, got ", t.scalar_type());
}

// bit_table<T>()[b][j] = bit j of byte b, as 0 or 1 of type T.
template <typename acc_t>
const acc_t (&bit_table())[256][8] {
  struct Table {
    acc_t v[256][8];
  };
  static const Table table = [] {
    Table t;
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 8; ++j) t.v[b][j] = ((b >> j) & 1) != 0 ? acc_t(1) : acc_t(0);
    }
    return t;
  }();
  return table.v;
}

// mask bit n % 8 of byte n / 8 = relu_active(v[n]) for n < N (set at NaN, as
// torch's ReLU backward passes the gradient there); the last byte's spare bits 0.
template <typename scalar_t>
void pack_active(const scalar_t* v, int64_t N, uint8_t* mask) {
  const int64_t full = N / 8;
  for (int64_t i = 0; i < full; ++i) mask[i] = static_cast<uint8_t>(cpu::not_le_zero_bits8(v + 8 * i));
  if (N % 8 != 0) {
    unsigned bits = 0;
    for (int64_t n = 8 * full; n < N; ++n) bits |= static_cast<unsigned>(relu_active(v[n])) << (n % 8);
    mask[full] = static_cast<uint8_t>(bits);
  }
}

std::tuple<at::Tensor, at::Tensor> residual_relu_fwd(const at::Tensor& y, const at::Tensor& residual,
                                                     const at::Tensor& scale, const at::Tensor& shift,
                                                     bool save_mask) {
  check_data(y, "y", y);
  check_data(residual, "residual", y);
  check_affine(scale, "scale", y);
  check_affine(shift, "shift", y);
  auto out = cpu::empty_output_like(y);
  const int64_t C = y.size(1), N = y.size(2) * y.size(3), planes = y.size(0) * C;
  const int64_t mask_bytes = (N + 7) / 8;
  auto mask = save_mask ? at::empty({y.size(0), C, mask_bytes}, y.options().dtype(at::kByte))
                        : at::empty({0}, y.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, mask};

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "residual_relu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    const acc_t* scp = scale.const_data_ptr<acc_t>();
    const acc_t* shp = shift.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* mp = save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, planes, cpu::task_grain(N), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const acc_t sc = scp[p % C], sh = shp[p % C];
        const scalar_t* yy = yp + p * N;
        const scalar_t* rr = rp + p * N;
        scalar_t* oo = op + p * N;
        uint8_t* mm = mp != nullptr ? mp + p * mask_bytes : nullptr;
        for (int64_t n = 0; n < N; ++n) {  // plain elementwise loop: vectorised
          oo[n] = static_cast<scalar_t>(
              residual_relu<acc_t>(static_cast<acc_t>(yy[n]), static_cast<acc_t>(rr[n]), sc, sh));
        }
        if (mm != nullptr) pack_active(oo, N, mm);
      }
    });
  });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_relu_bwd(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& scale,
    const at::Tensor& shift) {
  check_data(y, "y", y);
  check_data(grad, "grad", y);
  check_affine(scale, "scale", y);
  check_affine(shift, "shift", y);
  const int64_t B = y.size(0), C = y.size(1), N = y.size(2) * y.size(3);
  const int64_t mask_bytes = (N + 7) / 8;
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "residual_relu (cpu): mask must be a contiguous uint8 CPU tensor (the forward's), got ",
              mask.scalar_type(), " on ", mask.device());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == C && mask.size(2) == mask_bytes,
              "residual_relu: mask must be [B, C, ceil(H*W/8)] = [", B, ", ", C, ", ", mask_bytes,
              "], got ", mask.sizes());
  auto grad_y = cpu::empty_output_like(y);
  auto grad_residual = cpu::empty_output_like(y);
  auto grad_scale = at::zeros_like(scale);
  auto grad_shift = at::zeros_like(shift);
  if (grad_y.numel() == 0) return {grad_y, grad_residual, grad_scale, grad_shift};
  // Per-plane sums, [2, B, C]: sum gu*y, then sum gu.
  auto partial = at::empty({2, B, C}, scale.options());

  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "residual_relu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask.const_data_ptr<uint8_t>();
    const acc_t* scp = scale.const_data_ptr<acc_t>();
    const acc_t* shp = shift.const_data_ptr<acc_t>();
    scalar_t* gyp = grad_y.mutable_data_ptr<scalar_t>();
    scalar_t* grp = grad_residual.mutable_data_ptr<scalar_t>();
    acc_t* part_scale = partial.mutable_data_ptr<acc_t>();
    acc_t* part_shift = part_scale + B * C;

    at::parallel_for(0, B * C, cpu::task_grain(N), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const acc_t sc = scp[p % C], sh = shp[p % C];
        const scalar_t* gg = gp + p * N;
        const scalar_t* yy = yp + p * N;
        const uint8_t* mm = mp + p * mask_bytes;
        scalar_t* gy = gyp + p * N;
        scalar_t* gr = grp + p * N;
        // Eight pixels (one mask byte) per step. The byte selects a row of 0/1
        // values from bit_table: contiguous loads keep this loop as vectorisable
        // as an elementwise one (per-lane bit tests are not). Lane j of the sums
        // takes pixel j of each byte (independent accumulators in one vector
        // register), reduced in a fixed order after the loop.
        const auto& table = bit_table<acc_t>();
        acc_t sum_gy[8] = {}, sum_g[8] = {};
        const int64_t n_full = N - N % 8;
        for (int64_t n0 = 0; n0 < n_full; n0 += 8) {
          const acc_t* active = table[mm[n0 / 8]];
          for (int j = 0; j < 8; ++j) {
            const acc_t yv = static_cast<acc_t>(yy[n0 + j]);
            acc_t gu, g;
            residual_relu_grad<acc_t>(static_cast<acc_t>(gg[n0 + j]), yv, active[j] > acc_t(0), sc, sh, &gu, &g);
            gr[n0 + j] = static_cast<scalar_t>(g);
            gy[n0 + j] = static_cast<scalar_t>(gu * sc);
            sum_gy[j] += gu * yv;
            sum_g[j] += gu;
          }
        }
        for (int64_t n = n_full; n < N; ++n) {  // the plane's last, partial byte
          const acc_t yv = static_cast<acc_t>(yy[n]);
          acc_t gu, g;
          residual_relu_grad<acc_t>(static_cast<acc_t>(gg[n]), yv, ((mm[n / 8] >> (n % 8)) & 1u) != 0u, sc, sh,
                                    &gu, &g);
          gr[n] = static_cast<scalar_t>(g);
          gy[n] = static_cast<scalar_t>(gu * sc);
          sum_gy[n % 8] += gu * yv;
          sum_g[n % 8] += gu;
        }
        acc_t s_gy = 0, s_g = 0;
        for (int j = 0; j < 8; ++j) {
          s_gy += sum_gy[j];
          s_g += sum_g[j];
        }
        part_scale[p] = s_gy;
        part_shift[p] = s_g;
      }
    });

    // Fixed-order sum over the batch.
    acc_t* gsc = grad_scale.mutable_data_ptr<acc_t>();
    acc_t* gsh = grad_shift.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        gsc[c] += part_scale[b * C + c];
        gsh[c] += part_shift[b * C + c];
      }
    }
  });
  return {grad_y, grad_residual, grad_scale, grad_shift};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("residual_relu_fwd", &fastctx::residual_relu_fwd);
  m.impl("residual_relu_bwd", &fastctx::residual_relu_bwd);
}
