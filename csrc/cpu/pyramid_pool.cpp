// CPU backend of pyramid_pool (see docs/kernels.md, "pyramid_pool").
//
// One task per (b, c) plane, which is read from memory once for all scales.
// The height edges of all bins of all scales cut the rows into elementary
// segments: every bin's height range is a union of whole segments, and all
// rows of one segment lie in exactly the same bins.
// Forward: the rows of a segment are summed into one vector (one add per
// element), which is then added to the row accumulator of every bin row that
// contains the segment; at the end of the plane each bin sums its width range
// of its accumulator. Backward: every bin row's gradient / area is spread over
// the width once; the output row of a segment is the sum of the spread rows of
// the bins containing it, computed once and stored to each of its rows.
//
// Bin edges and their inverses are the shared FASTCTX_HOST_DEVICE functions
// of common/adaptive_pool.h (PyTorch's adaptive_avg_pool2d bins). The checks
// are the ones the loops' memory accesses and size arithmetic rely on;
// fastctx/ops validates user input before.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/adaptive_pool.h"
#include "cpu/parallel.h"
#include "cpu/output.h"

namespace fastctx {
namespace {

// Per scale: its bins' offset in S_tot and its row accumulators' offset in the
// per-task scratch buffer ([s x W] per scale).
struct Scale {
  int64_t s, bin_offset, acc_offset;
};

struct Pyramid {
  std::vector<Scale> scales;
  int64_t bins = 0;      // S_tot
  int64_t acc_size = 0;  // sum s * W
  // Elementary row segments [seg[j], seg[j + 1]).
  std::vector<int64_t> seg;
};

void check_data(const at::Tensor& t, const char* name, int64_t dim, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              op, " (cpu): ", name, " must be a contiguous ", dim, "-D float32/float64 CPU tensor, got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

// The bin layout of `scales` over an H x W map, for `planes` planes. Every
// size the kernels index with or allocate is checked against int64 overflow
// (the edge formulas multiply a bin index < s by H or W), and nothing here
// loops over more than min(s, H) bins of a scale: an absurd scale (2**40,
// which the public op refuses more kindly) fails at once instead of looping
// for minutes, and a merely huge one fails when its output is allocated.
Pyramid make_pyramid(at::IntArrayRef scales, int64_t planes, int64_t H, int64_t W, const char* op) {
  TORCH_CHECK(H >= 1 && W >= 1, op, ": the map must be at least 1x1, got ", H, "x", W);
  constexpr int64_t kMax = INT64_MAX;
  Pyramid p;
  std::vector<char> edge(H + 1, 0);
  edge[0] = edge[H] = 1;
  for (const int64_t s : scales) {
    TORCH_CHECK(s >= 1, op, ": every scale must be >= 1, got ", scales);
    TORCH_CHECK(s <= kMax / (std::max(H, W) + 1) && s <= kMax / s && s * s <= kMax - p.bins &&
                    s * W <= kMax - p.acc_size,
                op, ": scales ", scales, " overflow int64 sizes for a ", H, "x", W, " map");
    p.scales.push_back({s, p.bins, p.acc_size});
    p.bins += s * s;
    p.acc_size += s * W;
    if (s >= H) {
      // Bin starts floor(r*H/s) step by H/s <= 1 row: every row boundary is an edge.
      std::fill(edge.begin(), edge.end(), 1);
      continue;
    }
    for (int64_t r = 0; r < s; ++r) {
      edge[adaptive_bin_start(r, H, s)] = 1;
      edge[adaptive_bin_end(r, H, s)] = 1;
    }
  }
  TORCH_CHECK(p.bins <= kMax / std::max<int64_t>(planes, 1), op, ": ", planes, " planes of ", p.bins,
              " bins overflow int64");
  for (int64_t h = 0; h <= H; ++h) {
    if (edge[h]) p.seg.push_back(h);
  }
  return p;
}

at::Tensor pyramid_pool_fwd(const at::Tensor& x, at::IntArrayRef scales) {
  check_data(x, "x", 4, "pyramid_pool_fwd");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Pyramid py = make_pyramid(scales, B * C, H, W, "pyramid_pool_fwd");
  const int64_t S = py.bins;
  auto out = at::empty({B, C, S}, x.options());
  if (B * C == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyramid_pool_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, cpu::task_grain(H * W), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> acc(py.acc_size), seg(W);
      for (int64_t plane = p0; plane < p1; ++plane) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const scalar_t* xs = xp + plane * H * W;
        for (size_t j = 0; j + 1 < py.seg.size(); ++j) {
          const int64_t h0 = py.seg[j], h1 = py.seg[j + 1];
          // Column sums of the segment's rows.
          for (int64_t w = 0; w < W; ++w) seg[w] = static_cast<acc_t>(xs[h0 * W + w]);
          for (int64_t h = h0 + 1; h < h1; ++h) {
            const scalar_t* row = xs + h * W;
            for (int64_t w = 0; w < W; ++w) seg[w] += static_cast<acc_t>(row[w]);
          }
          for (const Scale& s : py.scales) {
            const int64_t r1 = adaptive_last_bin(h0, H, s.s);
            for (int64_t r = adaptive_first_bin(h0, H, s.s); r < r1; ++r) {
              acc_t* a = acc.data() + s.acc_offset + r * W;
              for (int64_t w = 0; w < W; ++w) a[w] += seg[w];
            }
          }
        }
        scalar_t* o = op + plane * S;
        for (const Scale& s : py.scales) {
          for (int64_t r = 0; r < s.s; ++r) {
            const acc_t* a = acc.data() + s.acc_offset + r * W;
            const int64_t hn = adaptive_bin_end(r, H, s.s) - adaptive_bin_start(r, H, s.s);
            for (int64_t q = 0; q < s.s; ++q) {
              const int64_t w0 = adaptive_bin_start(q, W, s.s), w1 = adaptive_bin_end(q, W, s.s);
              acc_t sum = 0;
              for (int64_t w = w0; w < w1; ++w) sum += a[w];
              o[s.bin_offset + r * s.s + q] = static_cast<scalar_t>(sum / acc_t(hn * (w1 - w0)));
            }
          }
        }
      }
    });
  });
  return out;
}

