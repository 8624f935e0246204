// The launch plans (csrc/cuda/<op>_launch.h) turn calls beyond the CUDA grid
// limits or the kernels' 32-bit indexing into errors that say which limit and
// how to split the call, before anything is allocated or launched. Plain C++:
// no emulation needed, the sizes are far too large to run.
#include <cstdio>
#include <string>

#include "cuda/encoding_launch.h"
#include "cuda/gla_context_launch.h"
#include "cuda/pyramid_pool_launch.h"
#include "cuda/residual_relu_launch.h"

using namespace fastctx;

// needle "": the plan must have no error.
static bool expect(const char* what, const std::string& error, const char* needle) {
  const bool ok = *needle ? error.find(needle) != std::string::npos : error.empty();
  std::printf("%s %s: %s\n", ok ? "ok" : "FAIL", what, error.empty() ? "(no error)" : error.c_str());
  return ok;
}

int main() {
  bool ok = true;
  const int64_t scales[] = {1, 2, 3, 6};
  const int64_t groups[] = {1, 4, 9, 36};

  // Within the limits: no error.
  ok &= expect("residual_relu fits", residual_relu_plan(16, 512, 128 * 256, 4, true).error, "");
  ok &= expect("gla_context fits", gla_context_plan(true, groups, 4, 16, 512, 128 * 256, 4, true, 108).error, "");
  ok &= expect("encoding fits", encoding_plan(true, 16, 128 * 256, 2048, 64, true, 4, 1 << 30, true, 108, 2).error, "");

  // grid.x = B * C * chunks > 2^31 - 1.
  ok &= expect("residual_relu grid.x", residual_relu_plan(300000, 512, 128 * 256, 4, true).error,
               "grid.x = 2457600000 blocks exceeds the CUDA limit of 2147483647; split the batch into calls of at "
               "most 262143 images");
  ok &= expect("pyramid_pool_bwd grid.x", pyramid_pool_bwd_plan(scales, 4, 1 << 20, 512, 256, 256, 4).error,
               "split the batch into calls of at most");
  // grid.z = B > 65535.
  ok &= expect("gla_context_fwd grid.z", gla_context_plan(false, groups, 4, 70000, 8, 16, 4, true, 108).error,
               "grid.z = 70000 blocks exceeds the CUDA limit of 65535; split the batch into calls of at most 65535 "
               "images");
  // Group sizes the shared-memory tiles cannot hold.
  const int64_t big_group[] = {1, 200};
  ok &= expect("gla_context group size", gla_context_plan(false, big_group, 2, 1, 8, 16, 4, true, 108).error,
               "group 1 has 200 rows");
  // Encoding: 32-bit indices within an image; the reduce grids are 1-D, so a
  // large D alone overflows no grid dimension (it did as grid.y = D / 256).
  const auto encoding_d = [](int64_t D) { return encoding_plan(false, 1, 16, D, 32, true, 4, 1 << 30, true, 1, 1); };
  ok &= expect("encoding D within 2^24", encoding_d((1 << 24) - 64).error, "");
  ok &= expect("encoding D beyond 2^24", encoding_d((1 << 24) + 1).error,
               "channels per image (32-bit indices within an image)");
  ok &= expect("encoding K", encoding_plan(false, 1, 16, 8, 65, true, 4, 1 << 20, true, 1, 1).error,
               "expected 1 <= K <= 64");
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
