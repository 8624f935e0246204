// The Encoding layer's CUDA kernels (csrc/cuda/encoding_kernel.cuh: prep,
// norms, tile, fixup, reduce; launched as encoding_plan says) under emu.h,
// against a float64 reference of E = sum_i softmax_k(s_k ||x_i - c_k||^2) (x_i - c_k)
// and its gradients.
//
// Cases reach both padded codeword widths (KP = 32, 64), several logit and
// aggregation channel chunks with D % 4 != 0, ragged pixel tiles, x
// channels-first and channels-last, the 4-wide and scalar grad_x stores, more
// than one tile block (partial slot) per image, inputs of norm ~1e3 lying
// near the codewords, and near one-hot assignments, where fp32 grad_scale and
// grad_codewords must stay within the "peaked" tolerance of float64 (the
// backward's shifted softmax gradient). Spread codewords (spread 1 to 1000):
// the pixels the tile kernels flag go through the fixup kernels, whose E and
// gradients must meet the fp32 tolerance; every flag byte is written.
#include "emu.h"
#include "driver.h"

#include "cuda/encoding_kernel.cuh"
#include "cuda/encoding_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, N, D, K;
  bool channels_first;
  bool aligned;        // grad_x 16-byte aligned (false: the scalar store path)
  int64_t sm_count;    // with blocks_per_sm, sizes the tile blocks per image
  int64_t blocks_per_sm;
  enum Inputs { kUniform, kFarNear, kPeaked, kSpread } inputs;
  double spread = 0;   // kSpread: the codewords' scale
};

template <typename T>
struct Data {
  std::vector<T> x, codewords, scale, grad;
};

// Uniform: x, c in [-1, 1), s in [-2, -0.5). FarNear: ||x|| ~ 1e3 with x and
// c within O(1) of a common centre. Peaked: well separated codewords and a
// large |s|, so each pixel's assignment is near one-hot. Spread (as
// tests/ops/test_encoding.py's _spread_inputs): codewords spread * randn, of
// which (0, 1), (2, 3), (4, 5) are pairs 0.5 randn apart, features 0.5 randn
// from one codeword, s = -(U(0, 1) + 0.1) / 10: the entries that matter have
// ||x'||^2 ~ ||c'_k||^2 ~ spread^2 D against a distance ~0.25 D.
template <typename T>
Data<T> make_data(const Shape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1, 1);
  const size_t nx = static_cast<size_t>(s.B) * s.N * s.D;
  Data<T> d;
  d.x.resize(nx);
  d.codewords.resize(static_cast<size_t>(s.K) * s.D);
  d.scale.resize(s.K);
  if (s.inputs == Shape::kSpread) {
    std::normal_distribution<double> n01(0, 1);
    std::uniform_real_distribution<double> u01(0, 1);
    std::vector<double> c(d.codewords.size());
    for (int k = 0; k < s.K; ++k)
      for (int j = 0; j < s.D; ++j)
        c[k * s.D + j] = k % 2 == 1 && k < 6 ? c[(k - 1) * s.D + j] + 0.5 * n01(rng) : s.spread * n01(rng);
    for (size_t e = 0; e < c.size(); ++e) d.codewords[e] = static_cast<T>(c[e]);
    for (int k = 0; k < s.K; ++k) d.scale[k] = static_cast<T>(-(u01(rng) + 0.1) * 0.1);
    for (int b = 0; b < s.B; ++b)
      for (int i = 0; i < s.N; ++i) {
        const int k = static_cast<int>(rng() % s.K);
        for (int j = 0; j < s.D; ++j) {
          const size_t idx = s.channels_first ? (static_cast<size_t>(b) * s.D + j) * s.N + i
                                              : (static_cast<size_t>(b) * s.N + i) * s.D + j;
          d.x[idx] = static_cast<T>(c[k * s.D + j] + 0.5 * n01(rng));
        }
      }
    d.grad.resize(static_cast<size_t>(s.B) * s.K * s.D);
    for (auto& v : d.grad) v = static_cast<T>(n01(rng));
    return d;
  }
  std::vector<double> centre(s.D, 0.0);
  if (s.inputs == Shape::kFarNear)
    for (auto& v : centre) v = 1e3 / std::sqrt(static_cast<double>(s.D)) * (u(rng) > 0 ? 1 : -1);
  for (int k = 0; k < s.K; ++k)
    for (int j = 0; j < s.D; ++j) d.codewords[k * s.D + j] = static_cast<T>(centre[j] + u(rng));
  // Peaked: a pixel lies at squared distance ~0.03 D from its codeword and
  // ~0.7 D from the others, so s ~ -20 / D puts the others ~13 below in logit
  // (assignments ~1 - 1e-4 for the winner).
  for (int k = 0; k < s.K; ++k)
    d.scale[k] = static_cast<T>(s.inputs == Shape::kPeaked ? -(36 + 4 * u(rng)) / s.D : -1.25 + 0.75 * u(rng));
  for (int b = 0; b < s.B; ++b)
    for (int i = 0; i < s.N; ++i) {
      const int k = static_cast<int>(rng() % s.K);  // peaked: the pixel's codeword
      for (int j = 0; j < s.D; ++j) {
        const double base = s.inputs == Shape::kPeaked ? value(d.codewords[k * s.D + j]) - centre[j] : 0.0;
        const double v = centre[j] + base + u(rng);
        const size_t idx = s.channels_first ? (static_cast<size_t>(b) * s.D + j) * s.N + i
                                            : (static_cast<size_t>(b) * s.N + i) * s.D + j;
        d.x[idx] = static_cast<T>(v);
      }
    }
  std::uniform_real_distribution<double> g(-1, 1);
  d.grad.resize(static_cast<size_t>(s.B) * s.K * s.D);
  for (auto& v : d.grad) v = static_cast<T>(g(rng));
  return d;
}

