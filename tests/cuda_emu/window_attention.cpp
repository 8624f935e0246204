// window_attention's CUDA kernels (csrc/cuda/window_attention_kernel.cuh:
// forward, backward in window chunks and the partial sum, launched as
// window_attention_plan says) under emu.h, against a float64 reference of the
// contract (docs/kernels.md "window_attention") written here step by step:
// pad the map to whole windows, roll it by the shift, cut it into windows,
// mmseg's region labels from its slices, then per window and head
//   S = scale q k^T + table[index] + (-100 across regions) + (-inf on padded keys without pad_qkv)
//   P = softmax(S), out = P V;  dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)),
//   dq = scale dS K, dk = scale dS^T q;  d(table) and d(pad_qkv) summed over windows.
//
// Cases: windows 4x8, 7x7, 8x16 and 12x12 (one query block, and 4 or 5 query
// blocks with a ragged last one), maps no window divides, shift 0 and about
// window / 2, pad_qkv present and absent, table present and absent, 1 to 3
// heads, d 6 (the scalar access path), 16, 32 and 128, several backward
// launches sharing the dK/dV workspace, fp32, fp64 and the bf16 stand-in, and
// a NaN in one query, whose NaN pattern in every output must be the
// reference's.
#include "emu.h"
#include "driver.h"

#include "cuda/window_attention_kernel.cuh"
#include "cuda/window_attention_launch.h"

using namespace fastctx;
using namespace emu_driver;

struct Shape {
  int B, H, W, heads, d, Wh, Ww, sh, sw;
  bool table, pad;
  bool aligned;            // false: the scalar access path
  int64_t kv_bytes;        // the backward's dK/dV workspace cap (small: several launches)
  bool nan;                // a NaN in one query channel of a real token
};

struct Reference {
  std::vector<double> out, grad_qkv, grad_table, grad_pad;
};

template <typename T>
Reference reference(const Shape& s, const std::vector<T>& qkv, const std::vector<T>& table, const std::vector<T>& pad,
                    const std::vector<T>& grad, double scale) {
  const int H = s.H, W = s.W, Wh = s.Wh, Ww = s.Ww, heads = s.heads, d = s.d, C = heads * d, N = Wh * Ww;
  const int Hp = (H + Wh - 1) / Wh * Wh, Wp = (W + Ww - 1) / Ww * Ww;
  Reference r;
  r.out.assign(static_cast<size_t>(s.B) * H * W * C, 0);
  r.grad_qkv.assign(qkv.size(), 0);
  r.grad_table.assign(table.size(), 0);
  r.grad_pad.assign(pad.size(), 0);
  // mmseg's slices (0:-window, -window:-shift, -shift:) of the rolled padded map; one region without a shift.
  const auto region = [](int i, int window, int shift, int padded) {
    return shift == 0 ? 0 : i < padded - window ? 0 : i < padded - shift ? 1 : 2;
  };
  std::vector<int64_t> row(N);
  std::vector<int> label(N);
  std::vector<double> q(N * d), k(N * d), v(N * d), dO(N * d), S(N * N), P(N * N), dS(N * N);
  for (int b = 0; b < s.B; ++b)
    for (int wy = 0; wy < Hp / Wh; ++wy)
      for (int wx = 0; wx < Wp / Ww; ++wx) {
        for (int t = 0; t < N; ++t) {
          const int ry = wy * Wh + t / Ww, rx = wx * Ww + t % Ww;  // rolled map
          const int y = (ry + s.sh) % Hp, x = (rx + s.sw) % Wp;    // torch.roll(-shift): rolled[i] = padded[i + shift]
          row[t] = y < H && x < W ? (static_cast<int64_t>(b) * H + y) * W + x : -1;
          label[t] = region(ry, Wh, s.sh, Hp) * 3 + region(rx, Ww, s.sw, Wp);
        }
        for (int h = 0; h < heads; ++h) {
          for (int t = 0; t < N; ++t)
            for (int c = 0; c < d; ++c) {
              const auto get = [&](int part) {
                const int ch = part * C + h * d + c;
                return row[t] >= 0 ? value(qkv[row[t] * 3 * C + ch]) : s.pad ? value(pad[ch]) : 0.0;
              };
              q[t * d + c] = get(0);
              k[t * d + c] = get(1);
              v[t * d + c] = get(2);
              dO[t * d + c] = row[t] >= 0 ? value(grad[row[t] * C + h * d + c]) : 0.0;
            }
          const auto index = [&](int t, int u) {
            return (t / Ww - u / Ww + Wh - 1) * (2 * Ww - 1) + (t % Ww - u % Ww + Ww - 1);
          };
          for (int t = 0; t < N; ++t) {
            double m = -INFINITY;
            for (int u = 0; u < N; ++u) {
              double a = 0;
              for (int c = 0; c < d; ++c) a += scale * q[t * d + c] * k[u * d + c];
              if (s.table) a += value(table[index(t, u) * heads + h]);
              if (label[t] != label[u]) a += -100.0;
              if (row[u] < 0 && !s.pad) a += -INFINITY;
              S[t * N + u] = a;
              m = std::isnan(a) || std::isnan(m) ? NAN : std::max(m, a);
            }
            double sum = 0;
            for (int u = 0; u < N; ++u) sum += (P[t * N + u] = std::exp(S[t * N + u] - m));
            for (int u = 0; u < N; ++u) P[t * N + u] /= sum;
            double D = 0;
            for (int u = 0; u < N; ++u) {
              double dp = 0;
              for (int c = 0; c < d; ++c) dp += dO[t * d + c] * v[u * d + c];
              dS[t * N + u] = dp;
              D += P[t * N + u] * dp;
            }
            for (int u = 0; u < N; ++u) dS[t * N + u] = P[t * N + u] * (dS[t * N + u] - D);
            if (row[t] >= 0)
              for (int c = 0; c < d; ++c) {
                double o = 0;
                for (int u = 0; u < N; ++u) o += P[t * N + u] * v[u * d + c];
                r.out[row[t] * C + h * d + c] = o;
              }
          }
          for (int t = 0; t < N; ++t) {
            double* dst = row[t] >= 0 ? &r.grad_qkv[row[t] * 3 * C] : s.pad ? r.grad_pad.data() : nullptr;
            const bool sum_into = row[t] < 0;
            for (int c = 0; c < d; ++c) {
              double dq = 0, dk = 0, dv = 0;
              for (int u = 0; u < N; ++u) {
                dq += dS[t * N + u] * k[u * d + c];
                dk += dS[u * N + t] * scale * q[u * d + c];
                dv += P[u * N + t] * dO[u * d + c];
              }
              if (dst == nullptr) continue;
              const double g[3] = {scale * dq, dk, dv};
              for (int part = 0; part < 3; ++part) {
                double& e = dst[part * C + h * d + c];
                e = sum_into ? e + g[part] : g[part];
              }
            }
          }
          if (s.table)
            for (int t = 0; t < N; ++t)
              for (int u = 0; u < N; ++u) r.grad_table[index(t, u) * heads + h] += dS[t * N + u];
        }
      }
  return r;
}

