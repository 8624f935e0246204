// CPU backend of upsample_add (see docs/kernels.md, "upsample_add"): IIWA's
//   out[b, y, x, c] = residual[b, y, x, c] + bilinear(tokens)[b, y, x, c]   (align_corners=True)
// tokens [B, h, w, C] and residual [B, H, W, C] are channels last: every loop
// runs along C, contiguous and vectorised; no permuted copies.
//
// Source indices and weights per output row / column are PyTorch's
// (area_pixel_compute_scale + guard_index_and_lambda, align_corners=True):
// scale = (in - 1) / (out - 1) (0 when out == 1), src = scale * dst,
// i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), l1 = clamp(src - i0, 0, 1),
// l0 = 1 - l1. Both taps are always applied, even at weight 0, so a NaN or inf
// in a neighbouring token spreads exactly as in eager PyTorch.
//
// Forward, per output row (b, y): the two token rows are blended into one
// [w, C] row, then each output pixel blends two entries of it and adds the residual.
// Backward, grad_tokens = U^T grad as a gather, per token row (b, i): the output
// rows touching i (a contiguous range, as i0 and i1 are monotone in y) are
// summed with their weights into one [W, C] row, then each token (i, j) sums the
// output columns touching j. Separable, yet with eager's NaN pattern: a sum of
// tap products is NaN for an infinite gradient iff a touching tap of either
// axis has weight 0, here as in eager's four-term scatter. Every sum has a fixed order: no atomics, results
// independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/output.h"

namespace fastctx {
namespace {

void check_data(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "upsample_add (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "upsample_add: ", name, " must be 4-D [B, H, W, C] (channels last), got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "upsample_add: ", name, " must be contiguous (channels last)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              "upsample_add (cpu): ", name, " must be float32, float64 or bfloat16, got ", t.scalar_type());
}

// The two taps of every output index along one axis (in -> out).
template <typename acc_t>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  // For each input index, the range [lo, hi) of output indices whose taps touch it (empty: lo == hi).
  std::vector<int64_t> lo, hi;

