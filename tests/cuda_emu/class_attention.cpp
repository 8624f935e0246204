// class_attention's CUDA kernels (csrc/cuda/class_attention_kernel.cuh:
// forward, backward and the slot sum, launched as class_attention_plan says)
// under emu.h, against a float64 reference of the op's maths:
//   a_nk = softmax_k(scale s_nk), s_nk = q_n . k_k (query form) or logits_kn;  out_n = sum_k a_nk v_k
// with its log-sum-exp and the gradients of docs/kernels.md "class_attention".
//
// Cases reach every padded class width (KP = 32, 64, 128, 256 with K = 1, 19,
// 40, 100, 150, 171), both forms, ragged pixel tiles, channel counts that are
// not multiples of 4 and that take several staging chunks (the scores' query
// channels, the output's 128-channel steps, the slot reduction's channel
// steps), backward blocks owning several tiles and several slots per image,
// the 4-pixel vector and the scalar access paths, scores large enough that
// exp overflows unless the maximum is subtracted, and non-finite inputs: -inf
// logits, and a NaN in one pixel's logits or query, whose NaN pattern must be
// the reference's.
#include "emu.h"
#include "driver.h"

#include "cuda/class_attention_kernel.cuh"
#include "cuda/class_attention_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, K, Cq, Cv, H, W;  // Cq = 0: the logits form
  bool aligned;            // maps 16-byte aligned (false: the scalar access path)
  int64_t sm_count;        // sizes the backward's tile ranges
  enum Inputs { kUniform, kMasked, kNaN, kLarge } inputs;
};

struct Reference {
  std::vector<double> out, lse, grad_query, grad_keys, grad_values, grad_logits;
};

// The op's maths in float64 on the data as the kernels see it; the softmax as
// torch computes it (max with NaN, exp(x - max), normalise), its backward as
// autograd's: dS = scale a (dA - sum_k a dA).
template <typename T>
Reference reference(const Shape& s, const std::vector<T>& query, const std::vector<T>& keys,
                    const std::vector<T>& values, const std::vector<T>& logits, const std::vector<T>& grad,
                    double scale) {
  const int B = s.B, K = s.K, Cq = s.Cq, Cv = s.Cv, N = s.H * s.W;
  const bool q_form = Cq > 0;
  Reference r;
  r.out.assign(static_cast<size_t>(B) * Cv * N, 0);
  r.lse.assign(static_cast<size_t>(B) * N, 0);
  r.grad_query.assign(query.size(), 0);
  r.grad_keys.assign(keys.size(), 0);
  r.grad_values.assign(values.size(), 0);
  r.grad_logits.assign(logits.size(), 0);
  std::vector<double> sc(K), a(K), da(K);
  for (int b = 0; b < B; ++b)
    for (int n = 0; n < N; ++n) {
      const auto V = [&](int k, int c) { return value(values[(static_cast<size_t>(b) * K + k) * Cv + c]); };
      const auto G = [&](int c) { return value(grad[(static_cast<size_t>(b) * Cv + c) * N + n]); };
      const auto Q = [&](int c) { return value(query[(static_cast<size_t>(b) * Cq + c) * N + n]); };
      double m = -INFINITY;
      for (int k = 0; k < K; ++k) {
        double v = 0;
        if (q_form) {
          for (int c = 0; c < Cq; ++c) v += Q(c) * value(keys[(static_cast<size_t>(b) * K + k) * Cq + c]);
        } else {
          v = value(logits[(static_cast<size_t>(b) * K + k) * N + n]);
        }
        sc[k] = scale * v;
        m = std::isnan(sc[k]) || std::isnan(m) ? NAN : std::max(m, sc[k]);
      }
      double sum = 0;
      for (int k = 0; k < K; ++k) sum += (a[k] = std::exp(sc[k] - m));
      for (int k = 0; k < K; ++k) a[k] /= sum;
      r.lse[static_cast<size_t>(b) * N + n] = m == -INFINITY ? -INFINITY : m + std::log(sum);
      double d = 0;
      for (int k = 0; k < K; ++k) {
        double v = 0;
        for (int c = 0; c < Cv; ++c) v += G(c) * V(k, c);
        da[k] = v;
        d += a[k] * v;
      }
      for (int c = 0; c < Cv; ++c) {
        double o = 0;
        for (int k = 0; k < K; ++k) o += a[k] * V(k, c);
        r.out[(static_cast<size_t>(b) * Cv + c) * N + n] = o;
      }
      for (int k = 0; k < K; ++k) {
        const double ds = scale * a[k] * (da[k] - d);
        for (int c = 0; c < Cv; ++c) r.grad_values[(static_cast<size_t>(b) * K + k) * Cv + c] += a[k] * G(c);
        if (q_form) {
          for (int c = 0; c < Cq; ++c) {
            r.grad_query[(static_cast<size_t>(b) * Cq + c) * N + n] +=
                ds * value(keys[(static_cast<size_t>(b) * K + k) * Cq + c]);
            r.grad_keys[(static_cast<size_t>(b) * K + k) * Cq + c] += ds * Q(c);
          }
        } else {
          r.grad_logits[(static_cast<size_t>(b) * K + k) * N + n] = ds;
        }
      }
    }
  return r;
}