struct Reference {
  std::vector<double> E, grad_x, grad_c, grad_s;
  double min_top = 1;  // smallest winning assignment over the pixels (how peaked)
};

template <typename T>
Reference reference(const Shape& s, const Data<T>& d) {
  const int B = s.B, N = s.N, D = s.D, K = s.K;
  Reference r;
  r.E.assign(static_cast<size_t>(B) * K * D, 0);
  r.grad_x.assign(d.x.size(), 0);
  r.grad_c.assign(d.codewords.size(), 0);
  r.grad_s.assign(K, 0);
  std::vector<double> xi(D), A(K), dA(K), dist(K);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < N; ++i) {
      const auto xidx = [&](int j) {
        return s.channels_first ? (static_cast<size_t>(b) * D + j) * N + i : (static_cast<size_t>(b) * N + i) * D + j;
      };
      for (int j = 0; j < D; ++j) xi[j] = value(d.x[xidx(j)]);
      double mx = -INFINITY;
      for (int k = 0; k < K; ++k) {
        double q = 0;
        for (int j = 0; j < D; ++j) {
          const double r = xi[j] - value(d.codewords[k * D + j]);
          q += r * r;
        }
        dist[k] = q;
        A[k] = value(d.scale[k]) * q;
        mx = std::max(mx, A[k]);
      }
      double sum = 0;
      for (int k = 0; k < K; ++k) sum += (A[k] = std::exp(A[k] - mx));
      double top = 0, a_dot_da = 0;
      for (int k = 0; k < K; ++k) {
        A[k] /= sum;
        top = std::max(top, A[k]);
        double da = 0;
        for (int j = 0; j < D; ++j) da += value(d.grad[(b * K + k) * D + j]) * (xi[j] - value(d.codewords[k * D + j]));
        dA[k] = da;
        a_dot_da += A[k] * da;
      }
      r.min_top = std::min(r.min_top, top);
      for (int k = 0; k < K; ++k) {
        const double dl = A[k] * (dA[k] - a_dot_da), sk = value(d.scale[k]);
        r.grad_s[k] += dl * dist[k];
        for (int j = 0; j < D; ++j) {
          const double res = xi[j] - value(d.codewords[k * D + j]), dE = value(d.grad[(b * K + k) * D + j]);
          r.E[(b * K + k) * D + j] += A[k] * res;
          r.grad_x[xidx(j)] += A[k] * dE + 2 * dl * sk * res;
          r.grad_c[k * D + j] += -A[k] * dE - 2 * sk * dl * res;
        }
      }
    }
  return r;
}

