#pragma once
// What every fastctx CUDA kernel shares: named barriers, vector packs, the
// alignment test, warp reductions, dynamic shared memory and cp.async; plus,
// in nvcc builds only, the host-side setter of the dynamic shared-memory
// limit.
//
// The device part compiles under nvcc and, for the CPU emulation in
// tests/cuda_emu, under the host compiler after tests/cuda_emu/emu.h (which
// defines FASTCTX_CUDA_EMU and the CUDA built-ins). The geometry constants
// (kThreads, kWarps) and ceil-div live in tile_math.h, included here, so the
// plain C++ launch plans use the same values.
#if !defined(__CUDACC__) && !defined(FASTCTX_CUDA_EMU)
#error "cuda_helpers.cuh is device code: compile with nvcc, or include tests/cuda_emu/emu.h first"
#endif

#include <cstdint>

#include "common/macros.h"
#include "common/tile_math.h"

// __syncthreads() under a name (an enumerator of the kernel's header), so the
// emulation tests can drop one barrier (-DFASTCTX_EMU_DROP_BARRIER=<name>) and
// check that the result then goes wrong. A plain __syncthreads() otherwise.
// The names are compared as strings, so a header shared by several ops
// (common/partials.cuh) need not see the dropped barrier's enumerator.
#if defined(FASTCTX_CUDA_EMU) && defined(FASTCTX_EMU_DROP_BARRIER)
#define FASTCTX_SYNC_NAME_(x) #x
#define FASTCTX_SYNC_NAME(x) FASTCTX_SYNC_NAME_(x)
constexpr bool fastctx_same_barrier(const char* a, const char* b) {
  while (*a != 0 && *a == *b) ++a, ++b;
  return *a == *b;
}
#define FASTCTX_SYNC(name)                                                                       \
  do {                                                                                           \
    static_assert(sizeof(name) > 0, "a barrier is named by an enumerator");                      \
    if (!fastctx_same_barrier(#name, FASTCTX_SYNC_NAME(FASTCTX_EMU_DROP_BARRIER))) __syncthreads(); \
  } while (0)
#else
#define FASTCTX_SYNC(name) __syncthreads()
#endif

namespace fastctx {

// K elements of T accessed as one vector (K * sizeof(T) a power of two);
// alignment capped at 16 bytes, the widest load/store.
template <typename T, int K>
struct alignas(sizeof(T) * K < 16 ? sizeof(T) * K : 16) Pack {
  T v[K];
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

FASTCTX_HOST_DEVICE bool is_aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Butterfly reductions over aligned groups of kWidth lanes (lanes kWidth*g ..
// kWidth*g + kWidth-1; the whole warp by default): every lane of a group ends
// with the same value, combined in an order independent of scheduling. The
// maximum ignores NaN (a NaN never wins the comparison). All 32 lanes must
// take part (full mask).
template <int kWidth = 32, typename T>
__device__ __forceinline__ T warp_sum(T v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: a power of two <= 32");
#pragma unroll
  for (int off = kWidth / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int kWidth = 32, typename T>
__device__ __forceinline__ T warp_max(T v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: a power of two <= 32");
#pragma unroll
  for (int off = kWidth / 2; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// The block's dynamic shared memory (the launch's third <<<>>> argument).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(FASTCTX_CUDA_EMU)
  return reinterpret_cast<T*>(emu_dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char fastctx_dynamic_smem[];
  return reinterpret_cast<T*>(fastctx_dynamic_smem);
#endif
}

// ---- cp.async: 16-byte global -> shared copies ----------------------------
// On sm_80+ a copy completes asynchronously: its data is in shared memory
// (for the issuing thread) once cp_async_wait<N> has retired its group, and
// for the block after the __syncthreads that follows. Older GPUs copy at
// issue, which is one valid schedule of the same program (an asynchronous
// copy may land any time before its wait), so the callers' commit / wait /
// barrier placement is correct on both.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(FASTCTX_CUDA_EMU)
  emu_cp_async16(smem, gmem);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *reinterpret_cast<Pack<unsigned, 4>*>(smem) = *reinterpret_cast<const Pack<unsigned, 4>*>(gmem);
#endif
}

// Closes the thread's current group of copies.
__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTCTX_CUDA_EMU)
  emu_cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of the thread's committed groups are in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTCTX_CUDA_EMU)
  emu_cp_async_wait(PENDING);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

}  // namespace fastctx

// ---- host side (nvcc builds): the dynamic shared-memory limit -------------
#if defined(__CUDACC__) && !defined(FASTCTX_CUDA_EMU)
#include <cuda_runtime.h>

#include <memory>
#include <mutex>

namespace fastctx {

struct DynamicSmemLimit {
  cudaError_t error;
  int64_t bytes;  // dynamic shared memory a launch of the kernel may use on this device
};

inline DynamicSmemLimit raise_dynamic_smem_limit(const void* kernel, int64_t max_bytes, int device) {
  int optin = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return {err, 0};
  if (max_bytes <= kDefaultDynamicSmem) return {cudaSuccess, kDefaultDynamicSmem < optin ? kDefaultDynamicSmem : optin};
  const int64_t bytes = max_bytes < optin ? max_bytes : optin;
  return {cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), bytes};
}

// Raises kKernel's dynamic shared-memory limit on the current device to
// min(max_bytes, the device's opt-in maximum), once per kernel instantiation
// and device: `max_bytes` is the largest size any launch of kKernel can need
// (a constant of the instantiation), so no later call changes the attribute
// and concurrent host threads never race on it. Callers check their launch's
// size against the returned `bytes` and raise on `error`.
template <auto kKernel>
DynamicSmemLimit dynamic_smem_limit(int64_t max_bytes) {
  struct PerDevice {
    std::once_flag once;
    DynamicSmemLimit limit{cudaSuccess, 0};
  };
  static const int devices = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  }();
  static const std::unique_ptr<PerDevice[]> state(new PerDevice[devices > 0 ? devices : 1]);
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return {err, 0};
  if (device >= devices) return {cudaErrorInvalidDevice, 0};
  PerDevice& s = state[device];
  std::call_once(s.once, [&] {
    s.limit = raise_dynamic_smem_limit(reinterpret_cast<const void*>(kKernel), max_bytes, device);
  });
  return s.limit;
}

}  // namespace fastctx
#endif