template <typename T>
Outcome run(const Shape& s, uint32_t seed) {
  using acc = typename Acc<T>::type;
  std::mt19937 rng(seed);
  const int64_t B = s.B, H = s.H, W = s.W, heads = s.heads, d = s.d, C = heads * d;
  const int64_t entries = (2 * s.Wh - 1) * (2 * s.Ww - 1);
  const double scale = 1 / std::sqrt(static_cast<double>(d));
  std::vector<T> qkv = random_vector<T>(B * H * W * 3 * C, -2, 2, rng);
  std::vector<T> table = random_vector<T>(s.table ? entries * heads : 0, -1, 1, rng);
  std::vector<T> pad = random_vector<T>(s.pad ? 3 * C : 0, -1, 1, rng);
  std::vector<T> grad = random_vector<T>(B * H * W * C, -1, 1, rng);
  if (s.nan) qkv[((1 * H + H / 2) * W + W / 3) * 3 * C + (heads - 1) * d + d / 2] = T(NAN);  // image 1, a q channel
  const Reference want = reference(s, qkv, table, pad, grad, scale);

  const WindowAttentionPlan plan = window_attention_plan(B, H, W, C, heads, s.Wh, s.Ww, s.sh, s.sw, s.table, s.pad,
                                                         sizeof(acc), s.aligned, s.kv_bytes);
  Outcome o;
  o.require(plan.error.empty(), "plan_error");
  const auto grid = [](const Grid3& g) { return dim3(g.x, g.y, g.z); };
  WindowAttentionParams<T, acc> p = window_attention_params<WindowAttentionParams<T, acc>>(
      plan, qkv.data(), s.table ? table.data() : nullptr, s.pad ? pad.data() : nullptr, scale);

  // ---- forward, as window_attention_fwd_cuda
  std::vector<T> out(B * H * W * C, T(-7.f));
  p.out = out.data();
  emu_launch(grid(plan.fwd_grid), kThreads, [&] { window_attention_fwd_kernel<T, acc>(p); }, plan.fwd_smem_bytes);

  // ---- backward, as window_attention_bwd_cuda: window chunks, then the partial sums
  std::vector<T> grad_qkv(qkv.size(), T(-7.f)), grad_table(table.size(), T(-7.f)), grad_pad(pad.size(), T(-7.f));
  std::vector<acc> kv(plan.kv_elems, NAN), partial(plan.partial_elems, NAN);
  p.out = nullptr;
  p.grad = grad.data();
  p.grad_qkv = grad_qkv.data();
  p.kv = kv.data();
  p.partial = partial.data();
  int launches = 0;
  for (int64_t w0 = 0; w0 < plan.windows; w0 += plan.chunk_windows, ++launches) {
    p.window_begin = w0;
    emu_launch(grid(plan.bwd_grid(w0)), kThreads, [&] { window_attention_bwd_kernel<T, acc>(p); },
               plan.bwd_smem_bytes);
  }
  if (plan.slot > 0) {
    emu_launch(grid(plan.sum_grid), kThreads, [&] {
      window_attention_sum_kernel<T, acc>(partial.data(), grad_table.data(), grad_pad.data(), plan.windows, heads,
                                          plan.slot, plan.table_slot, d, C);
    });
  }

  const Tol tol = tol_for<T>();
  o.check_pattern("out", out, want.out, tol);
  o.check_pattern("grad_qkv", grad_qkv, want.grad_qkv, tol);
  if (s.table) o.check_pattern("grad_table", grad_table, want.grad_table, tol);
  if (s.pad) o.check_pattern("grad_pad", grad_pad, want.grad_pad, tol);
  char buf[160];
  std::snprintf(buf, sizeof buf, " N=%ld bq=%ld qblocks=%ld chunks=%d vec=%d smem=%ld/%ld", static_cast<long>(plan.N),
                static_cast<long>(plan.bq), static_cast<long>(tile_ceil_div(plan.N, plan.bq)), launches,
                static_cast<int>(plan.vec), static_cast<long>(plan.fwd_smem_bytes),
                static_cast<long>(plan.bwd_smem_bytes));
  o.detail = buf + o.detail;
  return o;
}