template <typename T, int KP>
Outcome run(const Shape& s, uint32_t seed) {
  using acc = typename Acc<T>::type;
  const Data<T> d = make_data<T>(s, seed);
  const Reference want = reference(s, d);
  const int64_t B = s.B, K = s.K, D = s.D, N = s.N;
  const int64_t x_bytes = static_cast<int64_t>(d.x.size() * sizeof(T));
  const EncodingPlan fwd =
      encoding_plan(false, B, N, D, K, s.channels_first, sizeof(acc), x_bytes, s.aligned, s.sm_count, s.blocks_per_sm);
  const EncodingPlan bwd =
      encoding_plan(true, B, N, D, K, s.channels_first, sizeof(acc), x_bytes, s.aligned, s.sm_count, s.blocks_per_sm);
  Outcome o;
  o.require(fwd.error.empty() && bwd.error.empty() && fwd.KP == KP, "plan_error");
  const auto grid = [](const Grid3& g) { return dim3(g.x, g.y, g.z); };

  // ---- forward, as encoding_fwd_impl
  std::vector<acc> ws(fwd.ws_elems, NAN), part(fwd.part_elems, NAN);
  std::vector<T> E(static_cast<size_t>(B) * K * D, T(-7.f));
  acc* w = ws.data();
  emu_launch(grid(fwd.prep_grid), kThreads, [&] {
    encoding_prep_kernel<T, acc, KP>(d.codewords.data(), K, D, fwd.Dp, true, w + fwd.ws_mean, w + fwd.ws_cpk,
                                     w + fwd.ws_cpt);
  });
  emu_launch(grid(fwd.norms_grid), 32, [&] {
    encoding_norms_kernel<acc>(w + fwd.ws_cpk, nullptr, KP, fwd.Dp, w + fwd.ws_cn, nullptr);
  });
  EncParams<T, acc> p{};
  p.x = d.x.data();
  p.scale = d.scale.data();
  p.mean = w + fwd.ws_mean;
  p.cpk = w + fwd.ws_cpk;
  p.cpt = w + fwd.ws_cpt;
  p.cn = w + fwd.ws_cn;
  p.part = part.data();
  p.part_a = part.data() + fwd.part_a;
  std::vector<uint8_t> flags(fwd.flag_bytes, 0xAA), flagsb(bwd.flag_bytes, 0xAA);
  p.codewords = d.codewords.data();
  p.flags = flags.data();
  p.N = static_cast<int>(N);
  p.D = static_cast<int>(D);
  p.Dp = static_cast<int>(fwd.Dp);
  p.tiles = static_cast<int>(fwd.tiles);
  p.parts = static_cast<int>(fwd.parts);
  p.K = static_cast<int>(K);
  p.cf = s.channels_first;
  emu_launch(grid(fwd.tile_grid), kThreads, [&] { encoding_tile_kernel<T, acc, KP, false>(p); }, fwd.smem_bytes);
  emu_launch(grid(fwd.tile_grid), kThreads, [&] { encoding_fixup_kernel<T, acc, KP, false>(p); });
  emu_launch(grid(fwd.reduce_grid), kThreads, [&] {
    encoding_fwd_reduce_kernel<T, acc>(p.part, p.part_a, p.cpk, E.data(), fwd.parts, K, KP, D, fwd.Dp);
  });

  // ---- backward, as encoding_bwd_impl
  std::vector<acc> wsb(bwd.ws_elems, NAN), partb(bwd.part_elems, NAN);
  std::vector<T> gx(d.x.size(), T(-7.f)), gc(d.codewords.size(), T(-7.f)), gs(K, T(-7.f));
  acc* v = wsb.data();
  emu_launch(grid(bwd.prep_grid), kThreads, [&] {
    encoding_prep_kernel<T, acc, KP>(d.codewords.data(), K, D, bwd.Dp, true, v + bwd.ws_mean, v + bwd.ws_cpk,
                                     v + bwd.ws_cpt);
  });
  emu_launch(grid(bwd.prep_grad_grid), kThreads, [&] {
    encoding_prep_kernel<T, acc, KP>(d.grad.data(), K, D, bwd.Dp, false, nullptr, v + bwd.ws_gkd, v + bwd.ws_gt);
  });
  emu_launch(grid(bwd.norms_grid), 32, [&] {
    encoding_norms_kernel<acc>(v + bwd.ws_cpk, v + bwd.ws_gkd, KP, bwd.Dp, v + bwd.ws_cn, v + bwd.ws_gk);
  });
  EncParams<T, acc> q = p;
  q.mean = v + bwd.ws_mean;
  q.cpk = v + bwd.ws_cpk;
  q.cpt = v + bwd.ws_cpt;
  q.gkd = v + bwd.ws_gkd;
  q.gt = v + bwd.ws_gt;
  q.cn = v + bwd.ws_cn;
  q.gk = v + bwd.ws_gk;
  q.grad_x = gx.data();
  q.part = partb.data();
  q.part_a = partb.data() + bwd.part_a;
  q.part_v = partb.data() + bwd.part_v;
  q.part_s = partb.data() + bwd.part_s;
  q.flags = flagsb.data();
  q.tiles = static_cast<int>(bwd.tiles);
  q.parts = static_cast<int>(bwd.parts);
  q.vec_out = bwd.vec_out;
  emu_launch(grid(bwd.tile_grid), kThreads, [&] { encoding_tile_kernel<T, acc, KP, true>(q); }, bwd.smem_bytes);
  emu_launch(grid(bwd.tile_grid), kThreads, [&] { encoding_fixup_kernel<T, acc, KP, true>(q); });
  emu_launch(grid(bwd.reduce_grid), kThreads, [&] {
    encoding_bwd_reduce_kernel<T, acc>(q.part, q.part_a, q.part_v, q.part_s, q.cpk, d.grad.data(), gc.data(),
                                       gs.data(), B, bwd.parts, K, KP, D, bwd.Dp);
  });

  const Tol tol = tol_for<T>();
  o.check("E", E, want.E, tol);
  o.check("grad_x", gx, want.grad_x, tol);
  o.check("grad_codewords", gc, want.grad_c, tol);
  o.check("grad_scale", gs, want.grad_s, tol);
  if (s.inputs == Shape::kPeaked) {
    o.require(want.min_top > 0.9, "assignments_not_peaked");
    const Tol peaked = options.tol.at("peaked");
    o.check("peaked_grad_codewords", gc, want.grad_c, peaked);
    o.check("peaked_grad_scale", gs, want.grad_s, peaked);
  }
  // Every pixel's flag written (0 or 1) by both tile kernels; the pixels the
  // fixup kernels redid from raw x and c (spread codewords only).
  long flagged = 0, flagged_b = 0;
  bool flags_ok = true;
  for (size_t e = 0; e < flags.size(); ++e) {
    flags_ok &= flags[e] <= 1 && flagsb[e] <= 1;
    flagged += flags[e] == 1;
    flagged_b += flagsb[e] == 1;
  }
  o.require(flags_ok, "flags_not_written");
  if (s.inputs != Shape::kSpread) o.require(flagged == 0 && flagged_b == 0, "flagged_without_spread");
  if (s.inputs == Shape::kSpread && s.spread >= 30) o.require(flagged > 0 && flagged_b > 0, "spread_not_flagged");
  char buf[200];
  std::snprintf(buf, sizeof buf, " KP=%d Dp=%ld tiles=%ld parts=%ld,%ld vec_out=%d min_top=%.4f flagged=%ld,%ld",
                KP, static_cast<long>(fwd.Dp), static_cast<long>(fwd.tiles), static_cast<long>(fwd.parts),
                static_cast<long>(bwd.parts), static_cast<int>(bwd.vec_out), want.min_top, flagged, flagged_b);
  o.detail = buf + o.detail;
  return o;
}

