// CPU backend of gla_context (see docs/kernels.md, "gla_context").
//
// Work is split into (batch, group, pixel tile) units. Inside x, a tile of n
// pixels of one group is a [C x n] block of rows with stride N, so every
// product works on raw pointers without copies:
//   L  = W_g X_t + bias        [S_g x n]  BLAS (k = C), then sigmoid in place
//   Z_t = P_g A                [C x n]    rank-S_g update, written straight into z
// The [B, N, S_tot] affinity only ever exists as one [S_g x n] buffer per
// thread; the backward recomputes it from x.
//
// The k = C products go to BLAS. The rank-S_g updates (k = S_g is 1..36) are
// done by rank_update() below: BLAS packs both operands on every call, which
// for so short an inner dimension costs more than the product itself.
//
// Backward reductions over pixels (grad_weight, grad_bias, grad_pooled) go to
// per-chunk partial buffers (a chunk is a fixed run of tiles of one (b, g);
// the chunking depends on the shapes only, never on the thread count) and are
// then summed in a fixed order, so results are bit-identical run to run and
// across thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/activation.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/output.h"

namespace fastctx {
namespace {

using cpu::blas_gemm;
using cpu::kN;
using cpu::kT;
using cpu::Simd;
using cpu::SingleThreadedBlas;

// Pixels per tile. Rows of a tile are strided by N in memory; the forward
// streams x once and wants long rows for the hardware prefetcher while its
// [S_g x kTileFwd] affinity stays in L1. The backward packs its x and grad
// tiles (256 KiB each at C = 512) and keeps both in L2.
constexpr int64_t kTileFwd = 256;
constexpr int64_t kTileBwd = 128;

// ---------------------------------------------------------------------------
// Hand-written kernels: Simd<T> bodies inlined into FASTCTX_SIMD_CLONES entry
// points (cpu/parallel.h).
#pragma GCC diagnostic ignored "-Wpsabi"  // see Simd

// out[r, n] = sum_{k < K} coef[r*rs + k*ks] * a[k*lda + n]   for r < R, n < n_cur.
// Two output rows x 4 vectors of pixels are kept in registers while k runs, so
// each row of `a` loaded from L1 feeds two rows of output.
template <typename scalar_t>
__attribute__((always_inline)) inline void rank_update_body(
    int64_t R, int64_t K, int64_t n_cur, const scalar_t* coef, int64_t rs, int64_t ks,
    const scalar_t* a, int64_t lda, scalar_t* out, int64_t ldo) {
  using S = Simd<scalar_t>;
  using vec = typename S::vec;
  constexpr int kV = 4;
  constexpr int64_t kBlock = kV * S::kLanes;
  const int64_t n_vec = n_cur - n_cur % kBlock;
  int64_t r = 0;
  for (; r + 2 <= R; r += 2) {
    const scalar_t* c0 = coef + r * rs;
    const scalar_t* c1 = c0 + rs;
    scalar_t* o0 = out + r * ldo;
    scalar_t* o1 = o0 + ldo;
    for (int64_t n = 0; n < n_vec; n += kBlock) {
      vec acc0[kV] = {}, acc1[kV] = {};
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* ak = a + k * lda + n;
        const scalar_t b0 = c0[k * ks], b1 = c1[k * ks];
#pragma GCC unroll 4
        for (int j = 0; j < kV; ++j) {
          const vec v = S::load(ak + j * S::kLanes);
          acc0[j] += b0 * v;
          acc1[j] += b1 * v;
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < kV; ++j) {
        S::store(o0 + n + j * S::kLanes, acc0[j]);
        S::store(o1 + n + j * S::kLanes, acc1[j]);
      }
    }
    for (int64_t n = n_vec; n < n_cur; ++n) {
      scalar_t s0 = 0, s1 = 0;
      for (int64_t k = 0; k < K; ++k) {
        s0 += c0[k * ks] * a[k * lda + n];
        s1 += c1[k * ks] * a[k * lda + n];
      }
      o0[n] = s0;
      o1[n] = s1;
    }
  }
  for (; r < R; ++r) {
    const scalar_t* c0 = coef + r * rs;
    scalar_t* o0 = out + r * ldo;
    for (int64_t n = 0; n < n_vec; n += kBlock) {
      vec acc0[kV] = {};
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* ak = a + k * lda + n;
        const scalar_t b0 = c0[k * ks];
#pragma GCC unroll 4
        for (int j = 0; j < kV; ++j) acc0[j] += b0 * S::load(ak + j * S::kLanes);
      }
#pragma GCC unroll 4
      for (int j = 0; j < kV; ++j) S::store(o0 + n + j * S::kLanes, acc0[j]);
    }
    for (int64_t n = n_vec; n < n_cur; ++n) {
      scalar_t s0 = 0;
      for (int64_t k = 0; k < K; ++k) s0 += c0[k * ks] * a[k * lda + n];
      o0[n] = s0;
    }
  }
}

FASTCTX_SIMD_CLONES void rank_update(int64_t R, int64_t K, int64_t n_cur, const float* coef,
                                     int64_t rs, int64_t ks, const float* a, int64_t lda,
                                     float* out, int64_t ldo) {
  rank_update_body(R, K, n_cur, coef, rs, ks, a, lda, out, ldo);
}

FASTCTX_SIMD_CLONES void rank_update(int64_t R, int64_t K, int64_t n_cur, const double* coef,
                                     int64_t rs, int64_t ks, const double* a, int64_t lda,
                                     double* out, int64_t ldo) {
  rank_update_body(R, K, n_cur, coef, rs, ks, a, lda, out, ldo);
}

// Logits -> sigmoid in place, bias added per row k. a is [S_g x n_cur], ld lda.
template <typename scalar_t>
void bias_sigmoid(scalar_t* a, int64_t lda, int64_t S_g, int64_t n_cur, const scalar_t* bias) {
  for (int64_t k = 0; k < S_g; ++k) {
    scalar_t* row = a + k * lda;
    const scalar_t bk = bias[k];
    for (int64_t n = 0; n < n_cur; ++n) row[n] = stable_sigmoid<scalar_t>(row[n] + bk);
  }
}

// d <- d * A (1 - A) in place (dA -> dL); sums[k] += sum_n dL[k, n]. d and a
// are [S_g x n_cur] with row stride ld. Row sums use per-lane accumulators: a
// fixed order, and vectorisable.
template <typename scalar_t>
__attribute__((always_inline)) inline void sigmoid_backward_body(
    scalar_t* d, const scalar_t* a, int64_t ld, int64_t S_g, int64_t n_cur, scalar_t* sums) {
  using S = Simd<scalar_t>;
  using vec = typename S::vec;
  const int64_t n_vec = n_cur - n_cur % S::kLanes;
  for (int64_t k = 0; k < S_g; ++k) {
    scalar_t* dk = d + k * ld;
    const scalar_t* ak = a + k * ld;
    vec acc = {};
    for (int64_t n = 0; n < n_vec; n += S::kLanes) {
      const vec av = S::load(ak + n);
      const vec dl = S::load(dk + n) * (av * (scalar_t(1) - av));
      S::store(dk + n, dl);
      acc += dl;
    }
    scalar_t sum = 0;
    for (int j = 0; j < S::kLanes; ++j) sum += acc[j];
    for (int64_t n = n_vec; n < n_cur; ++n) {
      dk[n] *= sigmoid_grad_from_output(ak[n]);
      sum += dk[n];
    }
    sums[k] += sum;
  }
}

FASTCTX_SIMD_CLONES void sigmoid_backward(float* d, const float* a, int64_t ld, int64_t S_g,
                                          int64_t n_cur, float* sums) {
  sigmoid_backward_body(d, a, ld, S_g, n_cur, sums);
}

FASTCTX_SIMD_CLONES void sigmoid_backward(double* d, const double* a, int64_t ld, int64_t S_g,
                                          int64_t n_cur, double* sums) {
  sigmoid_backward_body(d, a, ld, S_g, n_cur, sums);
}

// Copies a [C x n_cur] block of rows with stride N into a dense buffer with
// row stride ld. The backward reads each tile twice through BLAS; with N a
// power of two the strided rows alias in the cache sets, the dense copy does not.
template <typename scalar_t>
void pack_tile(scalar_t* dst, int64_t ld, const scalar_t* src, int64_t N, int64_t C,
               int64_t n_cur) {
  for (int64_t c = 0; c < C; ++c) {
    std::memcpy(dst + c * ld, src + c * N, n_cur * sizeof(scalar_t));
  }
}

// ---------------------------------------------------------------------------
// Checks: the ones the loops' memory accesses and the BLAS calls rely on
// (device, dtype, contiguity, shapes, 32-bit BLAS sizes); fastctx/ops
// validates user input before.

struct Groups {
  std::vector<int64_t> size;    // S_g
  std::vector<int64_t> offset;  // o_g
  int64_t total = 0;            // S_tot
  int64_t max = 0;
};

Groups make_groups(at::IntArrayRef group_sizes) {
  Groups g;
  TORCH_CHECK(!group_sizes.empty(), "gla_context (cpu): group_sizes must not be empty");
  for (const int64_t s : group_sizes) {
    // S_tot is a BLAS leading dimension (pooled's rows): a 32-bit int, and no
    // overflowed sum can pass for weight's row count.
    TORCH_CHECK(s >= 1 && s <= INT32_MAX - g.total, "gla_context (cpu): group sizes ", group_sizes,
                " must be >= 1 with a sum below 2^31");
    g.size.push_back(s);
    g.offset.push_back(g.total);
    g.total += s;
    g.max = std::max(g.max, s);
  }
  return g;
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), "gla_context (cpu): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == dim, "gla_context: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "gla_context: ", name, " must be contiguous (NCHW for x/grad)");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gla_context: ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type());
}