template <typename T, int KP>
Outcome run(const Shape& s, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t B = s.B, K = s.K, Cq = s.Cq, Cv = s.Cv, N = static_cast<int64_t>(s.H) * s.W;
  const bool q_form = Cq > 0;
  const double scale = q_form ? 1 / std::sqrt(static_cast<double>(Cq)) : 1.2;
  // kLarge: scores differing by up to ~300, so exp overflows without the max subtracted.
  const double range = s.inputs == Shape::kLarge ? 40 : 1;
  std::vector<T> query = random_vector<T>(q_form ? B * Cq * N : 0, -1.5 * range, 1.5 * range, rng);
  std::vector<T> keys = random_vector<T>(q_form ? B * K * Cq : 0, -1.5, 1.5, rng);
  std::vector<T> values = random_vector<T>(B * K * Cv, -1, 1, rng);
  std::vector<T> logits = random_vector<T>(q_form ? 0 : B * K * N, -3 * range, 3 * range, rng);
  std::vector<T> grad = random_vector<T>(B * Cv * N, -1, 1, rng);
  if (s.inputs == Shape::kMasked) {
    std::bernoulli_distribution masked(0.4);  // -inf logits, but never class 0's
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 1; k < K; ++k)
        for (int64_t n = 0; n < N; ++n)
          if (masked(rng)) logits[(b * K + k) * N + n] = T(-INFINITY);
  } else if (s.inputs == Shape::kNaN) {  // image 1, pixel N / 3: one logit or one query channel
    (q_form ? query[(1 * Cq + Cq / 2) * N + N / 3] : logits[(1 * K + K / 2) * N + N / 3]) = T(NAN);
  }
  const Reference want = reference(s, query, keys, values, logits, grad, scale);
  const ClassAttentionPlan plan = class_attention_plan(B, K, Cq, Cv, N, sizeof(T), sizeof(acc), s.aligned, s.sm_count);
  Outcome o;
  o.require(plan.error.empty() && plan.KP == KP, "plan_error");
  const auto grid = [](const Grid3& g) { return dim3(g.x, g.y, g.z); };

  // ---- forward, as class_attention_fwd_cuda
  std::vector<T> out(B * Cv * N, T(-7.f));
  std::vector<acc> lse(B * N, -7);
  ClassAttentionParams<T, acc> p{};
  p.query = q_form ? query.data() : nullptr;
  p.keys = q_form ? keys.data() : nullptr;
  p.values = values.data();
  p.logits = q_form ? nullptr : logits.data();
  p.lse = lse.data();
  p.out = out.data();
  p.Cq = Cq;
  p.Cv = Cv;
  p.N = N;
  p.tiles = plan.tiles;
  p.parts = plan.parts;
  p.K = static_cast<int>(K);
  p.scale = static_cast<acc>(scale);
  p.vec = plan.vec;
  emu_launch(grid(plan.fwd_grid), kThreads, [&] {
    if (q_form) {
      class_attention_fwd_kernel<T, acc, KP, true>(p);
    } else {
      class_attention_fwd_kernel<T, acc, KP, false>(p);
    }
  }, plan.fwd_smem_bytes);

  // ---- backward, as class_attention_bwd_cuda (from the kernels' own lse)
  std::vector<acc> slot(plan.slot_elems, NAN);
  std::vector<T> grad_query(query.size(), T(-7.f)), grad_keys(keys.size(), T(-7.f)),
      grad_values(values.size(), T(-7.f)), grad_logits(logits.size(), T(-7.f));
  p.grad = grad.data();
  p.out = nullptr;  // the backward does not read out
  p.grad_query = q_form ? grad_query.data() : nullptr;
  p.grad_logits = q_form ? nullptr : grad_logits.data();
  p.slot = slot.data();
  emu_launch(grid(plan.bwd_grid), kThreads, [&] {
    if (q_form) {
      class_attention_bwd_kernel<T, acc, KP, true>(p);
    } else {
      class_attention_bwd_kernel<T, acc, KP, false>(p);
    }
  }, plan.bwd_smem_bytes);
  emu_launch(grid(plan.sum_grid), kThreads, [&] {
    class_attention_sum_kernel<T, acc>(slot.data(), grad_values.data(), grad_keys.data(), B, K, Cv, Cq, plan.parts);
  });

  const Tol tol = tol_for<T>();
  o.check_pattern("out", out, want.out, tol);
  o.check_pattern("lse", lse, want.lse, tol);
  o.check_pattern("grad_values", grad_values, want.grad_values, tol);
  if (q_form) {
    o.check_pattern("grad_query", grad_query, want.grad_query, tol);
    o.check_pattern("grad_keys", grad_keys, want.grad_keys, tol);
  } else {
    o.check_pattern("grad_logits", grad_logits, want.grad_logits, tol);
  }
  char buf[128];
  std::snprintf(buf, sizeof buf, " KP=%d tiles=%ld parts=%ld vec=%d", KP, static_cast<long>(plan.tiles),
                static_cast<long>(plan.parts), static_cast<int>(plan.vec));
  o.detail = buf + o.detail;
  return o;
}

