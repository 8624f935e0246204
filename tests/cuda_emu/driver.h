// What the emulation drivers (tests/cuda_emu/<op>.cpp) share: a 16-bit
// stand-in type, the comparison with float64 references, and the runner that
// executes every case under the schedules of emu.h and prints one line per
// (case, schedule).
//
// Command line (tests/test_cuda_emulation.py passes the tolerances of
// tests/tolerances.py, so there is one table):
//   <driver> --tol f32=RTOL,ATOL --tol f64=RTOL,ATOL --tol bf16=RTOL,ATOL [--tol NAME=RTOL,ATOL ...]
//            [--case SUBSTRING] [--orders free,forward,reverse,random] [--sync-copies]
// Without --orders each case runs free and in one serialised order (forward,
// reverse and random in turn), and the first case of each op in all four.
// The last line is "ALL OK" or "FAILURES"; the exit status is 0 or 1.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "emu.h"

namespace emu_driver {

// bfloat16 stand-in: the top half of a float32, rounded to nearest even. The
// kernels only convert to and from their accumulation type, as with
// __nv_bfloat16, and load it in 16-byte vectors of 8.
struct BF16 {
  uint16_t bits = 0;
  BF16() = default;
  BF16(float f) {  // NOLINT: implicit, as __nv_bfloat16's
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = std::isnan(f) ? 0x7FC0 : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  BF16(double d) : BF16(static_cast<float>(d)) {}  // NOLINT
  operator float() const {                         // NOLINT
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// The kernels' accumulation type for a data type (at::opmath_type).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
const char* dtype_name() {
  return sizeof(T) == 8 ? "f64" : sizeof(T) == 4 ? "f32" : "bf16";
}

// The value a kernel sees for element v (bf16 data is exactly representable).
template <typename T>
double value(T v) {
  return static_cast<double>(static_cast<typename Acc<T>::type>(v));
}

struct Tol {
  double rtol = -1, atol = -1;
};

struct Options {
  std::map<std::string, Tol> tol;
  std::string only_case;
  std::vector<emu::Order> orders;  // empty: the default rotation
  bool sync_copies = false;
};
inline Options options;

template <typename T>
Tol tol_for() {
  return options.tol.at(dtype_name<T>());
}

// Outcome of one case under one schedule: one entry per compared output.
struct Outcome {
  bool ok = true;
  std::string detail;

  // tests/tolerances.py's assert_close: |got - want| <= atol * max|want| + rtol * |want|
  // per element. Records the worst ratio of error to allowance (<= 1 passes;
  // NaN or a size mismatch fails).
  template <typename T>
  void check(const char* what, const std::vector<T>& got, const std::vector<double>& want, Tol tol) {
    double scale = 0;
    for (const double w : want) scale = std::max(scale, std::fabs(w));
    double worst = got.size() == want.size() ? 0 : INFINITY;
    for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
      const double g = value(got[i]);
      const double allowed = tol.atol * scale + tol.rtol * std::fabs(want[i]);
      const double err = std::fabs(g - want[i]);
      const double ratio = std::isnan(g) ? INFINITY : err == 0 ? 0 : err / (allowed > 0 ? allowed : 1e-300);
      worst = std::max(worst, ratio);
    }
    ok &= worst <= 1;
    char buf[96];
    std::snprintf(buf, sizeof buf, " %s=%.2g", what, worst);
    detail += buf;
  }

  // As check, where the reference has NaN or +-inf: those elements must match
  // exactly (NaN where NaN, the same infinity), the finite ones within the
  // tolerance scaled by the largest finite |want|. Prints the worst ratio, and
  // the count of NaNs expected and of non-finite mismatches when either is set.
  template <typename T>
  void check_pattern(const char* what, const std::vector<T>& got, const std::vector<double>& want, Tol tol) {
    double scale = 0;
    for (const double w : want)
      if (std::isfinite(w)) scale = std::max(scale, std::fabs(w));
    double worst = got.size() == want.size() ? 0 : INFINITY;
    int64_t pattern = 0, nans = 0;
    for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
      const double g = value(got[i]), w = want[i];
      nans += std::isnan(w);
      if (!std::isfinite(w) || !std::isfinite(g)) {
        pattern += !(std::isnan(w) ? std::isnan(g) : g == w);
        continue;
      }
      const double allowed = tol.atol * scale + tol.rtol * std::fabs(w);
      const double err = std::fabs(g - w);
      worst = std::max(worst, err == 0 ? 0 : err / (allowed > 0 ? allowed : 1e-300));
    }
    ok &= worst <= 1 && pattern == 0;
    char buf[128];
    std::snprintf(buf, sizeof buf, pattern || nans ? " %s=%.2g(nan=%ld,mismatch=%ld)" : " %s=%.2g", what, worst,
                  static_cast<long>(nans), static_cast<long>(pattern));
    detail += buf;
  }

  void require(bool cond, const char* what) {
    if (!cond) {
      ok = false;
      detail += std::string(" ") + what;
    }
  }
};

struct Case {
  std::string name;  // dtype and shape, as printed
  std::function<Outcome()> run;
};

inline std::vector<emu::Order> parse_orders(const std::string& list) {
  std::vector<emu::Order> out;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    const std::string o = list.substr(start, end - start);
    if (o == "free") out.push_back(emu::Order::kFree);
    else if (o == "forward") out.push_back(emu::Order::kForward);
    else if (o == "reverse") out.push_back(emu::Order::kReverse);
    else if (o == "random") out.push_back(emu::Order::kRandom);
    else emu::fatal("unknown order '%s'", o.c_str());
    start = end + 1;
  }
  return out;
}

inline void parse_args(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&] {
      if (i + 1 >= argc) emu::fatal("%s needs a value", a.c_str());
      return std::string(argv[++i]);
    };
    if (a == "--tol") {
      const std::string v = next();
      const size_t eq = v.find('='), comma = v.find(',');
      if (eq == std::string::npos || comma == std::string::npos) emu::fatal("--tol NAME=RTOL,ATOL, got %s", v.c_str());
      options.tol[v.substr(0, eq)] = Tol{std::stod(v.substr(eq + 1, comma - eq - 1)), std::stod(v.substr(comma + 1))};
    } else if (a == "--case") {
      options.only_case = next();
    } else if (a == "--orders") {
      options.orders = parse_orders(next());
    } else if (a == "--sync-copies") {
      options.sync_copies = true;
    } else {
      emu::fatal("unknown argument %s", a.c_str());
    }
  }
  for (const char* name : {"f32", "f64", "bf16"})
    if (!options.tol.count(name)) emu::fatal("missing --tol %s=RTOL,ATOL", name);
}