template <typename T>
Case make(Shape s, const char* what) {
  static uint32_t seed = 41;
  const uint32_t sd = seed++;
  char name[240];
  std::snprintf(name, sizeof name, "%s B=%d H=%d W=%d heads=%d d=%d window=%dx%d shift=%d,%d table=%d pad=%d "
                "aligned=%d%s (%s)", dtype_name<T>(), s.B, s.H, s.W, s.heads, s.d, s.Wh, s.Ww, s.sh, s.sw, s.table,
                s.pad, s.aligned, s.nan ? " nan" : "", what);
  return Case{name, [=] { return run<T>(s, sd); }};
}

int main(int argc, char** argv) {
  parse_args(argc, argv);
  constexpr int64_t kBig = kWindowKvWorkspaceBytes;
  // kv cap of 1 window of 3 heads x 2 x 32 x 16 fp32 values: 2 backward launches over 2 windows.
  constexpr int64_t kOneWindow = 3 * 2 * 32 * 16 * 4;
  return run_cases(
      "window_attention",
      {
          make<float>({2, 3, 7, 3, 16, 4, 8, 2, 4, true, true, true, kOneWindow, false},
                      "4x8 windows, map padded both ways, shifted; 2 backward launches"),
          make<float>({2, 6, 6, 1, 32, 7, 7, 0, 0, true, false, true, kBig, false},
                      "7x7 (Swin), no shift, padded keys excluded"),
          make<float>({2, 7, 6, 2, 6, 7, 7, 3, 3, false, true, true, kBig, false},
                      "7x7 shifted, no table; d 6: scalar path"),
          make<float>({2, 7, 5, 1, 16, 7, 7, 3, 3, false, false, false, kBig, false},
                      "unaligned: scalar path; no table, no pad"),
          make<double>({2, 6, 14, 1, 16, 8, 16, 4, 8, true, true, true, kBig, false},
                       "fp64, 8x16: 4 query blocks"),
          make<float>({2, 12, 10, 1, 16, 12, 12, 6, 6, true, true, true, kBig, false},
                      "12x12: 5 query blocks, the last ragged"),
          make<float>({2, 3, 8, 1, 128, 4, 8, 0, 4, true, true, true, kBig, false}, "d 128, the largest head_dim"),
          make<BF16>({2, 7, 6, 2, 32, 7, 7, 3, 3, true, true, true, kBig, false}, "16-bit data, shifted, pad"),
          make<float>({2, 7, 6, 2, 16, 7, 7, 3, 3, true, true, true, kBig, true},
                      "a NaN query channel: its row, the keys' gradients and its table entries are NaN"),
      });
}
