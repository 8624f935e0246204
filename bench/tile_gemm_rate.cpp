// The rate of cpu::tile_gemm (csrc/cpu/class_tiles.h), the CPU kernels' products, on
// L1-resident operands: a window's shapes against larger ones, to tell how far the window
// kernels' products are from what the core sustains. One thread; the instruction set is
// picked at run time as in the extension.
//
//   g++ -O3 -march=x86-64 -std=c++20 -Icsrc bench/tile_gemm_rate.cpp -o /tmp/tile_gemm_rate
//   /tmp/tile_gemm_rate
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iterator>
#include <random>
#include <vector>

#include "cpu/class_tiles.h"

namespace {

volatile float sink;  // keeps the products live

int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

// GFLOP/s of out [R x n] (+)= coef [R x K] x [K x n], coef read by rows or, when
// `transposed`, by columns (dK = dS^T Qs), over about 2 GFLOP of calls. Rows are
// 16-element multiples apart, as the window kernels' buffers.
double rate(int64_t R, int64_t K, int64_t n, bool transposed) {
  const int64_t ldc = transposed ? round16(R) : round16(K), ldx = round16(n);
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<float> coef((transposed ? K : R) * ldc), x(K * ldx), out(R * ldx);
  for (float& v : coef) v = uniform(gen);
  for (float& v : x) v = uniform(gen);
  const int64_t calls = std::max<int64_t>(1, static_cast<int64_t>(2e9 / (2.0 * R * K * n)));
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i) {
    fastctx::cpu::tile_gemm<float>(R, K, n, coef.data(), transposed ? 1 : ldc, transposed ? ldc : 1,
                                   x.data(), ldx, out.data(), ldx, (i & 1) != 0);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  sink = out[0];
  return 2.0 * R * K * n * calls / seconds / 1e9;
}

}  // namespace

int main() {
  struct Case {
    int64_t R, K, n;
    bool transposed;
    const char* what;
  };
  const Case cases[] = {
      {49, 32, 48, false, "7x7 window, d 32: S = Qs K^T (48 keys in vectors)"},
      {49, 49, 32, false, "7x7 window, d 32: O = P V, dQ = dS K"},
      {49, 49, 32, true, "7x7 window, d 32: dK = dS^T Qs, dV = P^T dO"},
      {32, 32, 32, false, "4x8 window, d 32: S = Qs K^T"},
      {96, 96, 64, false, "96 x 96 x 64"},
      {150, 150, 64, false, "150 x 150 x 64"},
      {128, 256, 64, false, "128 x 256 x 64"},
  };
  std::printf("%-50s %s\n", "tile_gemm, fp32, one thread (R x K x n)", "GFLOP/s (2 rounds)");
  double rates[2][std::size(cases)];
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < std::size(cases); ++i) {
      const Case& c = cases[i];
      rates[round][i] = rate(c.R, c.K, c.n, c.transposed);
    }
  }
  for (size_t i = 0; i < std::size(cases); ++i) {
    std::printf("%-50s %6.1f %6.1f\n", cases[i].what, rates[0][i], rates[1][i]);
  }
  return 0;
}