// Runs the cases (see the file comment) and returns main's exit status.
inline int run_cases(const char* op, const std::vector<Case>& cases) {
  bool ok = true;
  int ran = 0;
  const emu::Order serial[3] = {emu::Order::kForward, emu::Order::kReverse, emu::Order::kRandom};
  for (size_t c = 0; c < cases.size(); ++c) {
    if (!options.only_case.empty() && cases[c].name.find(options.only_case) == std::string::npos) continue;
    std::vector<emu::Order> orders = options.orders;
    if (orders.empty()) {
      orders = {emu::Order::kFree, serial[c % 3]};
      if (c == 0) orders = {emu::Order::kFree, emu::Order::kForward, emu::Order::kReverse, emu::Order::kRandom};
    }
    for (const emu::Order order : orders) {
      emu::settings.order = order;
      emu::settings.seed = static_cast<unsigned>(1 + c);
      emu::settings.sync_copies = options.sync_copies;
      emu::stats.unwaited_copies = 0;
      Outcome out = cases[c].run();
      out.require(emu::stats.unwaited_copies == 0, "cp.async_never_waited");
      std::printf("%s %s %s order=%s%s%s\n", out.ok ? "ok" : "FAIL", op, cases[c].name.c_str(), emu::order_name(order),
                  options.sync_copies ? " sync_copies" : "", out.detail.c_str());
      std::fflush(stdout);
      ok &= out.ok;
      ++ran;
    }
  }
  if (ran == 0) {
    std::printf("no case matches '%s'\nFAILURES\n", options.only_case.c_str());
    return 1;
  }
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}

// Uniform random data in [lo, hi), rounded to T.
template <typename T>
std::vector<T> random_vector(size_t n, double lo, double hi, std::mt19937& rng) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(d(rng));
  return v;
}

}  // namespace emu_driver
