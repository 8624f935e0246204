// CPU backend of class_attention (contract: docs/kernels.md, "class_attention";
// maths: fastctx/ops/class_attention.py).
//
// Work unit: a tile of n pixels of one image. query, grad and out tiles are
// C rows of n pixels, rows N = H*W apart in NCHW; a tile is read from memory
// once (into a dense per-thread buffer, cpu/class_tiles.h pack_rows, where it
// is used twice) and outputs are written in place. The [K x n] scores and
// attention of a tile live in per-thread buffers: no [B, N, K] tensor and no
// permuted copy exists.
//
// Forward, per tile (independent):
//   S = keys Q [K x n] (tile_gemm over Cq), or the logits tile read in place
//   A = softmax over classes of scale * S, pixel by pixel; lse_n saved
//   out tile = V^T A [Cv x n] (tile_gemm over K), written in place
// Backward, per tile, flash-attention style (A recomputed from lse):
//   A = exp(scale * S - lse);  dA = V G [K x n] (tile_gemm over Cv)
//   dS = scale A (dA - sum_k A dA)  (the reference's softmax backward: its row
//        sum sum_k a_nk dA_nk equals grad_n . out_n without reading out)
//   grad_values^T [Cv x K] += G A^T      (chunk partial)
//   query form:  grad_query tile = keys^T dS [Cq x n], written in place
//                grad_keys^T [Cq x K] += Q dS^T   (chunk partial)
//   logits form: grad_logits tile = dS, written in place
// The sums over pixels go to per-chunk partials (chunks: a fixed run of tiles
// of one image, planned from the shapes only, cpu/parallel.h) merged in chunk
// order: results are identical for any thread count. The partials are
// [chunks, Cv + Cq, Kp] (Kp: K padded to whole vectors); a chunk holds >= 16
// Kp pixels or a whole image, so they stay below 1/16 of the tiles they sum on
// maps of at least 16 Kp pixels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/class_tiles.h"
#include "cpu/output.h"
#include "cpu/parallel.h"

namespace fastctx {
namespace {

// Sizes, and which form: query (with keys) or logits.
struct Dims {
  int64_t B, K, Cq, Cv, N, H, W;
  bool query_form;
};

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype,
                  const char* fn) {
  TORCH_CHECK(t.device().is_cpu(), fn, " (cpu): expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": expected ", name, " of dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), fn, ": expected a contiguous ", dim, "-D ", name,
              ", got shape ", t.sizes(), " and strides ", t.strides());
}

// The checks the loops' memory accesses rely on; fastctx/ops validates user input before.
Dims check_inputs(const std::optional<at::Tensor>& query, const std::optional<at::Tensor>& keys,
                  const at::Tensor& values, const std::optional<at::Tensor>& logits,
                  const char* fn) {
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, fn,
              " (cpu): expected values of dtype float32 or float64, got ", values.scalar_type());
  const at::ScalarType dtype = values.scalar_type();
  check_tensor(values, "values", 3, dtype, fn);
  TORCH_CHECK(query.has_value() != logits.has_value(), fn,
              ": expected exactly one of query and logits");
  Dims d{};
  d.B = values.size(0);
  d.K = values.size(1);
  d.Cv = values.size(2);
  d.query_form = query.has_value();
  const at::Tensor& source = d.query_form ? *query : *logits;
  check_tensor(source, d.query_form ? "query" : "logits", 4, dtype, fn);
  d.H = source.size(2);
  d.W = source.size(3);
  d.N = d.H * d.W;
  if (d.query_form) {
    TORCH_CHECK(keys.has_value(), fn, ": expected keys with a query");
    check_tensor(*keys, "keys", 3, dtype, fn);
    d.Cq = query->size(1);
    TORCH_CHECK(query->size(0) == d.B && keys->size(0) == d.B && keys->size(1) == d.K &&
                    keys->size(2) == d.Cq,
                fn, ": expected query [B, Cq, H, W] and keys [B, K, Cq] for values [B, K, Cv] ",
                values.sizes(), ", got ", query->sizes(), " and ", keys->sizes());
  } else {
    TORCH_CHECK(logits->size(0) == d.B && logits->size(1) == d.K, fn,
                ": expected logits [B, K, H, W] for values [B, K, Cv] ", values.sizes(), ", got ",
                logits->sizes());
  }
  TORCH_CHECK(d.B >= 1 && d.K >= 1 && d.Cv >= 1 && d.N >= 1 && (!d.query_form || d.Cq >= 1), fn,
              ": expected non-empty tensors, got values ", values.sizes(), " and a map ",
              source.sizes());
  return d;
}