template <typename T>
Case make(Shape s, const char* what) {
  static uint32_t seed = 23;
  const uint32_t sd = seed++;
  const char* inputs[] = {"uniform", "masked", "nan", "large"};
  char name[240];
  std::snprintf(name, sizeof name, "%s %s B=%d K=%d Cq=%d Cv=%d H=%d W=%d aligned=%d sms=%ld %s (%s)",
                dtype_name<T>(), s.Cq > 0 ? "query" : "logits", s.B, s.K, s.Cq, s.Cv, s.H, s.W, s.aligned,
                static_cast<long>(s.sm_count), inputs[s.inputs], what);
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
      "class_attention",
      {
          make<float>({2, 19, 70, 37, 7, 14, true, 1, S::kUniform},
                      "K 19: KP 32; 2 query chunks of 64; Cv % 4 != 0; N % 4 != 0: scalar path; backward blocks "
                      "of 2 ragged tiles"),
          make<float>({2, 19, 0, 37, 7, 14, true, 1, S::kUniform}, "logits form of the same"),
          make<float>({1, 1, 12, 21, 8, 12, true, 2, S::kUniform}, "K 1: attention exactly 1; vector path"),
          make<float>({1, 1, 0, 21, 8, 12, false, 2, S::kUniform}, "K 1, logits; unaligned: scalar path"),
          make<float>({1, 40, 36, 150, 5, 13, true, 3, S::kUniform},
                      "K 40: KP 64; 2 output steps of 128, 2 slot steps of 128"),
          make<float>({1, 100, 0, 70, 6, 11, true, 2, S::kUniform}, "K 100: KP 128, logits; 2 slot steps of 64"),
          make<float>({1, 150, 20, 37, 4, 16, true, 1, S::kUniform},
                      "K 150 (ADE20K): KP 256; 2 query chunks of 16, 2 slot steps of 32"),
          make<float>({1, 171, 0, 33, 5, 11, true, 1, S::kUniform}, "K 171 (COCO-Stuff), logits"),
          make<float>({2, 19, 0, 24, 8, 12, true, 1, S::kMasked}, "-inf logits"),
          make<float>({2, 19, 0, 24, 6, 9, true, 1, S::kNaN}, "a NaN logit: its pixel is NaN"),
          make<float>({2, 19, 24, 20, 6, 9, true, 1, S::kNaN}, "a NaN query channel: its pixel is NaN"),
          make<float>({1, 19, 0, 24, 8, 12, true, 1, S::kLarge}, "logits up to 150: the max must be subtracted"),
          make<float>({1, 19, 16, 24, 8, 12, true, 1, S::kLarge}, "scores in the hundreds, query form"),
          make<double>({2, 40, 36, 37, 7, 10, true, 1, S::kUniform}, "fp64, query, KP 64"),
          make<double>({1, 150, 0, 37, 7, 10, true, 1, S::kUniform}, "fp64, logits, KP 256"),
          make<BF16>({2, 19, 32, 36, 8, 8, true, 1, S::kUniform}, "16-bit data, query, vector path"),
          make<BF16>({1, 40, 0, 36, 7, 9, true, 2, S::kUniform}, "16-bit data, logits"),
      });
}