struct Dims {
  int64_t B, G, C, N;
};

Dims check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& pooled, const Groups& groups) {
  check_tensor(x, "x", 4, x);
  check_tensor(weight, "weight", 2, x);
  check_tensor(bias, "bias", 2, x);
  check_tensor(pooled, "pooled", 3, x);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gla_context (cpu): x must be float32 or float64, got ", x.scalar_type());
  const int64_t B = x.size(0), G = static_cast<int64_t>(groups.size.size());
  TORCH_CHECK(x.size(1) % G == 0, "gla_context: x has ", x.size(1),
              " channels, expected a multiple of the number of groups ", G);
  const int64_t C = x.size(1) / G, N = x.size(2) * x.size(3), S = groups.total;
  TORCH_CHECK(N <= INT32_MAX && C <= INT32_MAX,
              "gla_context (cpu): H*W and C must fit in a 32-bit BLAS int");
  TORCH_CHECK(weight.size(0) == S && weight.size(1) == C, "gla_context: weight must be [S_tot=",
              S, ", C=", C, "], got ", weight.sizes());
  TORCH_CHECK(bias.size(0) == B && bias.size(1) == S, "gla_context: bias must be [B=", B,
              ", S_tot=", S, "], got ", bias.sizes());
  TORCH_CHECK(pooled.size(0) == B && pooled.size(1) == C && pooled.size(2) == S,
              "gla_context: pooled must be [B=", B, ", C=", C, ", S_tot=", S, "], got ",
              pooled.sizes());
  return {B, G, C, N};
}

