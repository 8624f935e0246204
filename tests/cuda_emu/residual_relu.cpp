// csrc/cuda/residual_relu.cu's kernels run under emu.h against a float64
// reference: outputs, the saved out > 0 bit mask (every byte, spare bits
// included), gradients and the per-channel sums. Covers the vector path with
// 1, 2 and 4 lanes per mask byte (16-, 32-, 64-bit data), the scalar path
// (warp ballot), partial last bytes and warps, and several chunks per plane.
// Built and run by tests/test_cuda_emulation.py; prints one line per case.
#include "emu.h"

#include <random>

#include "residual_relu.device.inc"  // the device part of the .cu file, extracted by the test

using namespace fastctx;

// A 2-byte float (bfloat16: the top half of a float32, rounded to nearest
// even) so the 8-elements-per-vector path runs too.
struct BF16 {
  uint16_t bits = 0;
  BF16() = default;
  BF16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
bool run(const char* name, int B, int C, int H, int W, bool allow_vec, double tol) {
  using acc = typename Acc<T>::type;
  static std::mt19937 rng(11);
  const int64_t N = static_cast<int64_t>(H) * W, n = B * C * N, MB = (N + 7) / 8;
  std::uniform_real_distribution<double> d(-1, 1);
  std::vector<T> y(n), r(n), g(n), out(n, T(-7.f)), out_nomask(n, T(-7.f)), gy(n, T(-7.f)), gr(n, T(-7.f));
  std::vector<uint8_t> mask(B * C * MB, 0xAB);  // any byte not written shows
  std::vector<acc> sc(C), sh(C), gs(C, -7), gh(C, -7);
  for (auto* v : {&y, &r, &g})
    for (auto& e : *v) e = T(static_cast<float>(d(rng)));
  for (int c = 0; c < C; ++c) {
    sc[c] = static_cast<acc>(d(rng) * 2);
    sh[c] = static_cast<acc>(d(rng) * 0.5);
  }
  const int64_t chunks = tile_ceil_div(N, chunk_elems<T>()), blocks = B * C * chunks;
  const bool vec = allow_vec && N % vec_width<T>() == 0;
  emu_launch(dim3(blocks), dim3(kThreads), [&] {
    residual_relu_fwd_kernel<T, acc>(y.data(), r.data(), sc.data(), sh.data(), out.data(), mask.data(), C, N,
                                     chunks, vec);
  });
  emu_launch(dim3(blocks), dim3(kThreads), [&] {
    residual_relu_fwd_kernel<T, acc>(y.data(), r.data(), sc.data(), sh.data(), out_nomask.data(), nullptr, C, N,
                                     chunks, vec);
  });
  const int64_t J = B * chunks;
  std::vector<acc> part(2 * C * J, NAN);
  emu_launch(dim3(blocks), dim3(kThreads), [&] {
    residual_relu_bwd_kernel<T, acc>(g.data(), y.data(), mask.data(), sc.data(), sh.data(), gy.data(), gr.data(),
                                     part.data(), part.data() + C * J, B, C, N, chunks, vec);
  });
  emu_launch(dim3(tile_ceil_div(C, kWarps)), dim3(kThreads), [&] {
    channel_sum_kernel<acc>(part.data(), part.data() + C * J, gs.data(), gh.data(), C, J);
  });

  double err = 0;
  std::vector<double> want_scale(C, 0), want_shift(C, 0);
  std::vector<uint8_t> want_mask(mask.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t plane = i / N, k = i % N;
    const int c = static_cast<int>(plane % C);
    const double u = static_cast<double>(static_cast<acc>(y[i])) * sc[c] + sh[c];
    const double o = std::max(0.0, std::max(0.0, u) + static_cast<double>(static_cast<acc>(r[i])));
    const double gg = o > 0 ? static_cast<double>(static_cast<acc>(g[i])) : 0, gu = u > 0 ? gg : 0;
    const double got_o = static_cast<acc>(out[i]);
    err = std::max({err, std::fabs(o - got_o) / (1 + std::fabs(o)),
                    std::fabs(static_cast<double>(static_cast<acc>(out_nomask[i])) - got_o),
                    std::fabs(gg - static_cast<acc>(gr[i])) / (1 + std::fabs(gg)),
                    std::fabs(gu * sc[c] - static_cast<acc>(gy[i])) / (1 + std::fabs(gu * sc[c]))});
    want_scale[c] += gu * static_cast<acc>(y[i]);
    want_shift[c] += gu;
    if (got_o > 0) want_mask[plane * MB + k / 8] |= static_cast<uint8_t>(1u << (k % 8));
  }
  for (int c = 0; c < C; ++c) {
    err = std::max({err, std::fabs(want_scale[c] - gs[c]) / (1 + std::fabs(want_scale[c])),
                    std::fabs(want_shift[c] - gh[c]) / (1 + std::fabs(want_shift[c]))});
  }
  int64_t bad_bytes = 0;
  for (size_t i = 0; i < mask.size(); ++i) bad_bytes += mask[i] != want_mask[i];
  const bool ok = err < tol && bad_bytes == 0;
  std::printf("%s %s B=%d C=%d N=%ld vec=%d chunks=%ld max_err=%.2g bad_mask_bytes=%ld\n", ok ? "ok" : "FAIL", name,
              B, C, static_cast<long>(N), static_cast<int>(vec), static_cast<long>(chunks), err,
              static_cast<long>(bad_bytes));
  return ok;
}

int main() {
  bool ok = true;
  ok &= run<float>("f32", 2, 3, 33, 33, true, 2e-5);    // N odd: scalar path (ballot), partial last byte
  ok &= run<float>("f32", 2, 3, 32, 100, true, 2e-5);   // vector path, 2 lanes per byte, 2 chunks with a tail
  ok &= run<float>("f32", 1, 2, 32, 100, false, 2e-5);  // scalar path, whole bytes, 2 chunks
  ok &= run<float>("f32", 1, 2, 5, 7, false, 2e-5);     // N = 35: one partial warp, partial byte
  ok &= run<double>("f64", 2, 9, 7, 10, true, 1e-12);   // vector path, 4 lanes per byte, N % 8 = 6; C > 8 warps
  ok &= run<double>("f64", 1, 3, 16, 16, true, 1e-12);  // vector path, whole bytes
  ok &= run<BF16>("bf16", 1, 2, 64, 80, true, 2e-2);    // vector path, 1 lane per byte, 2 chunks
  ok &= run<BF16>("bf16", 1, 3, 9, 9, true, 2e-2);      // N = 81: scalar path
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