template <typename T>
Case make(Shape s, const char* what) {
  static uint32_t seed = 5;
  const uint32_t sd = seed++;
  const char* inputs[] = {"uniform", "far-near", "peaked", "spread"};
  char kind[48];
  std::snprintf(kind, sizeof kind, s.inputs == Shape::kSpread ? "%s=%g" : "%s", inputs[s.inputs], s.spread);
  char name[240];
  std::snprintf(name, sizeof name, "%s B=%d N=%d D=%d K=%d %s aligned=%d sms=%ld x%ld %s (%s)", dtype_name<T>(), s.B,
                s.N, s.D, s.K, s.channels_first ? "cf" : "cl", s.aligned, static_cast<long>(s.sm_count),
                static_cast<long>(s.blocks_per_sm), kind, what);
  return Case{name, [=] {
                return encoding_padded_codes(s.K) == 32 ? run<T, 32>(s, sd) : run<T, 64>(s, sd);
              }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  if (!options.tol.count("peaked")) emu::fatal("missing --tol peaked=RTOL,ATOL");
  using S = Shape;
  return run_cases(
      "encoding",
      {
          make<float>({2, 300, 70, 20, true, true, 2, 2, S::kUniform},
                      "KP 32; D % 4 != 0: 5 logit chunks, ragged; N ragged: 3 tiles, 2 blocks per image"),
          make<float>({1, 200, 150, 40, false, true, 1, 2, S::kUniform},
                      "KP 64, channels-last; 3 aggregation chunks (64), ragged; D % 4 != 0: scalar grad_x stores"),
          make<float>({1, 1000, 72, 33, true, false, 4, 1, S::kUniform},
                      "KP 64, channels-first; unaligned grad_x: scalar stores; ragged: 16 tiles, 4 blocks per image"),
          make<float>({2, 150, 36, 12, false, true, 1, 1, S::kFarNear},
                      "||x|| ~ 1e3 near the codewords; D % 4 == 0 channels-last: 4-wide stores"),
          make<float>({1, 130, 64, 64, true, true, 1, 1, S::kPeaked}, "near one-hot assignments, K = 64"),
          make<float>({1, 160, 40, 24, false, true, 1, 1, S::kPeaked}, "near one-hot assignments, K = 24"),
          make<double>({1, 400, 45, 30, true, true, 2, 1, S::kFarNear}, "fp64; far-near; 2 blocks per image"),
          make<BF16>({1, 150, 48, 36, false, true, 1, 1, S::kUniform}, "16-bit data, KP 64"),
          // Spread codewords: every gradient within the fp32 tolerance of float64
          // through the flagged pixels' direct path (spread 1: no pixel flagged).
          make<float>({2, 45, 40, 8, false, true, 1, 1, S::kSpread, 1}, "spread codewords"),
          make<float>({2, 45, 40, 8, true, true, 1, 1, S::kSpread, 1}, "spread codewords"),
          make<float>({2, 45, 40, 8, false, true, 1, 1, S::kSpread, 30}, "spread codewords"),
          make<float>({2, 45, 40, 8, true, true, 1, 1, S::kSpread, 30}, "spread codewords"),
          make<float>({2, 45, 40, 8, false, true, 1, 1, S::kSpread, 100}, "spread codewords"),
          make<float>({2, 45, 40, 8, true, true, 1, 1, S::kSpread, 100}, "spread codewords"),
          make<float>({2, 45, 40, 8, false, true, 1, 1, S::kSpread, 1000}, "spread codewords"),
          make<float>({2, 45, 40, 8, true, true, 1, 1, S::kSpread, 1000}, "spread codewords"),
          make<float>({1, 1000, 40, 40, true, true, 4, 1, S::kSpread, 100},
                      "spread codewords, KP 64; 16 tiles, 4 blocks per image"),
      });
}