  Taps(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out), lo(in, 0), hi(in, 0) {
    const acc_t scale = out > 1 ? static_cast<acc_t>(in - 1) / static_cast<acc_t>(out - 1) : acc_t(0);
    for (int64_t d = 0; d < out; ++d) {
      const acc_t src = scale * static_cast<acc_t>(d);
      const int64_t a = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const acc_t lambda = std::min(std::max(src - static_cast<acc_t>(a), acc_t(0)), acc_t(1));
      i0[d] = a;
      i1[d] = a + (a < in - 1 ? 1 : 0);
      l1[d] = lambda;
      l0[d] = acc_t(1) - lambda;
    }
    for (int64_t d = out - 1; d >= 0; --d) lo[i0[d]] = lo[i1[d]] = d;  // smallest d touching each input
    for (int64_t d = 0; d < out; ++d) hi[i0[d]] = hi[i1[d]] = d + 1;
  }

};

// dst[k] += the taps of output index d on input index i applied to src[k]. When both taps are i (the last
// index: i1 clamped to i0), they are applied one by one as the eager backward's scatter does, so an
// infinite gradient times the 0-weight tap gives NaN there too.
template <typename acc_t, typename src_t>
inline void add_taps(acc_t* dst, const src_t* src, int64_t n, const Taps<acc_t>& taps, int64_t d, int64_t i) {
  const bool first = taps.i0[d] == i, second = taps.i1[d] == i;
  if (first && second) {
    const acc_t a = taps.l0[d], b = taps.l1[d];
    for (int64_t k = 0; k < n; ++k) dst[k] += a * static_cast<acc_t>(src[k]) + b * static_cast<acc_t>(src[k]);
  } else {
    const acc_t a = first ? taps.l0[d] : taps.l1[d];
    for (int64_t k = 0; k < n; ++k) dst[k] += a * static_cast<acc_t>(src[k]);
  }
}

at::Tensor upsample_add_fwd(const at::Tensor& tokens, const at::Tensor& residual) {
  check_data(tokens, "tokens");
  check_data(residual, "residual");
  TORCH_CHECK(tokens.scalar_type() == residual.scalar_type(), "upsample_add: residual has dtype ",
              residual.scalar_type(), ", expected tokens' ", tokens.scalar_type());
  TORCH_CHECK(tokens.size(0) == residual.size(0) && tokens.size(3) == residual.size(3),
              "upsample_add: tokens [B, h, w, C] and residual [B, H, W, C] must share B and C, got ",
              tokens.sizes(), " and ", residual.sizes());
  const int64_t B = residual.size(0), H = residual.size(1), W = residual.size(2), C = residual.size(3);
  const int64_t h = tokens.size(1), w = tokens.size(2);
  TORCH_CHECK(h >= 1 && w >= 1, "upsample_add: tokens must have h, w >= 1, got ", tokens.sizes());
  auto out = cpu::empty_output_like(residual);
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "upsample_add_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Taps<acc_t> ty(h, H), tx(w, W);
    const scalar_t* tp = tokens.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, cpu::task_grain((W + w) * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> blend(w * C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, y = r % H;
        const scalar_t* t0 = tp + (b * h + ty.i0[y]) * w * C;
        const scalar_t* t1 = tp + (b * h + ty.i1[y]) * w * C;
        const acc_t a0 = ty.l0[y], a1 = ty.l1[y];
        for (int64_t k = 0; k < w * C; ++k) {
          blend[k] = a0 * static_cast<acc_t>(t0[k]) + a1 * static_cast<acc_t>(t1[k]);
        }
        const scalar_t* res = rp + r * W * C;
        scalar_t* dst = op + r * W * C;
        for (int64_t x = 0; x < W; ++x) {
          const acc_t* s0 = blend.data() + tx.i0[x] * C;
          const acc_t* s1 = blend.data() + tx.i1[x] * C;
          const acc_t b0 = tx.l0[x], b1 = tx.l1[x];
          const scalar_t* rr = res + x * C;
          scalar_t* d = dst + x * C;
          for (int64_t c = 0; c < C; ++c) {
            d[c] = static_cast<scalar_t>(static_cast<acc_t>(rr[c]) + (b0 * s0[c] + b1 * s1[c]));
          }
        }
      }
    });
  });
  return out;
}

at::Tensor upsample_add_bwd(const at::Tensor& grad, int64_t height, int64_t width) {
  check_data(grad, "grad");
  TORCH_CHECK(height >= 1 && width >= 1, "upsample_add: the token grid must be at least 1x1, got ", height, "x",
              width);
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), C = grad.size(3);
  const int64_t h = height, w = width;
  auto grad_tokens = at::empty({B, h, w, C}, grad.options());
  if (grad_tokens.numel() == 0) return grad_tokens;
  if (grad.numel() == 0) return grad_tokens.zero_();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "upsample_add_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Taps<acc_t> ty(h, H), tx(w, W);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op = grad_tokens.mutable_data_ptr<scalar_t>();
    const int64_t rows_per_token = H / h + 2;  // about: a token row gathers this many output rows
    at::parallel_for(0, B * h, cpu::task_grain(rows_per_token * W * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> col(W * C), acc(C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / h, i = r % h;
        // col[x, c] = sum over the output rows y touching token row i of weight(y, i) * grad[b, y, x, c].
        std::fill(col.begin(), col.end(), acc_t(0));
        for (int64_t y = ty.lo[i]; y < ty.hi[i]; ++y) add_taps(col.data(), gp + (b * H + y) * W * C, W * C, ty, y, i);
        scalar_t* dst = op + r * w * C;
        for (int64_t j = 0; j < w; ++j) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t x = tx.lo[j]; x < tx.hi[j]; ++x) add_taps(acc.data(), col.data() + x * C, C, tx, x, j);
          for (int64_t c = 0; c < C; ++c) dst[j * C + c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
  return grad_tokens;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("upsample_add_fwd", &fastctx::upsample_add_fwd);
  m.impl("upsample_add_bwd", &fastctx::upsample_add_bwd);
}
