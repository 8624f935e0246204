// class_gather's CUDA kernels (csrc/cuda/class_gather_kernel.cuh: forward,
// merge, backward prep and tile kernels, launched as class_gather_plan says)
// under emu.h, against a float64 reference of the op's maths:
//   "ocr":   centres_k = sum_n softmax_n(s probs_k)_n F_n,  stat = log-sum-exp over the pixels
//   "paper": p_n = softmax_k(s probs_n),  centres_k = sum_n p_kn F_n / mass_k,  stat = mass
// and the contract's backward formulas (docs/kernels.md "class_gather").
//
// Cases reach every padded class width (KP = 32, 64, 128, 256 with K = 1, 19,
// 40, 100, 150, 171), both modes, ragged pixel tiles, C not a multiple of 4,
// several channel blocks, several pixel chunks per image (partial slots merged
// in the "ocr" rescaling), the 4-pixel vector and the scalar global access
// paths, logits large enough that exp overflows unless the maximum is
// subtracted, and non-finite probs: -inf entries (a class that is -inf over
// whole chunks, whose partials then count for nothing) and a NaN, whose NaN
// pattern must be the reference's.
#include "emu.h"
#include "driver.h"

#include "cuda/class_gather_kernel.cuh"
#include "cuda/class_gather_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, C, H, W, K;
  bool ocr;
  bool aligned;      // maps 16-byte aligned (false: the scalar access path)
  int64_t sm_count;  // sizes the forward's pixel chunks
  enum Inputs { kUniform, kMasked, kNaN, kLarge } inputs;
};

// softmax of scale * v as torch computes it: max (NaN if any), exp(x - max), normalise.
std::vector<double> softmax(const std::vector<double>& v, double scale) {
  double m = -INFINITY;
  for (const double x : v) m = std::isnan(x * scale) || std::isnan(m) ? NAN : std::max(m, x * scale);
  std::vector<double> e(v.size());
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += (e[i] = std::exp(v[i] * scale - m));
  for (double& x : e) x /= s;
  return e;
}

double logsumexp(const std::vector<double>& v, double scale) {
  double m = -INFINITY;
  for (const double x : v) m = std::isnan(x * scale) || std::isnan(m) ? NAN : std::max(m, x * scale);
  if (m == -INFINITY) return -INFINITY;
  double s = 0;
  for (const double x : v) s += std::exp(x * scale - m);
  return m + std::log(s);
}

struct Reference {
  std::vector<double> centres, stat, grad_feats, grad_probs;
};

// The op's maths in float64 on the data as the kernels see it.
template <typename T>
Reference reference(const Shape& s, const std::vector<T>& feats, const std::vector<T>& probs,
                    const std::vector<T>& grad, double scale) {
  const int B = s.B, C = s.C, K = s.K, N = s.H * s.W;
  Reference r;
  r.centres.assign(static_cast<size_t>(B) * K * C, 0);
  r.stat.assign(static_cast<size_t>(B) * K, 0);
  r.grad_feats.assign(feats.size(), 0);
  r.grad_probs.assign(probs.size(), 0);
  std::vector<double> w(static_cast<size_t>(K) * N);  // [K][N] weights of one image
  for (int b = 0; b < B; ++b) {
    const auto F = [&](int c, int n) { return value(feats[(static_cast<size_t>(b) * C + c) * N + n]); };
    const auto P = [&](int k, int n) { return value(probs[(static_cast<size_t>(b) * K + k) * N + n]); };
    if (s.ocr) {
      for (int k = 0; k < K; ++k) {
        std::vector<double> row(N);
        for (int n = 0; n < N; ++n) row[n] = P(k, n);
        const std::vector<double> sm = softmax(row, scale);
        std::copy(sm.begin(), sm.end(), w.begin() + static_cast<size_t>(k) * N);
        r.stat[b * K + k] = logsumexp(row, scale);
      }
    } else {
      for (int n = 0; n < N; ++n) {
        std::vector<double> col(K);
        for (int k = 0; k < K; ++k) col[k] = P(k, n);
        const std::vector<double> sm = softmax(col, scale);
        for (int k = 0; k < K; ++k) w[static_cast<size_t>(k) * N + n] = sm[k];
      }
      for (int k = 0; k < K; ++k) {
        double m = 0;
        for (int n = 0; n < N; ++n) m += w[static_cast<size_t>(k) * N + n];
        r.stat[b * K + k] = m;
      }
    }
    for (int k = 0; k < K; ++k)
      for (int c = 0; c < C; ++c) {
        double acc = 0;
        for (int n = 0; n < N; ++n) acc += w[static_cast<size_t>(k) * N + n] * F(c, n);
        r.centres[(static_cast<size_t>(b) * K + k) * C + c] = s.ocr ? acc : acc / r.stat[b * K + k];
      }
    // Backward: G' = grad (ocr) or grad / mass (paper); dp_kn = G'_k . (F_n - centre_k).
    std::vector<double> gs(static_cast<size_t>(K) * C);
    for (int k = 0; k < K; ++k)
      for (int c = 0; c < C; ++c)
        gs[static_cast<size_t>(k) * C + c] =
            value(grad[(static_cast<size_t>(b) * K + k) * C + c]) / (s.ocr ? 1.0 : r.stat[b * K + k]);
    for (int n = 0; n < N; ++n) {
      std::vector<double> dp(K);
      double dot = 0;
      for (int k = 0; k < K; ++k) {
        double d = 0;
        for (int c = 0; c < C; ++c)
          d += gs[static_cast<size_t>(k) * C + c] * (F(c, n) - r.centres[(static_cast<size_t>(b) * K + k) * C + c]);
        dp[k] = d;
        dot += w[static_cast<size_t>(k) * N + n] * d;
      }
      for (int k = 0; k < K; ++k) {
        const double wk = w[static_cast<size_t>(k) * N + n];
        r.grad_probs[(static_cast<size_t>(b) * K + k) * N + n] = scale * wk * (s.ocr ? dp[k] : dp[k] - dot);
      }
      for (int c = 0; c < C; ++c) {
        double g = 0;
        for (int k = 0; k < K; ++k) g += w[static_cast<size_t>(k) * N + n] * gs[static_cast<size_t>(k) * C + c];
        r.grad_feats[(static_cast<size_t>(b) * C + c) * N + n] = g;
      }
    }
  }
  return r;
}

