#pragma once
// Integer tiling arithmetic, block geometry and launch limits of the CUDA
// kernels. Plain C++ (no CUDA): the device code (csrc/cuda/<op>_kernel.cuh),
// the launch plans (csrc/cuda/<op>_launch.h) and the CPU emulation of the
// kernels in tests/cuda_emu all use these same definitions.
#include <cstdint>
#include <string>

#include "macros.h"

namespace fastctx {

constexpr int kWarpSize = 32;
// Threads per block of every fastctx kernel except the one-warp dot products.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// CUDA grid limits, and the dynamic shared memory a block gets without
// opting in through cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kDefaultDynamicSmem = 48 * 1024;

// Integer ceil(a / b) for a >= 0, b > 0.
FASTCTX_HOST_DEVICE int64_t tile_ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Contiguous, balanced split of `total` items into `parts` ranges: part p owns
// [tile_split_begin(p), tile_split_begin(p + 1)). Every range is non-empty
// when parts <= total, which the partial-sum reductions rely on (each part
// writes its whole partial slice).
FASTCTX_HOST_DEVICE int64_t tile_split_begin(int64_t part, int64_t total, int64_t parts) {
  return part * total / parts;
}

// A launch grid as plain integers (the .cu files turn it into a dim3 after
// the plan has checked it against the limits).
struct Grid3 {
  int64_t x = 1, y = 1, z = 1;
};

// Empty when `grid` fits the CUDA limits, else what overflows and how to
// split the call. `batch_dim` names the grid dimension that grows with the
// batch (0 = x, 2 = z, -1 none) and `batch` its size, so the message can say
// how many images one call may hold.
inline std::string grid_limit_error(const char* kernel, const Grid3& grid, int batch_dim, int64_t batch) {
  const int64_t size[3] = {grid.x, grid.y, grid.z};
  const int64_t limit[3] = {kMaxGridX, kMaxGridYZ, kMaxGridYZ};
  for (int d = 0; d < 3; ++d) {
    if (size[d] <= limit[d]) continue;
    std::string msg = std::string(kernel) + ": grid." + "xyz"[d] + " = " + std::to_string(size[d]) +
                      " blocks exceeds the CUDA limit of " + std::to_string(limit[d]);
    if (d == batch_dim && batch > 1) {
      const int64_t per_image = tile_ceil_div(size[d], batch);
      const int64_t fits = per_image <= limit[d] ? limit[d] / per_image : 0;
      if (fits >= 1) return msg + "; split the batch into calls of at most " + std::to_string(fits) + " images";
    }
    return msg + "; a single image of this size is beyond the CUDA kernels";
  }
  return std::string();
}

}  // namespace fastctx
