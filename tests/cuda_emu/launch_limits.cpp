// The launch plans (csrc/cuda/<op>_launch.h) turn calls beyond the CUDA grid
// limits or the kernels' 32-bit indexing into errors that say which limit and
// how to split the call, before anything is allocated or launched. Plain C++:
// no emulation needed, the sizes are far too large to run.
#include <cstdio>
#include <string>

#include "cuda/class_attention_launch.h"
#include "cuda/class_gather_launch.h"
#include "cuda/encoding_launch.h"
#include "cuda/gla_context_launch.h"
#include "cuda/pyramid_pool_launch.h"
#include "cuda/residual_relu_launch.h"
#include "cuda/upsample_add_launch.h"
#include "cuda/window_attention_launch.h"
#include "cuda/window_pool_launch.h"

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

  // Class context: K within the shared-memory tiles; the image is grid.y.
  ok &= expect("class_gather fits", class_gather_plan(16, 512, 150, 128 * 256, 4, 4, true, 108).error, "");
  ok &= expect("class_attention fits", class_attention_plan(16, 150, 256, 512, 128 * 256, 4, 4, true, 108).error, "");
  ok &= expect("class_gather K", class_gather_plan(1, 512, 257, 4096, 4, 4, true, 108).error,
               "expected 1 <= K <= 256 classes");
  ok &= expect("class_attention K", class_attention_plan(1, 0, 256, 512, 4096, 4, 4, true, 108).error,
               "expected 1 <= K <= 256 classes");
  ok &= expect("class_gather grid.y", class_gather_plan(70000, 64, 19, 256, 4, 4, true, 108).error,
               "grid.y = 70000 blocks exceeds the CUDA limit of 65535; split the batch into calls of at most 65535 "
               "images");
  ok &= expect("class_attention grid.y", class_attention_plan(70000, 19, 64, 64, 256, 4, 4, true, 108).error,
               "grid.y = 70000 blocks exceeds the CUDA limit of 65535; split the batch into calls of at most 65535 "
               "images");

  // Window attention: one block per (window, head) on grid.x; windows up to 1024 tokens.
  ok &= expect("window_attention fits", window_attention_plan(16, 64, 128, 256, 8, 4, 8, 2, 4, true, true, 4, true).error,
               "");
  ok &= expect("window_attention window", window_attention_plan(1, 40, 40, 64, 2, 33, 33, 0, 0, true, true, 4, true).error,
               "window of 1089 tokens with head_dim 32 is beyond the CUDA kernels");
  ok &= expect("window_attention grid.x",
               window_attention_plan(40000000, 8, 8, 64, 64, 8, 8, 0, 0, true, false, 4, true).error,
               "window_attention: grid.x = 2560000000 blocks exceeds the CUDA limit of 2147483647; split the batch "
               "into calls of at most 33554431 images");

  // window_pool and upsample_add: 32-bit pixel and token indices.
  ok &= expect("window_pool fits", window_pool_plan("window_pool_fwd", 2 * 16 * 16, 2 * 64 * 128, 256, 4, true, 2).error,
               "");
  ok &= expect("window_pool pixels", window_pool_plan("window_pool_bwd", 1 << 20, int64_t(3) << 30, 8, 4, true, 3).error,
               "window_pool_bwd: B*Hp*Wp = 3221225472 map pixels exceeds the kernels' 32-bit indices (at most "
               "2^31 - 1); split the batch into calls of at most 1 images");
  ok &= expect("window_pool channels", window_pool_plan("window_pool_fwd", 4, 64, (int64_t(1) << 30) + 1, 4, true, 1).error,
               "C = 1073741825 channels exceeds the kernels' limit of 2^30");
  ok &= expect("upsample_add fits", upsample_add_plan("upsample_add_fwd", false, 2, 16, 16, 64, 128, 256, 4, true).error,
               "");
  ok &= expect("upsample_add pixels", upsample_add_plan("upsample_add_fwd", false, 3, 8, 8, 32768, 32768, 8, 4, true).error,
               "upsample_add_fwd: B*H*W output pixels = 3221225472 exceeds the kernels' 32-bit indices (at most "
               "2^31 - 1); split the batch into calls of at most 1 images");
  ok &= expect("upsample_add tokens", upsample_add_plan("upsample_add_bwd", true, 1, 65536, 65536, 2, 2, 8, 4, true).error,
               "upsample_add_bwd: B*h*w tokens = 4294967296 exceeds the kernels' 32-bit indices (at most 2^31 - 1); "
               "a single image of this size is beyond the CUDA kernels");
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