// ~64K elements per tile across the maps a tile reads or writes (query and
// grad in the backward: 256 KiB in fp32), so the dense tiles and the [K x n]
// buffers stay in a 1-2 MiB L2. Multiples of 16 pixels: tile_gemm's rows are
// whole vectors except at an image's end.
constexpr int64_t kTileElems = 1 << 16;
constexpr int64_t kMinTile = 16, kMaxTile = 512;
constexpr int64_t kMinChunkPixelsPerClass = 16;

int64_t tile_pixels(int64_t channels) {
  return std::clamp<int64_t>(kTileElems / channels / kMinTile * kMinTile, kMinTile, kMaxTile);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// Forward

template <typename T>
void attention_fwd_impl(const T* query, const T* keys, const T* values, const T* logits, T scale,
                        const Dims& d, T* out, T* lse) {
  const int64_t K = d.K, Cq = d.Cq, Cv = d.Cv, N = d.N;
  const int64_t tile_n = tile_pixels(std::max(d.query_form ? Cq : 0, Cv));
  const int64_t n_tiles = (N + tile_n - 1) / tile_n;
  at::parallel_for(0, d.B * n_tiles, 1, [&](int64_t u_begin, int64_t u_end) {
    // Zeroed once: tile_gemm runs whole vectors past a short last tile; what
    // it reads there must be finite (stale values of earlier tiles are).
    std::vector<T> bufs(K * tile_n + (d.query_form ? Cq * tile_n : 0), T(0));
    T* a = bufs.data();        // S, then A [K x tile_n]
    T* qt = a + K * tile_n;    // query tile [Cq x tile_n]
    for (int64_t u = u_begin; u < u_end; ++u) {
      const int64_t b = u / n_tiles, n0 = (u % n_tiles) * tile_n;
      const int64_t nc = std::min(tile_n, N - n0);
      const T* s = a;
      int64_t lds = tile_n;
      if (d.query_form) {
        cpu::pack_rows(qt, tile_n, query + b * Cq * N + n0, N, Cq, nc);
        // S [K x nc] = keys [K x Cq] Q [Cq x nc]
        cpu::tile_gemm<T>(K, Cq, round_up(nc, 16), keys + b * K * Cq, Cq, 1, qt, tile_n, a, tile_n,
                          false);
      } else {
        s = logits + b * K * N + n0;
        lds = N;
      }
      cpu::softmax_columns(a, tile_n, s, lds, K, nc, scale, lse + b * N + n0);
      // out tile [Cv x nc] = V^T [Cv x K] A [K x nc]
      cpu::tile_gemm<T>(Cv, K, nc, values + b * K * Cv, 1, Cv, a, tile_n, out + b * Cv * N + n0, N,
                        false);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> class_attention_fwd(const std::optional<at::Tensor>& query,
                                                       const std::optional<at::Tensor>& keys,
                                                       const at::Tensor& values,
                                                       const std::optional<at::Tensor>& logits,
                                                       double scale) {
  const Dims d = check_inputs(query, keys, values, logits, "class_attention_fwd");
  auto out = cpu::empty_output({d.B, d.Cv, d.H, d.W}, values.options());
  auto lse = at::empty({d.B, d.N}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "class_attention_fwd", [&] {
    using T = scalar_t;
    attention_fwd_impl<T>(d.query_form ? query->const_data_ptr<T>() : nullptr,
                          d.query_form ? keys->const_data_ptr<T>() : nullptr,
                          values.const_data_ptr<T>(),
                          d.query_form ? nullptr : logits->const_data_ptr<T>(),
                          static_cast<T>(scale), d, out.mutable_data_ptr<T>(),
                          lse.mutable_data_ptr<T>());
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------
// Backward

template <typename T>
struct BackwardArgs {
  const T *grad, *query, *keys, *values, *logits, *lse;
  T scale;
  T *grad_query, *grad_keys, *grad_values, *grad_logits;
};

template <typename T>
void attention_bwd_impl(const BackwardArgs<T>& p, const Dims& d, const at::TensorOptions& options) {
  const int64_t K = d.K, Cq = d.query_form ? d.Cq : 0, Cv = d.Cv, N = d.N;
  const int64_t Kp = round_up(K, 16);  // class vectors padded to whole vectors
  const int64_t tile_n = tile_pixels(Cq + Cv);
  const int64_t n_tiles = (N + tile_n - 1) / tile_n;
  const int64_t min_tiles = (kMinChunkPixelsPerClass * Kp + tile_n - 1) / tile_n;
  const cpu::ChunkPlan plan = cpu::plan_chunks(d.B, n_tiles, min_tiles);
  // Per chunk: grad_values^T [Cv, Kp] and grad_keys^T [Cq, Kp].
  auto partial = at::empty({plan.chunks, Cv + Cq, Kp}, options);
  T* part_all = partial.mutable_data_ptr<T>();

  at::parallel_for(0, plan.chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    // Zeroed once: the padding columns of the transposed tiles stay 0, and
    // whatever tile_gemm reads past a short last tile is finite.
    std::vector<T> bufs((2 * K + Cv + Cq) * tile_n + tile_n * Kp, T(0));
    T* a = bufs.data();                 // S, then A [K x tile_n]
    T* da = a + K * tile_n;             // dA, then dS [K x tile_n]
    T* gt = da + K * tile_n;            // grad tile [Cv x tile_n]
    T* qt = gt + Cv * tile_n;           // query tile [Cq x tile_n]
    T* xt = qt + Cq * tile_n;           // A^T or dS^T [tile_n x Kp]
    for (int64_t chunk = c_begin; chunk < c_end; ++chunk) {
      const int64_t b = chunk / plan.chunks_per_row;
      const int64_t t0 = (chunk % plan.chunks_per_row) * plan.tiles_per_chunk;
      const int64_t t1 = std::min(t0 + plan.tiles_per_chunk, n_tiles);
      const T* values_b = p.values + b * K * Cv;
      const T* keys_b = d.query_form ? p.keys + b * K * Cq : nullptr;
      T* gv_t = part_all + chunk * (Cv + Cq) * Kp;  // [Cv x Kp]
      T* gk_t = gv_t + Cv * Kp;                     // [Cq x Kp]
      std::fill(gv_t, gv_t + (Cv + Cq) * Kp, T(0));
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n0 = tile * tile_n, nc = std::min(tile_n, N - n0);
        const int64_t nv = round_up(nc, 16);  // whole vectors over tile buffers
        cpu::pack_rows(gt, tile_n, p.grad + b * Cv * N + n0, N, Cv, nc);
        const T* s = a;
        int64_t lds = tile_n;
        if (d.query_form) {
          cpu::pack_rows(qt, tile_n, p.query + b * Cq * N + n0, N, Cq, nc);
          cpu::tile_gemm<T>(K, Cq, nv, keys_b, Cq, 1, qt, tile_n, a, tile_n, false);
        } else {
          s = p.logits + b * K * N + n0;
          lds = N;
        }
        cpu::exp_columns(a, tile_n, s, lds, K, nc, p.scale, p.lse + b * N + n0);
        // dA [K x nc] = V [K x Cv] G [Cv x nc]
        cpu::tile_gemm<T>(K, Cv, nv, values_b, Cv, 1, gt, tile_n, da, tile_n, false);
        // grad_values^T [Cv x Kp] += G [Cv x nc] A^T [nc x Kp]
        cpu::transpose_rows(xt, Kp, a, tile_n, K, nc);
        cpu::tile_gemm<T>(Cv, nc, Kp, gt, tile_n, 1, xt, Kp, gv_t, Kp, true);
        if (d.query_form) {
          cpu::softmax_grad_columns(da, tile_n, a, tile_n, da, tile_n,
                                    static_cast<const T*>(nullptr), K, nc, p.scale);
          // grad_query tile [Cq x nc] = keys^T [Cq x K] dS [K x nc]
          cpu::tile_gemm<T>(Cq, K, nc, keys_b, 1, Cq, da, tile_n, p.grad_query + b * Cq * N + n0, N,
                            false);
          // grad_keys^T [Cq x Kp] += Q [Cq x nc] dS^T [nc x Kp]
          cpu::transpose_rows(xt, Kp, da, tile_n, K, nc);
          cpu::tile_gemm<T>(Cq, nc, Kp, qt, tile_n, 1, xt, Kp, gk_t, Kp, true);
        } else {
          cpu::softmax_grad_columns(p.grad_logits + b * K * N + n0, N, a, tile_n, da, tile_n,
                                    static_cast<const T*>(nullptr), K, nc, p.scale);
        }
      }
    }
  });

  // grad_values[b, k, :] and grad_keys[b, k, :]: the image's chunks, in order.
  const int64_t per_row = plan.chunks_per_row;
  at::parallel_for(0, d.B * K, cpu::task_grain(per_row * (Cv + Cq)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / K, k = r % K;
      // column k of the image's first partial
      const T* first = part_all + b * per_row * (Cv + Cq) * Kp + k;
      T* gv = p.grad_values + r * Cv;
      T* gk = d.query_form ? p.grad_keys + r * Cq : nullptr;
      std::fill(gv, gv + Cv, T(0));
      if (gk != nullptr) std::fill(gk, gk + Cq, T(0));
      for (int64_t j = 0; j < per_row; ++j) {
        const T* part = first + j * (Cv + Cq) * Kp;
        for (int64_t c = 0; c < Cv; ++c) gv[c] += part[c * Kp];
        for (int64_t c = 0; c < Cq; ++c) gk[c] += part[(Cv + c) * Kp];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_attention_bwd(
    const at::Tensor& grad, const std::optional<at::Tensor>& query,
    const std::optional<at::Tensor>& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& logits, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  const char* fn = "class_attention_bwd";
  const Dims d = check_inputs(query, keys, values, logits, fn);
  const at::ScalarType dtype = values.scalar_type();
  check_tensor(grad, "grad", 4, dtype, fn);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({d.B, d.Cv, d.H, d.W}), fn,
              ": expected grad of shape [B, Cv, H, W] = ", at::IntArrayRef({d.B, d.Cv, d.H, d.W}),
              ", got ", grad.sizes());
  check_tensor(lse, "lse", 2, dtype, fn);
  TORCH_CHECK(lse.size(0) == d.B && lse.size(1) == d.N, fn, ": expected lse of shape [B, N] = [",
              d.B, ", ", d.N, "], got ", lse.sizes());
  (void)out;  // the softmax backward's row sums come from A and dA (see above)
  const auto options = values.options();
  auto grad_query = d.query_form ? cpu::empty_output_like(*query) : at::empty({0}, options);
  auto grad_keys = d.query_form ? at::empty_like(*keys) : at::empty({0}, options);
  auto grad_values = at::empty_like(values);
  auto grad_logits = d.query_form ? at::empty({0}, options) : cpu::empty_output_like(*logits);
  AT_DISPATCH_FLOATING_TYPES(dtype, "class_attention_bwd", [&] {
    using T = scalar_t;
    BackwardArgs<T> p{};
    p.grad = grad.const_data_ptr<T>();
    p.values = values.const_data_ptr<T>();
    p.lse = lse.const_data_ptr<T>();
    p.scale = static_cast<T>(scale);
    p.grad_values = grad_values.mutable_data_ptr<T>();
    if (d.query_form) {
      p.query = query->const_data_ptr<T>();
      p.keys = keys->const_data_ptr<T>();
      p.grad_query = grad_query.mutable_data_ptr<T>();
      p.grad_keys = grad_keys.mutable_data_ptr<T>();
    } else {
      p.logits = logits->const_data_ptr<T>();
      p.grad_logits = grad_logits.mutable_data_ptr<T>();
    }
    attention_bwd_impl<T>(p, d, options);
  });
  return {grad_query, grad_keys, grad_values, grad_logits};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("class_attention_fwd", &fastctx::class_attention_fwd);
  m.impl("class_attention_bwd", &fastctx::class_attention_bwd);
}