template <typename T, int KP>
Outcome run(const Shape& s, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t B = s.B, C = s.C, K = s.K, N = static_cast<int64_t>(s.H) * s.W;
  const double scale = s.ocr ? 1.3 : 0.8;
  std::vector<T> feats = random_vector<T>(B * C * N, -1, 1, rng);
  // kLarge: logits differing by up to ~300, so exp overflows without the max subtracted.
  const double range = s.inputs == Shape::kLarge ? 120 : 3;
  std::vector<T> probs = random_vector<T>(B * K * N, -range, range, rng);
  std::vector<T> grad = random_vector<T>(B * K * C, -1, 1, rng);
  if (s.inputs == Shape::kMasked) {
    // -inf at random, never at a pixel's class 0 (paper: no all -inf column);
    // class 0 (ocr) is -inf but for the image's last 5 pixels.
    std::bernoulli_distribution masked(0.3);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n) {
          const bool off = s.ocr && k == 0 ? n < N - 5 : k > 0 && masked(rng);
          if (off) probs[(b * K + k) * N + n] = T(-INFINITY);
        }
  } else if (s.inputs == Shape::kNaN) {
    probs[(1 * K + K / 2) * N + N / 3] = T(NAN);  // image 1: class K / 2 ("ocr") or pixel N / 3 ("paper")
  }
  const Reference want = reference(s, feats, probs, grad, scale);
  const ClassGatherPlan plan = class_gather_plan(B, C, K, N, sizeof(T), sizeof(acc), s.aligned, s.sm_count);
  Outcome o;
  o.require(plan.error.empty() && plan.KP == KP, "plan_error");
  const auto grid = [](const Grid3& g) { return dim3(g.x, g.y, g.z); };

  // ---- forward, as class_gather_fwd_cuda
  std::vector<acc> part(plan.part_elems, NAN);
  std::vector<T> centres(B * K * C, T(-7.f));
  std::vector<acc> stat(B * K, -7);
  ClassGatherFwdParams<T, acc> fp{};
  fp.feats = feats.data();
  fp.probs = probs.data();
  fp.part = part.data();
  fp.part_sum = part.data() + plan.part_sum;
  fp.part_shift = part.data() + plan.part_shift;
  fp.C = C;
  fp.N = N;
  fp.tiles = plan.tiles;
  fp.parts = plan.parts;
  fp.cblocks = plan.cblocks;
  fp.K = static_cast<int>(K);
  fp.scale = static_cast<acc>(scale);
  fp.ocr = s.ocr;
  fp.vec = plan.vec;
  emu_launch(grid(plan.fwd_grid), kThreads, [&] { class_gather_fwd_kernel<T, acc, KP>(fp); }, plan.fwd_smem_bytes);
  emu_launch(grid(plan.merge_grid), kThreads, [&] {
    class_gather_merge_kernel<T, acc>(fp.part, fp.part_sum, fp.part_shift, centres.data(), stat.data(), C,
                                      static_cast<int>(K), plan.parts, s.ocr);
  });

  // ---- backward, as class_gather_bwd_cuda (from the kernels' own forward outputs, as the op saves them)
  std::vector<acc> ws(plan.ws_elems, NAN);
  std::vector<T> grad_feats(feats.size(), T(-7.f)), grad_probs(probs.size(), T(-7.f));
  ClassGatherBwdParams<T, acc> bp{};
  bp.grad = grad.data();
  bp.feats = feats.data();
  bp.probs = probs.data();
  bp.centres = centres.data();
  bp.stat = stat.data();
  bp.gs = ws.data();
  bp.offset = ws.data() + plan.ws_offset;
  bp.grad_feats = grad_feats.data();
  bp.grad_probs = grad_probs.data();
  bp.B = B;
  bp.C = C;
  bp.N = N;
  bp.K = static_cast<int>(K);
  bp.scale = static_cast<acc>(scale);
  bp.ocr = s.ocr;
  bp.vec = plan.vec;
  emu_launch(grid(plan.prep_grid), kThreads, [&] { class_gather_prep_kernel<T, acc>(bp); });
  emu_launch(grid(plan.bwd_grid), kThreads, [&] { class_gather_bwd_kernel<T, acc, KP>(bp); }, plan.bwd_smem_bytes);

  const Tol tol = tol_for<T>();
  o.check_pattern("centres", centres, want.centres, tol);
  o.check_pattern("stat", stat, want.stat, tol);
  o.check_pattern("grad_feats", grad_feats, want.grad_feats, tol);
  o.check_pattern("grad_probs", grad_probs, want.grad_probs, tol);
  char buf[128];
  std::snprintf(buf, sizeof buf, " KP=%d tiles=%ld cblocks=%ld parts=%ld vec=%d", KP, static_cast<long>(plan.tiles),
                static_cast<long>(plan.cblocks), static_cast<long>(plan.parts), static_cast<int>(plan.vec));
  o.detail = buf + o.detail;
  return o;
}