// ---------------------------------------------------------------------------
// Forward

at::Tensor gla_context_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& pooled, at::IntArrayRef group_sizes) {
  const Groups groups = make_groups(group_sizes);
  const auto [B, G, C, N] = check_inputs(x, weight, bias, pooled, groups);
  auto z = cpu::empty_output_like(x);
  if (z.numel() == 0) return z;
  const int64_t S = groups.total;
  const int64_t n_tiles = (N + kTileFwd - 1) / kTileFwd;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gla_context_fwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    const scalar_t* pp = pooled.const_data_ptr<scalar_t>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();

    at::parallel_for(0, B * G * n_tiles, 1, [&](int64_t begin, int64_t end) {
      SingleThreadedBlas blas_guard;
      // ATen's allocator aligns to 64 bytes; MKL's summation order may depend
      // on the alignment, so a fixed one keeps results reproducible.
      auto a_buf = at::empty({groups.max * kTileFwd}, x.options());
      scalar_t* a = a_buf.mutable_data_ptr<scalar_t>();  // A, [S_g x kTileFwd]
      for (int64_t u = begin; u < end; ++u) {
        // Tile outermost: at::parallel_for hands each thread a contiguous range
        // of units, which then spans all groups (their costs differ with S_g).
        const int64_t g = u % G, b = (u / G) % B, tile = u / (G * B);
        const int64_t n0 = tile * kTileFwd, n_cur = std::min(kTileFwd, N - n0);
        const int64_t S_g = groups.size[g], o_g = groups.offset[g];
        const int64_t tile_off = (b * G + g) * C * N + n0;  // x/z[b, g*C, n0]
        // L^T [n_cur x S_g] (col-major, ld kTileFwd) = X_t^T [n_cur x C] W_g^T [C x S_g]
        blas_gemm(kN, kN, n_cur, S_g, C, scalar_t(1), xp + tile_off, N, wp + o_g * C, C,
                  scalar_t(0), a, kTileFwd);
        bias_sigmoid(a, kTileFwd, S_g, n_cur, bp + b * S + o_g);
        // z[c, n] = sum_k pooled[b, c, o_g + k] A[k, n]
        rank_update(C, S_g, n_cur, pp + b * C * S + o_g, S, 1, a, kTileFwd, zp + tile_off, N);
      }
    });
  });
  return z;
}

