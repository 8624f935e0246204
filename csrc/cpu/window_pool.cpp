// CPU backend of window_pool (see docs/kernels.md, "window_pool"): IIWA's window tokens.
//   out[b, i, j, c] = sum_{dh < Wh, dw < Ww} x[b, i*Wh + dh, j*Ww + dw, c] / (Wh*Ww) + pos[i, j, c]
// x is channels last, so every loop runs along C (contiguous, vectorised) and a
// task owns whole token rows (b, i): it reads the Wh map rows of its windows
// once, in order, and sums them into one [Wg, C] row in the accumulation type
// (float for bfloat16). The backward is a gather: grad_x[b, y, x, c] =
// grad[b, y / Wh, x / Ww, c] / (Wh*Ww), one map row per task; grad_pos is the
// sum over the batch in batch order (fixed, so independent of the thread count).
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
#include <vector>

#include "cpu/parallel.h"
#include "cpu/output.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "window_pool (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "window_pool: ", name, " must be 4-D [B, H, W, C] (channels last), got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "window_pool: ", name, " must be contiguous (channels last)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              "window_pool (cpu): ", name, " must be float32, float64 or bfloat16, got ", t.scalar_type());
}

std::pair<int64_t, int64_t> window_of(at::IntArrayRef window) {
  TORCH_CHECK(window.size() == 2 && window[0] >= 1 && window[1] >= 1,
              "window_pool: window must be [Wh, Ww] >= 1, got ", window);
  return {window[0], window[1]};
}

at::Tensor window_pool_fwd(const at::Tensor& x, const std::optional<at::Tensor>& pos_opt,
                           at::IntArrayRef window) {
  check_data(x, "x");
  const auto [Wh, Ww] = window_of(window);
  const int64_t B = x.size(0), Hp = x.size(1), Wp = x.size(2), C = x.size(3);
  TORCH_CHECK(Hp % Wh == 0 && Wp % Ww == 0, "window_pool: x's H, W = ", Hp, ", ", Wp,
              " must be multiples of the window ", window);
  const int64_t Hg = Hp / Wh, Wg = Wp / Ww;
  const bool has_pos = pos_opt.has_value() && pos_opt->defined();
  if (has_pos) {
    const at::Tensor& pos = *pos_opt;
    TORCH_CHECK(pos.device().is_cpu() && pos.is_contiguous() && pos.scalar_type() == x.scalar_type(),
                "window_pool (cpu): pos must be a contiguous CPU tensor of x's dtype ", x.scalar_type(), ", got ",
                pos.scalar_type(), " on ", pos.device());
    TORCH_CHECK(pos.dim() == 3 && pos.size(0) == Hg && pos.size(1) == Wg && pos.size(2) == C,
                "window_pool: pos must be [Hg, Wg, C] = [", Hg, ", ", Wg, ", ", C, "], got ", pos.sizes());
  }
  auto out = at::empty({B, Hg, Wg, C}, x.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "window_pool_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos_opt->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t row = Wg * C;  // one token row
    const acc_t count = static_cast<acc_t>(Wh * Ww);
    at::parallel_for(0, B * Hg, cpu::task_grain(Wh * Wp * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(row);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % Hg;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        // The window's elements are summed in row-major order (dh, then dw), as avg_pool2d does.
        for (int64_t dh = 0; dh < Wh; ++dh) {
          const scalar_t* src = xp + ((r / Hg) * Hp + i * Wh + dh) * Wp * C;
          for (int64_t j = 0; j < Wg; ++j) {
            acc_t* a = acc.data() + j * C;
            for (int64_t dw = 0; dw < Ww; ++dw) {
              const scalar_t* s = src + (j * Ww + dw) * C;
              for (int64_t c = 0; c < C; ++c) a[c] += static_cast<acc_t>(s[c]);
            }
          }
        }
        scalar_t* dst = op + r * row;
        if (pp != nullptr) {
          const scalar_t* p = pp + i * row;
          for (int64_t k = 0; k < row; ++k) dst[k] = static_cast<scalar_t>(acc[k] / count + static_cast<acc_t>(p[k]));
        } else {
          for (int64_t k = 0; k < row; ++k) dst[k] = static_cast<scalar_t>(acc[k] / count);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_pool_bwd(const at::Tensor& grad, at::IntArrayRef window, bool pos_grad) {
  check_data(grad, "grad");
  const auto [Wh, Ww] = window_of(window);
  const int64_t B = grad.size(0), Hg = grad.size(1), Wg = grad.size(2), C = grad.size(3);
  const int64_t Hp = Hg * Wh, Wp = Wg * Ww;
  auto grad_x = cpu::empty_output({B, Hp, Wp, C}, grad.options());
  auto grad_pos = pos_grad ? at::zeros({Hg, Wg, C}, grad.options()) : at::empty({0}, grad.options());
  if (grad.numel() == 0) {
    grad_x.zero_();
    return {grad_x, grad_pos};
  }

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "window_pool_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const acc_t count = static_cast<acc_t>(Wh * Ww);
    // grad_x: one map row (b, y) per item, each element its token's gradient / (Wh*Ww).
    at::parallel_for(0, B * Hp, cpu::task_grain(Wp * C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* src = gp + ((r / Hp) * Hg + (r % Hp) / Wh) * Wg * C;
        scalar_t* dst = gxp + r * Wp * C;
        for (int64_t x = 0; x < Wp; ++x) {
          const scalar_t* s = src + (x / Ww) * C;
          scalar_t* d = dst + x * C;
          for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(static_cast<acc_t>(s[c]) / count);
        }
      }
    });
    if (pos_grad) {
      // grad_pos: one token row per item, summed over b in order.
      scalar_t* gpp = grad_pos.mutable_data_ptr<scalar_t>();
      const int64_t row = Wg * C;
      at::parallel_for(0, Hg, cpu::task_grain(B * row), [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> acc(row);
        for (int64_t i = i0; i < i1; ++i) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* s = gp + (b * Hg + i) * row;
            for (int64_t k = 0; k < row; ++k) acc[k] += static_cast<acc_t>(s[k]);
          }
          scalar_t* d = gpp + i * row;
          for (int64_t k = 0; k < row; ++k) d[k] = static_cast<scalar_t>(acc[k]);
        }
      });
    }
  });
  return {grad_x, grad_pos};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("window_pool_fwd", &fastctx::window_pool_fwd);
  m.impl("window_pool_bwd", &fastctx::window_pool_bwd);
}
