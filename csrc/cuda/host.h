#pragma once
// Host-side launch helpers shared by every csrc/cuda/<op>.cu: the SM count,
// Grid3 -> dim3, and the dynamic shared-memory check. ATen/CUDA runtime only:
// the emulation drivers (tests/cuda_emu) include the kernel headers, never this.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "common/cuda_helpers.cuh"
#include "common/tile_math.h"

namespace fastctx {

inline int64_t sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

inline dim3 to_dim3(const Grid3& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

// Raises kKernel's dynamic shared-memory limit on this device (once) to
// `max_bytes`, the largest size any launch of the instantiation needs, and
// checks that this launch's `bytes` fit what the device grants. The error
// reads "<op>: <what> needs <bytes> bytes of shared memory per block, the
// device allows <n> (<hint>)".
template <auto kKernel>
void require_dynamic_smem(int64_t bytes, int64_t max_bytes, const char* op, const std::string& what,
                          const char* hint) {
  const DynamicSmemLimit limit = dynamic_smem_limit<kKernel>(max_bytes);
  C10_CUDA_CHECK(limit.error);
  TORCH_CHECK(bytes <= limit.bytes, op, ": ", what, " needs ", bytes,
              " bytes of shared memory per block, the device allows ", limit.bytes, " (", hint, ")");
}

}  // namespace fastctx