template <typename T>
Case make(Shape s, const char* what) {
  static uint32_t seed = 11;
  const uint32_t sd = seed++;
  const char* inputs[] = {"uniform", "masked", "nan", "large"};
  char name[240];
  std::snprintf(name, sizeof name, "%s %s B=%d C=%d H=%d W=%d K=%d aligned=%d sms=%ld %s (%s)", dtype_name<T>(),
                s.ocr ? "ocr" : "paper", s.B, s.C, s.H, s.W, s.K, s.aligned, static_cast<long>(s.sm_count),
                inputs[s.inputs], what);
  return Case{name, [=] {
                Outcome o;
                class_dispatch_padded(class_padded(s.K), [&](auto kp) { o = run<T, decltype(kp)::value>(s, sd); });
                return o;
              }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  using S = Shape;
  return run_cases(
      "class_gather",
      {
          make<float>({2, 37, 7, 10, 19, true, true, 2, S::kUniform},
                      "K 19: KP 32; C % 4 != 0; N % 4 != 0: scalar path; 3 ragged tiles, a chunk each"),
          make<float>({2, 37, 7, 10, 19, false, true, 2, S::kUniform}, "paper mode of the same"),
          make<float>({1, 21, 8, 12, 1, true, true, 3, S::kUniform}, "K 1; vector path"),
          make<float>({1, 21, 8, 12, 1, false, false, 3, S::kUniform},
                      "K 1, paper: weights exactly 1; unaligned: scalar path with N % 4 == 0"),
          make<float>({1, 135, 6, 9, 40, false, true, 1, S::kUniform}, "K 40: KP 64; 2 channel blocks of 128"),
          make<float>({1, 66, 5, 13, 100, true, true, 2, S::kUniform},
                      "K 100: KP 128; 2 channel blocks of 64; one chunk of 3 tiles (online rescaling)"),
          make<float>({1, 40, 4, 16, 150, true, true, 1, S::kUniform}, "K 150 (ADE20K): KP 256; 2 channel blocks"),
          make<float>({1, 40, 5, 11, 171, false, true, 1, S::kUniform}, "K 171 (COCO-Stuff), paper"),
          make<float>({2, 24, 8, 12, 19, true, true, 1, S::kMasked},
                      "-inf logits; class 0 -inf over a whole chunk (its partials count for nothing) and over the "
                      "first tile of the next"),
          make<float>({2, 24, 8, 12, 19, false, true, 3, S::kMasked}, "-inf logits, paper"),
          make<float>({2, 24, 6, 9, 19, true, true, 2, S::kNaN}, "a NaN logit: its class's centre is NaN"),
          make<float>({2, 24, 6, 9, 19, false, true, 2, S::kNaN}, "a NaN logit, paper: its image is NaN"),
          make<float>({1, 24, 8, 12, 19, true, true, 1, S::kLarge}, "logits up to 150: the max must be subtracted"),
          make<float>({1, 24, 8, 12, 19, false, true, 1, S::kLarge}, "logits up to 100, paper"),
          make<double>({2, 37, 7, 10, 40, true, true, 2, S::kUniform}, "fp64, ocr"),
          make<double>({1, 37, 7, 10, 150, false, true, 2, S::kUniform}, "fp64, paper, KP 256"),
          make<BF16>({2, 36, 8, 8, 19, true, true, 2, S::kUniform}, "16-bit data, ocr, vector path"),
          make<BF16>({1, 36, 7, 9, 40, false, true, 2, S::kUniform}, "16-bit data, paper"),
      });
}
