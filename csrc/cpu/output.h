#pragma once
// Fresh output tensors of the CPU kernels (forward outputs and input
// gradients), backed by transparent huge pages where the OS offers them.
//
// A tensor of tens of MiB is a fresh mmap on every call (glibc's mmap
// threshold stops at 32 MiB), and its first touch costs a page fault and a
// page clear per 4 KiB: for a 32 MiB gradient about 12 ms on one core, longer
// than the class_gather backward that writes it (7 ms). Advising the 2 MiB
// aligned interior of the buffer MADV_HUGEPAGE, before anything touches it,
// makes that one fault per 2 MiB (THP mode "madvise" or "always"; a no-op under
// "never"). PyTorch does the same for every allocation when
// THP_MEM_ALLOC_ENABLE=1. Only whole huge pages inside the tensor are advised,
// so resident memory does not grow; memory reused from the heap, already
// mapped, is unaffected.
//
// An output past the caches that a kernel writes whole and never reads back
// can be written with non-temporal stores (streams_past_caches, stream_scaled,
// stream_fence): a normal store first reads each line for ownership.
#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#ifdef __SSE2__
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastctx {
namespace cpu {

// Tensors below this size get no advice (a huge page or less of interior).
constexpr int64_t kHugePageBytes = int64_t{1} << 21;
constexpr int64_t kMinAdvisedBytes = 2 * kHugePageBytes;

inline at::Tensor advise_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes >= kMinAdvisedBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t mask = static_cast<uintptr_t>(kHugePageBytes - 1);
    const uintptr_t first = (begin + mask) & ~mask;
    const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~mask;
    // Advice only: on failure (THP disabled, an old kernel) the pages stay 4 KiB.
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return advise_huge_pages(at::empty(sizes, options));
}

// Contiguous, of t's sizes and options.
inline at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options());
}

// Outputs of at least this many bytes are written past the caches: a fresh
// allocation this size is not in cache, so a plain store first reads each line
// for ownership from memory. Smaller ones (a few cache-resident MiB at most)
// stay in cache for the op that reads them next. At 4 MiB (an AVX-512 EPYC,
// Swin-T stage 1's 7.2 MiB grad_qkv): window_attention's backward 7.0-7.4 ->
// 5.9-6.5 ms, and with the qkv Linear's input-gradient product reading
// grad_qkv after it, 12.1-12.8 -> 10.9-11.4 ms (that product no slower).
constexpr int64_t kStreamBytes = int64_t{4} << 20;

inline bool streams_past_caches(const at::Tensor& output) {
  return static_cast<int64_t>(output.nbytes()) >= kStreamBytes;
}

// dst[j] = scale * src[j], j < n, with non-temporal stores. Returns false, and
// writes nothing, where it cannot (no SSE2, dst not 16-byte aligned, n not a
// whole number of 16-byte vectors): the caller stores plainly. A task that
// streamed ends with stream_fence().
template <typename T>
inline bool stream_scaled(T* dst, const T* src, int64_t n, T scale) {
#ifdef __SSE2__
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (n * sizeof(T)) % 16 != 0) return false;
  if constexpr (std::is_same_v<T, float>) {
    const __m128 k = _mm_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 4) _mm_stream_ps(dst + j, _mm_mul_ps(k, _mm_loadu_ps(src + j)));
    return true;
  } else if constexpr (std::is_same_v<T, double>) {
    const __m128d k = _mm_set1_pd(scale);
    for (int64_t j = 0; j < n; j += 2) _mm_stream_pd(dst + j, _mm_mul_pd(k, _mm_loadu_pd(src + j)));
    return true;
  }
#endif
  return false;
}

// Orders a task's non-temporal stores before the parallel region's join.
inline void stream_fence() {
#ifdef __SSE2__
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace fastctx