// ---------------------------------------------------------------------------
// Backward

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gla_context_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& pooled, at::IntArrayRef group_sizes) {
  const Groups groups = make_groups(group_sizes);
  const auto [B, G, C, N] = check_inputs(x, weight, bias, pooled, groups);
  check_tensor(grad, "grad", 4, x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "gla_context: grad must have x's shape ", x.sizes(),
              ", got ", grad.sizes());
  const int64_t S = groups.total;

  auto grad_x = cpu::empty_output_like(x);
  auto grad_weight = at::zeros_like(weight);
  auto grad_bias = at::zeros_like(bias);
  auto grad_pooled = at::zeros_like(pooled);
  if (grad_x.numel() == 0) return {grad_x, grad_weight, grad_bias, grad_pooled};

  // Chunking is a function of the shapes only (determinism across thread counts).
  const int64_t n_tiles = (N + kTileBwd - 1) / kTileBwd;
  const cpu::ChunkPlan plan = cpu::plan_chunks(B * G, n_tiles);
  const int64_t tiles_per_chunk = plan.tiles_per_chunk;
  const int64_t n_chunks = plan.chunks_per_row;  // per (b, g)

  // Partials per (b, chunk); group g's rows are k in [o_g, o_g + S_g):
  //   part_w [B, n_chunks, S_tot, C]  sum_n dL[k, n] x[c, n]
  //   part_p [B, n_chunks, S_tot, C]  sum_n A[k, n] grad[c, n]  (grad_pooled transposed)
  //   part_b [B, n_chunks, S_tot]     sum_n dL[k, n]
  auto part_w = at::empty({B, n_chunks, S, C}, x.options());
  auto part_p = at::empty({B, n_chunks, S, C}, x.options());
  auto part_b = at::empty({B, n_chunks, S}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gla_context_bwd", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    const scalar_t* pp = pooled.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* pwp = part_w.mutable_data_ptr<scalar_t>();
    scalar_t* ppp = part_p.mutable_data_ptr<scalar_t>();
    scalar_t* pbp = part_b.mutable_data_ptr<scalar_t>();

    at::parallel_for(0, B * G * n_chunks, 1, [&](int64_t begin, int64_t end) {
      SingleThreadedBlas blas_guard;
      // 64-byte aligned (ATen allocator), see the forward.
      auto bufs = at::empty({2 * (C + groups.max) * kTileBwd}, x.options());
      scalar_t* xt = bufs.mutable_data_ptr<scalar_t>();  // x tile    [C x kTileBwd]
      scalar_t* gt = xt + C * kTileBwd;                  // grad tile [C x kTileBwd]
      scalar_t* a = gt + C * kTileBwd;                   // A         [S_g x kTileBwd]
      scalar_t* d = a + groups.max * kTileBwd;           // dA -> dL  [S_g x kTileBwd]
      for (int64_t u = begin; u < end; ++u) {
        // Chunk outermost, for load balance across groups as in the forward.
        const int64_t g = u % G, b = (u / G) % B, chunk = u / (G * B);
        const int64_t S_g = groups.size[g], o_g = groups.offset[g];
        const scalar_t* w_g = wp + o_g * C;          // [S_g, C] row-major
        const scalar_t* p_g = pp + b * C * S + o_g;  // [C, S_g], row stride S
        const int64_t part = (b * n_chunks + chunk) * S + o_g;
        scalar_t* pw = pwp + part * C;  // [S_g, C] row-major = col-major [C x S_g]
        scalar_t* pq = ppp + part * C;
        scalar_t* pb = pbp + part;
        std::fill(pw, pw + S_g * C, scalar_t(0));
        std::fill(pq, pq + S_g * C, scalar_t(0));
        std::fill(pb, pb + S_g, scalar_t(0));

        const int64_t t_end = std::min(n_tiles, (chunk + 1) * tiles_per_chunk);
        for (int64_t tile = chunk * tiles_per_chunk; tile < t_end; ++tile) {
          const int64_t n0 = tile * kTileBwd, n_cur = std::min(kTileBwd, N - n0);
          const int64_t tile_off = (b * G + g) * C * N + n0;
          pack_tile(xt, kTileBwd, xp + tile_off, N, C, n_cur);
          pack_tile(gt, kTileBwd, gp + tile_off, N, C, n_cur);
          // A = sigmoid(W_g X_t + bias), recomputed.
          blas_gemm(kN, kN, n_cur, S_g, C, scalar_t(1), xt, kTileBwd, w_g, C, scalar_t(0), a,
                    kTileBwd);
          bias_sigmoid(a, kTileBwd, S_g, n_cur, bp + b * S + o_g);
          // dA^T [n_cur x S_g] = G_t^T [n_cur x C] P_g [C x S_g]
          blas_gemm(kN, kT, n_cur, S_g, C, scalar_t(1), gt, kTileBwd, p_g, S, scalar_t(0), d,
                    kTileBwd);
          sigmoid_backward(d, a, kTileBwd, S_g, n_cur, pb);
          // grad_pooled^T partial [C x S_g] += G_t [C x n_cur] A^T [n_cur x S_g]
          blas_gemm(kT, kN, C, S_g, n_cur, scalar_t(1), gt, kTileBwd, a, kTileBwd, scalar_t(1),
                    pq, C);
          // grad_weight^T partial [C x S_g] += X_t dL^T
          blas_gemm(kT, kN, C, S_g, n_cur, scalar_t(1), xt, kTileBwd, d, kTileBwd, scalar_t(1),
                    pw, C);
          // grad_x[c, n] = sum_k weight[o_g + k, c] dL[k, n]
          rank_update(C, S_g, n_cur, w_g, 1, C, d, kTileBwd, gxp + tile_off, N);
        }
      }
    });

    // Fixed-order reductions of the partials.
    scalar_t* gwp = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = grad_bias.mutable_data_ptr<scalar_t>();
    scalar_t* gpp = grad_pooled.mutable_data_ptr<scalar_t>();
    const int64_t SC = S * C;
    // grad_weight[k, c]: sum over (b, chunk), in order.
    at::parallel_for(0, S, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        scalar_t* out = gwp + k * C;
        for (int64_t i = 0; i < B * n_chunks; ++i) {
          const scalar_t* src = pwp + i * SC + k * C;
          for (int64_t c = 0; c < C; ++c) out[c] += src[c];
        }
      }
    });
    // grad_pooled[b, c, k] and grad_bias[b, k]: sum over chunks, in order.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> acc(SC);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
          const scalar_t* src = ppp + (b * n_chunks + ch) * SC;
          for (int64_t i = 0; i < SC; ++i) acc[i] += src[i];
          const scalar_t* srcb = pbp + (b * n_chunks + ch) * S;
          for (int64_t k = 0; k < S; ++k) gbp[b * S + k] += srcb[k];
        }
        scalar_t* out = gpp + b * C * S;  // [C, S]
        for (int64_t k = 0; k < S; ++k)
          for (int64_t c = 0; c < C; ++c) out[c * S + k] = acc[k * C + c];
      }
    });
  });
  return {grad_x, grad_weight, grad_bias, grad_pooled};
}

}  // namespace
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("gla_context_fwd", &fastctx::gla_context_fwd);
  m.impl("gla_context_bwd", &fastctx::gla_context_bwd);
}