at::Tensor pyramid_pool_bwd(const at::Tensor& grad, at::IntArrayRef scales, int64_t height,
                            int64_t width) {
  check_data(grad, "grad", 3, "pyramid_pool_bwd");
  const int64_t B = grad.size(0), C = grad.size(1), H = height, W = width;
  // Allocated first: its size checks also bound the caller's height and width.
  auto dx = cpu::empty_output({B, C, H, W}, grad.options());
  const Pyramid py = make_pyramid(scales, B * C, H, W, "pyramid_pool_bwd");
  const int64_t S = py.bins;
  TORCH_CHECK(grad.size(2) == S, "pyramid_pool_bwd: grad has ", grad.size(2), " bins, scales ",
              scales, " have ", S);
  if (B * C == 0) return dx;

  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "pyramid_pool_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, cpu::task_grain(H * W), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> spread(py.acc_size), row(W);
      std::vector<scalar_t> out_row(W);
      for (int64_t plane = p0; plane < p1; ++plane) {
        const scalar_t* g = gp + plane * S;
        // spread[r][w] = sum over this scale's bins (r, q) containing w of grad / area.
        std::fill(spread.begin(), spread.end(), acc_t(0));
        for (const Scale& s : py.scales) {
          for (int64_t r = 0; r < s.s; ++r) {
            acc_t* a = spread.data() + s.acc_offset + r * W;
            const int64_t hn = adaptive_bin_end(r, H, s.s) - adaptive_bin_start(r, H, s.s);
            for (int64_t q = 0; q < s.s; ++q) {
              const int64_t w0 = adaptive_bin_start(q, W, s.s), w1 = adaptive_bin_end(q, W, s.s);
              const acc_t v =
                  static_cast<acc_t>(g[s.bin_offset + r * s.s + q]) / acc_t(hn * (w1 - w0));
              for (int64_t w = w0; w < w1; ++w) a[w] += v;
            }
          }
        }
        scalar_t* d = dp + plane * H * W;
        for (size_t j = 0; j + 1 < py.seg.size(); ++j) {
          const int64_t h0 = py.seg[j], h1 = py.seg[j + 1];
          std::fill(row.begin(), row.end(), acc_t(0));
          for (const Scale& s : py.scales) {
            const int64_t r1 = adaptive_last_bin(h0, H, s.s);
            for (int64_t r = adaptive_first_bin(h0, H, s.s); r < r1; ++r) {
              const acc_t* a = spread.data() + s.acc_offset + r * W;
              for (int64_t w = 0; w < W; ++w) row[w] += a[w];
            }
          }
          for (int64_t w = 0; w < W; ++w) out_row[w] = static_cast<scalar_t>(row[w]);
          for (int64_t h = h0; h < h1; ++h) {
            std::memcpy(d + h * W, out_row.data(), W * sizeof(scalar_t));
          }
        }
      }
    });
  });
  return dx;
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("pyramid_pool_fwd", &fastctx::pyramid_pool_fwd);
  m.impl("pyramid_pool_bwd", &fastctx::pyramid_pool_bwd);
}
