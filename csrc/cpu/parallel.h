#pragma once
// How the CPU kernels split work across threads, and how they pick SIMD code.
//
// Two kinds of parallel loop:
//  * independent items (the (b, c) planes of pyramid_pool and residual_relu):
//    at::parallel_for with task_grain(), so each task has enough work to
//    amortise its scratch setup. Results do not depend on the split.
//  * reductions over pixel tiles (gla_context's and encoding's backward sums,
//    encoding's forward): the tiles of each independent row are cut into
//    chunks by plan_chunks(), which looks at the shapes only, never at the
//    thread count. Each chunk owns a partial-sum buffer and the partials are
//    reduced in chunk order, so results are bit-identical run to run and for
//    any torch.set_num_threads (tests/test_determinism.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __SSE2__
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

namespace fastctx {
namespace cpu {

// ---------------------------------------------------------------------------
// Work splitting

// Elements a parallel task touches at least.
constexpr int64_t kMinTaskElems = 32768;

// Items per task (at::parallel_for's grain) for items of `item_elems` elements.
inline int64_t task_grain(int64_t item_elems) {
  return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, item_elems));
}

// Chunks a reduction aims for in total: parallel slack for a few dozen
// threads, while the partial buffers (one per chunk, fresh memory on every
// call, and page faults are not free) stay a few MiB at most.
constexpr int64_t kTargetChunks = 64;

// `rows` independent rows (images, (batch, group) pairs) of `tiles_per_row`
// tiles each. Chunk j of a row holds tiles [j * tiles_per_chunk,
// min((j + 1) * tiles_per_chunk, tiles_per_row)).
struct ChunkPlan {
  int64_t tiles_per_chunk;
  int64_t chunks_per_row;
  int64_t chunks;  // rows * chunks_per_row
};

// About kTargetChunks chunks in total, but at least `min_tiles_per_chunk`
// tiles per chunk (which bounds the partials' memory against the input's).
inline ChunkPlan plan_chunks(int64_t rows, int64_t tiles_per_row, int64_t min_tiles_per_chunk = 1) {
  const int64_t by_count = (rows * tiles_per_row + kTargetChunks - 1) / kTargetChunks;
  ChunkPlan p;
  p.tiles_per_chunk = std::max<int64_t>({1, by_count, min_tiles_per_chunk});
  p.chunks_per_row = (tiles_per_row + p.tiles_per_chunk - 1) / p.tiles_per_chunk;
  p.chunks = rows * p.chunks_per_row;
  return p;
}

// ---------------------------------------------------------------------------
// Subnormal flushing
//
// On x86 an arithmetic instruction that reads or produces a subnormal number
// takes a microcode assist of a hundred cycles or more. Attention over Swin's
// shifted windows makes them by design: a -100 masked logit's fp32 weight is
// ~1e-44, and every product with it is subnormal or underflows. A kernel that
// can show such values never matter to its result (the caller's check) sets
// flush-to-zero and denormals-are-zero for the current thread while this
// object lives; the thread's previous mode is restored on destruction.
class FlushSubnormals {
 public:
  FlushSubnormals() {
#ifdef __SSE2__
    saved_ = current_ = _mm_getcsr();
#endif
  }
  ~FlushSubnormals() { set(false); }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

  // on: FTZ and DAZ set; off: the mode the thread had on construction.
  void set(bool on) {
#ifdef __SSE2__
    // MXCSR bits 15 (flush to zero) and 6 (denormals are zero).
    constexpr unsigned kFtzDaz = 0x8040;
    const unsigned want = on ? saved_ | kFtzDaz : saved_;
    if (want != current_) {
      _mm_setcsr(want);
      current_ = want;
    }
#else
    (void)on;
#endif
  }

 private:
  unsigned saved_ = 0, current_ = 0;
};

// ---------------------------------------------------------------------------
// SIMD
//
// The extension is built for baseline x86-64. Hot loops written with Simd<T>
// go into functions marked FASTCTX_SIMD_CLONES: GCC compiles them for AVX-512
// (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline, and the loader picks the
// best the machine has. The bodies must be inlined into the cloned function
// (always_inline), so they are compiled once per clone.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define FASTCTX_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCTX_SIMD_CLONES
#endif

// 32-byte GCC vectors: one ymm register in the v3/v4 clones, two xmm registers
// on the baseline. Only used inside always_inline bodies of cloned functions,
// so the baseline ABI of 32-byte vectors passed or returned by value never
// applies. GCC's -Wpsabi warning about it points at the definition or at the
// use, so it is silenced here and in the files using Simd; store takes its
// vector by reference, as the ABI note for parameters ignores the pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename scalar_t>
struct Simd {
  static constexpr int kLanes = 32 / sizeof(scalar_t);
  typedef scalar_t vec __attribute__((vector_size(32)));
  __attribute__((always_inline)) static vec load(const scalar_t* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  __attribute__((always_inline)) static void store(scalar_t* p, const vec& v) {
    std::memcpy(p, &v, sizeof(vec));
  }
};
#pragma GCC diagnostic pop

// Bit j of the result is !(p[j] <= 0) for j < 8: a compare + movemask pair per
// 4 floats with SSE2, which the portable loop costs several times over. The
// comparison is "not less or equal" so that NaN sets its bit (relu_active in
// common/activation.h).
template <typename scalar_t>
inline unsigned not_le_zero_bits8(const scalar_t* p) {
#ifdef __SSE2__
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m128 zero = _mm_setzero_ps();
    const int lo = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(p), zero));
    const int hi = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(p + 4), zero));
    return static_cast<unsigned>(lo | (hi << 4));
  }
#endif
  unsigned bits = 0;
  for (int j = 0; j < 8; ++j) bits |= static_cast<unsigned>(!(p[j] <= scalar_t(0))) << j;
  return bits;
}

}  // namespace cpu
}  // namespace fastctx
