#pragma once
// Tile kernels of the CPU class-context ops (class_gather.cpp,
// class_attention.cpp). A tile is `rows` rows of n pixels, each row
// contiguous, rows `ld` elements apart: the layout of a pixel tile of an NCHW
// map (ld = H*W) and of the kernels' tile buffers.
//
//  * Softmax pieces on [K x n] class tiles. Softmaxes over pixels run along
//    rows, softmaxes over classes down columns; both are vectorised across
//    pixels. Compiled for AVX-512, AVX2+FMA and the baseline
//    (FASTCTX_SIMD_CLONES, cpu/parallel.h); exp_rows and row_max, the hot
//    ones, in ISA variants at the machine's vector width, as tile_gemm. A
//    pixel's result does not depend on where it sits in a tile: a row's last,
//    partial vector goes through the same vector code (partial loads and
//    stores).
//  * tile_gemm, the products of the kernels, all of one form: out = coef . x,
//    a small coefficient matrix times a tile whose rows are vectors. BLAS
//    packs both operands on every call, and MKL runs only its AVX2 code on
//    non-Intel CPUs; these register-blocked loops run at the vector width of
//    the machine (2-3x MKL on AVX-512 AMD CPUs at the kernels' shapes).
//  * pack_rows (a prefetching copy of an NCHW tile into a dense buffer) and
//    transpose_rows (a small [K x n] tile to [n x K]; fp32 in 8 x 8 register
//    blocks).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/class_context.h"
#include "cpu/parallel.h"

// GCC on x86-64 Linux: tile_gemm, exp_rows and row_max get one variant per
// instruction set (AVX-512, AVX2 + FMA, baseline), picked at run time.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define FASTCTX_TILE_GEMM_ISAS 1
#include <immintrin.h>
#endif

namespace fastctx {
namespace cpu {
namespace softmax_detail {

template <typename T>
using vec = typename Simd<T>::vec;
template <typename T>
constexpr int64_t kLanes = Simd<T>::kLanes;

// Vectors of kBytes (32 unless a caller picks its ISA's width, see exp_rows);
// a partial vector (the end of a row) has `count` <= kL elements and zeros in
// its other lanes. (Static members of a class template: only instantiated
// inside the cloned or ISA-specific entry points.)
template <typename T, int kBytes = 32>
struct V {
  typedef T vt __attribute__((vector_size(kBytes)));
  static constexpr int64_t kL = kBytes / sizeof(T);
  __attribute__((always_inline)) static vt all(T v) { return vt{} + v; }
  __attribute__((always_inline)) static vt load(const T* p, int64_t count) {
    vt v = {};
    if (count == kL) {
      std::memcpy(&v, p, sizeof(v));  // a plain vector load
    } else {
      std::memcpy(&v, p, count * sizeof(T));
    }
    return v;
  }
  __attribute__((always_inline)) static void store(T* p, const vt& v, int64_t count) {
    if (count == kL) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      std::memcpy(p, &v, count * sizeof(T));
    }
  }
  // scale * x rounded on its own, never fused into an FMA with what follows:
  // the forward's softmax and the backward's exp(scale * x - lse) then see the
  // same logit (with K = 1 the backward's weight is exactly 1, as the forward's).
  // The empty asm that holds the product in memory is the barrier: GCC's
  // __builtin_assoc_barrier rebuilds a vector lane by lane (some twenty
  // shuffles per vector). scale = 1 (the window kernels) needs neither; the
  // test is loop-invariant, and GCC unswitches the callers' loops on it.
  __attribute__((always_inline)) static vt scaled(T scale, const vt& x) {
    if (scale == T(1)) return x;
    vt product = scale * x;
    asm("" : "+m"(product));
    return product;
  }
  // The lanes' sum as a tree of halves (a fixed order, log2(kL) adds of
  // shrinking vectors, kept in registers).
  __attribute__((always_inline)) static T sum(const vt& v) {
    if constexpr (kL <= 2) {
      return kL == 2 ? v[0] + v[1] : v[0];
    } else {
      const auto [lo, hi] = halves(v);
      return V<T, kBytes / 2>::sum(lo + hi);
    }
  }
  // The lanes' maximum, as a tree of halves; NaN lanes are ignored unless
  // every lane is NaN (the callers' lanes never are).
  __attribute__((always_inline)) static T max(const vt& v) {
    if constexpr (kL <= 2) {
      return kL == 2 && v[1] > v[0] ? v[1] : v[0];
    } else {
      const auto [lo, hi] = halves(v);
      return V<T, kBytes / 2>::max(hi > lo ? hi : lo);
    }
  }
  // The low and high halves of v, as vectors of kBytes / 2.
  __attribute__((always_inline)) static auto halves(const vt& v) {
    typedef T half_t __attribute__((vector_size(kBytes / 2)));
    struct {
      half_t lo, hi;
    } h;
    std::memcpy(&h.lo, &v, sizeof(h.lo));
    std::memcpy(&h.hi, reinterpret_cast<const char*>(&v) + sizeof(h.lo), sizeof(h.hi));
    return h;
  }
};

// 64-byte vectors are used only by the AVX-512 (x86-64-v4) variants, which scale
// by 2^n with vscalefps / vscalefpd: one instruction for the two multiplications
// and four integer operations of the portable form, rounded once as that form
// is (its first factor is exact), subnormal results included.
template <int kBytes>
constexpr bool kAvx512Scalef =
#ifdef FASTCTX_TILE_GEMM_ISAS
    kBytes == 64;
#else
    false;
#endif

// v = exp(v) lane by lane, for v <= 88 (the kernels pass a value minus a
// maximum or a log-sum-exp: <= 0 up to rounding; +inf, which they never pass,
// gives NaN or inf depending on the variant). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, then Cephes' polynomial (float) or Pade form
// (double) for exp(r): within 1.1 ulp (float) and 2 ulp (double) of the exact
// value. Underflow is gradual, as std::exp: 2^n is applied as 2^(n/2) 2^(n-n/2),
// two normal factors, so results below the smallest normal number are the
// subnormals torch's exp gives (a -100-masked weight stays > 0, and times an
// infinite value gives inf, not NaN), and only x below log of half the
// smallest subnormal gives 0. -inf gives 0 and NaN stays NaN (the clamp's
// comparison is false for NaN, and 2^n multiplies, so it cannot turn a NaN's
// bits into a number).
template <typename T, int kBytes = 32>
__attribute__((always_inline)) inline void exp_inplace(typename V<T, kBytes>::vt& v) {
  using vec_t = typename V<T, kBytes>::vt;
  if constexpr (sizeof(T) == sizeof(float)) {
    const vec_t x = v;
    typedef int32_t ivec __attribute__((vector_size(kBytes)));
    // lo = log(FLT_TRUE_MIN / 2): exp rounds to 0 below; t + magic (1.5 * 2^23)
    // rounds t to an integer.
    const vec_t lo = V<T, kBytes>::all(-103.972084f);
    const vec_t magic = V<T, kBytes>::all(12582912.0f);
    const vec_t xc = x < lo ? lo : x;
    const vec_t t = xc * 1.44269504088896341f + magic;
    const vec_t n = t - magic;
    vec_t r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec_t p = V<T, kBytes>::all(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vec_t y = p * (r * r) + r + 1.0f;
    if constexpr (kAvx512Scalef<kBytes>) {
      y = __builtin_ia32_scalefps512_mask(y, n, y, static_cast<__mmask16>(-1), _MM_FROUND_CUR_DIRECTION);
    } else {
      const ivec n_int = (ivec)t - (ivec)magic;  // n in [-150, 127]
      const ivec half = n_int >> 1;
      y = y * (vec_t)((half + 127) << 23);          // 2^(n/2), exact
      y = y * (vec_t)((n_int - half + 127) << 23);  // 2^(n - n/2): one rounding
    }
    v = x < lo ? vec_t{} : y;
  } else {
    const vec_t x = v;
    typedef int64_t ivec __attribute__((vector_size(kBytes)));
    // lo = log(DBL_TRUE_MIN / 2): exp rounds to 0 below; magic = 1.5 * 2^52.
    const vec_t lo = V<T, kBytes>::all(-745.13321910194122);
    const vec_t magic = V<T, kBytes>::all(6755399441055744.0);
    const vec_t xc = x < lo ? lo : x;
    const vec_t t = xc * 1.4426950408889634074 + magic;
    const vec_t n = t - magic;
    vec_t r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    const vec_t rr = r * r;
    vec_t px = V<T, kBytes>::all(1.26177193074810590878e-4);
    px = px * rr + 3.02994407707441961300e-2;
    px = (px * rr + 9.99999999999999999910e-1) * r;
    vec_t qx = V<T, kBytes>::all(3.00198505138664455042e-6);
    qx = qx * rr + 2.52448340349684104192e-3;
    qx = qx * rr + 2.27265548208155028766e-1;
    qx = qx * rr + 2.00000000000000000009e0;
    vec_t y = px / (qx - px);
    y = y + y + 1.0;
    if constexpr (kAvx512Scalef<kBytes>) {
      y = __builtin_ia32_scalefpd512_mask(y, n, y, static_cast<__mmask8>(-1), _MM_FROUND_CUR_DIRECTION);
    } else {
      const ivec n_int = (ivec)t - (ivec)magic;  // n in [-1075, 128]
      const ivec half = n_int >> 1;
      y = y * (vec_t)((half + 1023) << 52);          // 2^(n/2), exact
      y = y * (vec_t)((n_int - half + 1023) << 52);  // 2^(n - n/2): one rounding
    }
    v = x < lo ? vec_t{} : y;
  }
}

// a[k, i] = softmax over k of scale * s[k, i]; lse[i] = log sum_k exp(scale * s[k, i]) when
// lse is given. a may be s (in place).
template <typename T>
__attribute__((always_inline)) inline void softmax_columns_body(T* a, int64_t lda, const T* s,
                                                                int64_t lds, int64_t K, int64_t n,
                                                                T scale, T* lse) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t i = 0; i < n; i += L) {
    const int64_t cnt = n - i < L ? n - i : L;
    vec<T> m = V<T>::all(-static_cast<T>(INFINITY));
    for (int64_t k = 0; k < K; ++k) {
      const vec<T> v = V<T>::scaled(scale, V<T>::load(s + k * lds + i, cnt));
      V<T>::store(a + k * lda + i, v, cnt);
      m = v > m ? v : m;  // ignores NaN: a NaN reaches the sum through exp
    }
    vec<T> sum = {};
    for (int64_t k = 0; k < K; ++k) {
      vec<T> e = V<T>::load(a + k * lda + i, cnt) - m;
      exp_inplace<T>(e);
      V<T>::store(a + k * lda + i, e, cnt);
      sum += e;
    }
    const vec<T> inv = T(1) / sum;
    for (int64_t k = 0; k < K; ++k) {
      V<T>::store(a + k * lda + i, V<T>::load(a + k * lda + i, cnt) * inv, cnt);
    }
    if (lse != nullptr) {
      for (int64_t j = 0; j < cnt; ++j) lse[i + j] = m[j] + class_log(sum[j]);
    }
  }
}

// a[k, i] = exp(scale * s[k, i] - shift[i]) (a softmax over k, recomputed from its log-sum-exp).
template <typename T>
__attribute__((always_inline)) inline void exp_columns_body(T* a, int64_t lda, const T* s,
                                                            int64_t lds, int64_t K, int64_t n,
                                                            T scale, const T* shift) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t i = 0; i < n; i += L) {
    const int64_t cnt = n - i < L ? n - i : L;
    const vec<T> sh = V<T>::load(shift + i, cnt);
    for (int64_t k = 0; k < K; ++k) {
      vec<T> e = V<T>::scaled(scale, V<T>::load(s + k * lds + i, cnt)) - sh;
      exp_inplace<T>(e);
      V<T>::store(a + k * lda + i, e, cnt);
    }
  }
}

// w[k, i] = exp(scale * s[k, i] - shift[k]); rowsum[k] += sum_i w[k, i] when rowsum is given.
template <typename T, int kBytes = 32>
__attribute__((always_inline)) inline void exp_rows_body(T* w, int64_t ldw, const T* s,
                                                         int64_t lds, int64_t K, int64_t n,
                                                         T scale, const T* shift, T* rowsum) {
  using W = V<T, kBytes>;
  constexpr int64_t L = W::kL;
  for (int64_t k = 0; k < K; ++k) {
    const typename W::vt sh = W::all(shift[k]);
    typename W::vt acc = {};
    int64_t i = 0;
    for (; i + L <= n; i += L) {  // whole vectors
      typename W::vt e = W::scaled(scale, W::load(s + k * lds + i, L)) - sh;
      exp_inplace<T, kBytes>(e);
      W::store(w + k * ldw + i, e, L);
      acc += e;
    }
    if (i < n) {  // the row's partial vector
      const int64_t cnt = n - i;
      typename W::vt e = W::scaled(scale, W::load(s + k * lds + i, cnt)) - sh;
      exp_inplace<T, kBytes>(e);
      W::store(w + k * ldw + i, e, cnt);
      for (int64_t j = cnt; j < L; ++j) e[j] = 0;  // unused lanes
      acc += e;
    }
    if (rowsum != nullptr) rowsum[k] += W::sum(acc);
  }
}

// m[k] = max(m[k], max_i scale * s[k, i]), ignoring NaN.
template <typename T, int kBytes = 32>
__attribute__((always_inline)) inline void row_max_body(const T* s, int64_t lds, int64_t K,
                                                        int64_t n, T scale, T* m) {
  using W = V<T, kBytes>;
  constexpr int64_t L = W::kL;
  for (int64_t k = 0; k < K; ++k) {
    typename W::vt mv = W::all(m[k]);
    int64_t i = 0;
    for (; i + L <= n; i += L) {  // whole vectors
      const typename W::vt v = W::scaled(scale, W::load(s + k * lds + i, L));
      mv = v > mv ? v : mv;
    }
    if (i < n) {  // the row's partial vector; unused lanes must not raise the maximum
      typename W::vt v = W::scaled(scale, W::load(s + k * lds + i, n - i));
      for (int64_t j = n - i; j < L; ++j) v[j] = -static_cast<T>(INFINITY);
      mv = v > mv ? v : mv;
    }
    m[k] = W::max(mv);  // every lane started at m[k] and only ever grew
  }
}

// sums[k] += sum_i a[k, i].
template <typename T>
__attribute__((always_inline)) inline void add_row_sums_body(const T* a, int64_t lda, int64_t K,
                                                             int64_t n, T* sums) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t k = 0; k < K; ++k) {
    vec<T> acc = {};
    for (int64_t i = 0; i < n; i += L) acc += V<T>::load(a + k * lda + i, n - i < L ? n - i : L);
    sums[k] += V<T>::sum(acc);
  }
}

// Softmax backward down columns: with dd[k, i] = d[k, i] - offset[k] (offset optional),
// out[k, i] = scale * a[k, i] * (dd[k, i] - sum_k' a[k', i] dd[k', i]). out may be d.
template <typename T>
__attribute__((always_inline)) inline void softmax_grad_columns_body(
    T* out, int64_t ldo, const T* a, int64_t lda, const T* d, int64_t ldd, const T* offset,
    int64_t K, int64_t n, T scale) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t i = 0; i < n; i += L) {
    const int64_t cnt = n - i < L ? n - i : L;
    vec<T> dot = {};
    for (int64_t k = 0; k < K; ++k) {
      const T off = offset != nullptr ? offset[k] : T(0);
      dot += V<T>::load(a + k * lda + i, cnt) * (V<T>::load(d + k * ldd + i, cnt) - off);
    }
    for (int64_t k = 0; k < K; ++k) {
      const T off = offset != nullptr ? offset[k] : T(0);
      const vec<T> dd = V<T>::load(d + k * ldd + i, cnt) - off;
      V<T>::store(out + k * ldo + i, scale * (V<T>::load(a + k * lda + i, cnt) * (dd - dot)), cnt);
    }
  }
}

// Softmax backward along rows, with the row's dot product given:
// out[k, i] = scale * w[k, i] * (d[k, i] - offset[k]).
template <typename T>
__attribute__((always_inline)) inline void softmax_grad_rows_body(
    T* out, int64_t ldo, const T* w, int64_t ldw, const T* d, int64_t ldd, const T* offset,
    int64_t K, int64_t n, T scale) {
  for (int64_t k = 0; k < K; ++k) {
    const T off = offset[k];
    const T* wk = w + k * ldw;
    const T* dk = d + k * ldd;
    T* ok = out + k * ldo;
    for (int64_t i = 0; i < n; ++i) ok[i] = scale * (wk[i] * (dk[i] - off));
  }
}

}  // namespace softmax_detail

// Entry points, for float and double.
#define FASTCTX_CLASS_SOFTMAX_ENTRIES(T)                                                       \
  FASTCTX_SIMD_CLONES static inline void softmax_columns(T* a, int64_t lda, const T* s,        \
                                                         int64_t lds, int64_t K, int64_t n,    \
                                                         T scale, T* lse) {                    \
    softmax_detail::softmax_columns_body(a, lda, s, lds, K, n, scale, lse);                    \
  }                                                                                            \
  FASTCTX_SIMD_CLONES static inline void exp_columns(T* a, int64_t lda, const T* s,            \
                                                     int64_t lds, int64_t K, int64_t n,        \
                                                     T scale, const T* shift) {                \
    softmax_detail::exp_columns_body(a, lda, s, lds, K, n, scale, shift);                      \
  }                                                                                            \
  FASTCTX_SIMD_CLONES static inline void add_row_sums(const T* a, int64_t lda, int64_t K,      \
                                                      int64_t n, T* sums) {                    \
    softmax_detail::add_row_sums_body(a, lda, K, n, sums);                                     \
  }                                                                                            \
  FASTCTX_SIMD_CLONES static inline void softmax_grad_columns(                                 \
      T* out, int64_t ldo, const T* a, int64_t lda, const T* d, int64_t ldd, const T* offset,  \
      int64_t K, int64_t n, T scale) {                                                         \
    softmax_detail::softmax_grad_columns_body(out, ldo, a, lda, d, ldd, offset, K, n, scale);  \
  }                                                                                            \
  FASTCTX_SIMD_CLONES static inline void softmax_grad_rows(                                    \
      T* out, int64_t ldo, const T* w, int64_t ldw, const T* d, int64_t ldd, const T* offset,  \
      int64_t K, int64_t n, T scale) {                                                         \
    softmax_detail::softmax_grad_rows_body(out, ldo, w, ldw, d, ldd, offset, K, n, scale);     \
  }

FASTCTX_CLASS_SOFTMAX_ENTRIES(float)
FASTCTX_CLASS_SOFTMAX_ENTRIES(double)
#undef FASTCTX_CLASS_SOFTMAX_ENTRIES

// ---------------------------------------------------------------------------
// tile_gemm

namespace gemm_detail {

// RB rows x VB vectors of out, kept in registers while k runs:
//   out[r, j] (= or +=) sum_k coef[r * rs + k * ks] * x[k * ldx + j].
// Each element is its initial value (0 or out) plus the products in k order,
// whatever the block shape: results do not depend on the blocking.
// `count` < kLanes: one partial vector (VB = 1) of `count` lanes.
template <typename T, int kBytes, int RB, int VB>
__attribute__((always_inline)) inline void gemm_block(int64_t Kin, const T* coef, int64_t rs,
                                                      int64_t ks, const T* x, int64_t ldx, T* out,
                                                      int64_t ldo, bool accumulate, int64_t count) {
  typedef T vt __attribute__((vector_size(kBytes)));
  constexpr int64_t L = kBytes / sizeof(T);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  const bool full = count == L;
  vt acc[RB][VB];
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < VB; ++j) {
      acc[r][j] = vt{};
      if (!accumulate) continue;
      if (full) {
        std::memcpy(&acc[r][j], out + r * ldo + j * L, sizeof(vt));
      } else {
        std::memcpy(&acc[r][j], out + r * ldo, bytes);
      }
    }
  }
  for (int64_t k = 0; k < Kin; ++k) {
    vt xv[VB];
    for (int j = 0; j < VB; ++j) {
      if (full) {
        std::memcpy(&xv[j], x + k * ldx + j * L, sizeof(vt));
      } else {
        xv[j] = vt{};
        std::memcpy(&xv[j], x + k * ldx, bytes);
      }
    }
    for (int r = 0; r < RB; ++r) {
      const T c = coef[r * rs + k * ks];
      for (int j = 0; j < VB; ++j) acc[r][j] += c * xv[j];
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < VB; ++j) {
      if (full) {
        std::memcpy(out + r * ldo + j * L, &acc[r][j], sizeof(vt));
      } else {
        std::memcpy(out + r * ldo, &acc[r][j], bytes);
      }
    }
  }
}

// All R rows for one run of VB vectors (count lanes each when partial): blocks
// of RB rows, then the rest in blocks of RB/2, RB/4, ... rows.
template <typename T, int kBytes, int RB, int VB>
__attribute__((always_inline)) inline void gemm_rows(int64_t R, int64_t Kin, const T* coef,
                                                     int64_t rs, int64_t ks, const T* x,
                                                     int64_t ldx, T* out, int64_t ldo,
                                                     bool accumulate, int64_t count) {
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    gemm_block<T, kBytes, RB, VB>(Kin, coef + r * rs, rs, ks, x, ldx, out + r * ldo, ldo,
                                  accumulate, count);
  }
  if constexpr (RB > 1) {
    if (r < R) {
      gemm_rows<T, kBytes, RB / 2, VB>(R - r, Kin, coef + r * rs, rs, ks, x, ldx, out + r * ldo,
                                       ldo, accumulate, count);
    }
  }
}

// Register blocks: kAcc accumulator vectors as RB rows x VB vectors (rows
// capped at 16: each row costs a broadcast per step).
template <int kAcc, int VB>
constexpr int rows_per_block() {
  return kAcc / VB < 16 ? kAcc / VB : 16;
}

template <typename T, int kBytes, int kAcc, int VB>
__attribute__((always_inline)) inline void gemm_vectors(int64_t R, int64_t Kin, int64_t vectors,
                                                        const T* coef, int64_t rs, int64_t ks,
                                                        const T* x, int64_t ldx, T* out,
                                                        int64_t ldo, bool accumulate) {
  // `vectors` (< VB on the recursive calls) whole vectors, VB at a time.
  constexpr int64_t L = kBytes / sizeof(T);
  int64_t v = 0;
  for (; v + VB <= vectors; v += VB) {
    gemm_rows<T, kBytes, rows_per_block<kAcc, VB>(), VB>(R, Kin, coef, rs, ks, x + v * L, ldx,
                                                         out + v * L, ldo, accumulate, L);
  }
  if constexpr (VB > 1) {
    if (v < vectors) {
      gemm_vectors<T, kBytes, kAcc, VB - 1>(R, Kin, vectors - v, coef, rs, ks, x + v * L, ldx,
                                            out + v * L, ldo, accumulate);
    }
  }
}

template <typename T, int kBytes, int kAcc, int VB>
__attribute__((always_inline)) inline void gemm_body(int64_t R, int64_t Kin, int64_t n,
                                                     const T* coef, int64_t rs, int64_t ks,
                                                     const T* x, int64_t ldx, T* out, int64_t ldo,
                                                     bool accumulate) {
  constexpr int64_t L = kBytes / sizeof(T);
  const int64_t full = n / L;
  // Vector blocks outermost: the [Kin x VB*L] panel of x is reused by every row block.
  gemm_vectors<T, kBytes, kAcc, VB>(R, Kin, full, coef, rs, ks, x, ldx, out, ldo, accumulate);
  if (full * L < n) {
    gemm_rows<T, kBytes, rows_per_block<kAcc, 1>(), 1>(R, Kin, coef, rs, ks, x + full * L, ldx,
                                                       out + full * L, ldo, accumulate,
                                                       n - full * L);
  }
}

// One variant per instruction set, each with its vector width, accumulators
// and widest block that fit its register file (32 zmm; 16 ymm / xmm).
#ifdef FASTCTX_TILE_GEMM_ISAS
#define FASTCTX_TILE_GEMM_VARIANT(T, NAME, TARGET, BYTES, ACC, VB)                                \
  TARGET static void NAME(int64_t R, int64_t Kin, int64_t n, const T* coef, int64_t rs,          \
                          int64_t ks, const T* x, int64_t ldx, T* out, int64_t ldo, bool acc) { \
    gemm_body<T, BYTES, ACC, VB>(R, Kin, n, coef, rs, ks, x, ldx, out, ldo, acc);                \
  }
FASTCTX_TILE_GEMM_VARIANT(float, gemm_v4, __attribute__((target("arch=x86-64-v4"))), 64, 24, 4)
FASTCTX_TILE_GEMM_VARIANT(double, gemm_v4, __attribute__((target("arch=x86-64-v4"))), 64, 24, 4)
FASTCTX_TILE_GEMM_VARIANT(float, gemm_v3, __attribute__((target("arch=x86-64-v3"))), 32, 12, 3)
FASTCTX_TILE_GEMM_VARIANT(double, gemm_v3, __attribute__((target("arch=x86-64-v3"))), 32, 12, 3)
FASTCTX_TILE_GEMM_VARIANT(float, gemm_base, , 16, 12, 3)
FASTCTX_TILE_GEMM_VARIANT(double, gemm_base, , 16, 12, 3)
#undef FASTCTX_TILE_GEMM_VARIANT

// 2: x86-64-v4 (AVX-512), 1: x86-64-v3 (AVX2 + FMA), 0: baseline. Checked once.
inline int isa_level() {
  static const int level = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
  }();
  return level;
}
#endif

}  // namespace gemm_detail

// The body of a function with ISA variants NAME_v4, NAME_v3 and NAME_base:
// returns the machine's variant called with the arguments, or PORTABLE (one
// parenthesised callable) where the variants are not compiled.
#ifdef FASTCTX_TILE_GEMM_ISAS
#define FASTCTX_ISA_DISPATCH(NAME, PORTABLE, ...)        \
  switch (::fastctx::cpu::gemm_detail::isa_level()) {    \
    case 2: return NAME##_v4(__VA_ARGS__);               \
    case 1: return NAME##_v3(__VA_ARGS__);               \
    default: return NAME##_base(__VA_ARGS__);            \
  }
#else
#define FASTCTX_ISA_DISPATCH(NAME, PORTABLE, ...) return PORTABLE(__VA_ARGS__);
#endif

// out[r, i] = (accumulate ? out[r, i] : 0) + sum_{k < Kin} coef[r*rs + k*ks] * x[k*ldx + i]
// for r < R, i < n. The rows of x and out are vectors: n need not be a multiple
// of the vector width (the last vector is partial), but a multiple of 16
// keeps every row on the full-vector path. The results are the same on every
// call and thread (fixed order of the k sums); across instruction sets they
// may differ by rounding (FMA contraction).
template <typename T>
inline void tile_gemm(int64_t R, int64_t Kin, int64_t n, const T* coef, int64_t rs, int64_t ks,
                      const T* x, int64_t ldx, T* out, int64_t ldo, bool accumulate) {
  if (R <= 0 || n <= 0) return;
  FASTCTX_ISA_DISPATCH(gemm_detail::gemm, (gemm_detail::gemm_body<T, 32, 12, 3>), R, Kin, n, coef,
                       rs, ks, x, ldx, out, ldo, accumulate)
}

// ---------------------------------------------------------------------------
// exp_rows and row_max: at the vector width of the machine (16 fp32 lanes on
// AVX-512, as tile_gemm), because attention-sized rows spend as long in exp
// as in their products. Lane-wise results are the same at every width; a row
// sum's order of additions follows the width.

namespace softmax_detail {
#ifdef FASTCTX_TILE_GEMM_ISAS
#define FASTCTX_ROW_VARIANTS(T, ISA, TARGET, BYTES)                                               \
  TARGET static void exp_rows_##ISA(T* w, int64_t ldw, const T* s, int64_t lds, int64_t K,       \
                                    int64_t n, T scale, const T* shift, T* rowsum) {              \
    exp_rows_body<T, BYTES>(w, ldw, s, lds, K, n, scale, shift, rowsum);                          \
  }                                                                                               \
  TARGET static void row_max_##ISA(const T* s, int64_t lds, int64_t K, int64_t n, T scale,       \
                                   T* m) {                                                        \
    row_max_body<T, BYTES>(s, lds, K, n, scale, m);                                               \
  }
FASTCTX_ROW_VARIANTS(float, v4, __attribute__((target("arch=x86-64-v4"))), 64)
FASTCTX_ROW_VARIANTS(double, v4, __attribute__((target("arch=x86-64-v4"))), 64)
FASTCTX_ROW_VARIANTS(float, v3, __attribute__((target("arch=x86-64-v3"))), 32)
FASTCTX_ROW_VARIANTS(double, v3, __attribute__((target("arch=x86-64-v3"))), 32)
FASTCTX_ROW_VARIANTS(float, base, , 32)
FASTCTX_ROW_VARIANTS(double, base, , 32)
#undef FASTCTX_ROW_VARIANTS
#endif
}  // namespace softmax_detail

// w[k, i] = exp(scale * s[k, i] - shift[k]) for k < K, i < n (rows lds / ldw
// apart; w may be s); rowsum[k] += sum_i w[k, i] when rowsum is given.
template <typename T>
inline void exp_rows(T* w, int64_t ldw, const T* s, int64_t lds, int64_t K, int64_t n, T scale,
                     const T* shift, T* rowsum) {
  FASTCTX_ISA_DISPATCH(softmax_detail::exp_rows, (softmax_detail::exp_rows_body<T>), w, ldw, s, lds,
                       K, n, scale, shift, rowsum)
}

// m[k] = max(m[k], max_{i < n} scale * s[k, i]) for k < K, ignoring NaN.
template <typename T>
inline void row_max(const T* s, int64_t lds, int64_t K, int64_t n, T scale, T* m) {
  FASTCTX_ISA_DISPATCH(softmax_detail::row_max, (softmax_detail::row_max_body<T>), s, lds, K, n,
                       scale, m)
}

// ---------------------------------------------------------------------------
// Moving tiles

// Copies `rows` rows of n elements, `ld` apart, into a dense buffer with row
// stride ldd. An NCHW tile is C short rows N apart: more streams than the
// hardware prefetchers follow, so the copy prefetches the rows a few ahead.
template <typename T>
inline void pack_rows(T* dst, int64_t ldd, const T* src, int64_t ld, int64_t rows, int64_t n) {
  constexpr int64_t kAhead = 8;
  const int64_t lines = (n * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kAhead < rows) {
      const char* p = reinterpret_cast<const char*>(src + (r + kAhead) * ld);
      for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(p + l * 64, 0, 3);
    }
    std::memcpy(dst + r * ldd, src + r * ld, n * sizeof(T));
  }
}

namespace transpose_detail {

// Scalar, in blocks of 16 x 16 (either side stays in L1): double, and the
// ragged edges of the fp32 path.
template <typename T>
__attribute__((always_inline)) inline void transpose_scalar(T* dst, int64_t ldd, const T* src,
                                                            int64_t lds, int64_t K, int64_t n) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = i0 + kBlock < n ? i0 + kBlock : n;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = i0; i < i1; ++i) dst[i * ldd + k] = src[k * lds + i];
    }
  }
}

// An 8 x 8 float block in eight 8-lane registers: pairs interleaved, then
// pairs of pairs, then 128-bit halves exchanged (unpck / shufps / vperm2f128
// on AVX; the same shuffles on two SSE halves in the baseline build). A pure
// permutation: bit-exact on every instruction set.
typedef float f8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline void transpose_8x8(float* dst, int64_t ldd,
                                                         const float* src, int64_t lds) {
  f8 r[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * lds, sizeof(f8));
  // t: rows 2j and 2j+1 interleaved, within each 128-bit half.
  const f8 t0 = __builtin_shufflevector(r[0], r[1], 0, 8, 1, 9, 4, 12, 5, 13);
  const f8 t1 = __builtin_shufflevector(r[0], r[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const f8 t2 = __builtin_shufflevector(r[2], r[3], 0, 8, 1, 9, 4, 12, 5, 13);
  const f8 t3 = __builtin_shufflevector(r[2], r[3], 2, 10, 3, 11, 6, 14, 7, 15);
  const f8 t4 = __builtin_shufflevector(r[4], r[5], 0, 8, 1, 9, 4, 12, 5, 13);
  const f8 t5 = __builtin_shufflevector(r[4], r[5], 2, 10, 3, 11, 6, 14, 7, 15);
  const f8 t6 = __builtin_shufflevector(r[6], r[7], 0, 8, 1, 9, 4, 12, 5, 13);
  const f8 t7 = __builtin_shufflevector(r[6], r[7], 2, 10, 3, 11, 6, 14, 7, 15);
  // u: columns c and c + 4 of four rows (u0: 0/4, u1: 1/5, u2: 2/6, u3: 3/7; u4..u7 rows 4-7).
  const f8 u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  const f8 u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const f8 u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  const f8 u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const f8 u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
  const f8 u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const f8 u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
  const f8 u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  const f8 out[8] = {
      __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11),
      __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11),
      __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11),
      __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11),
      __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15),
      __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15),
      __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15),
      __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15)};
  for (int c = 0; c < 8; ++c) std::memcpy(dst + c * ldd, &out[c], sizeof(f8));
}

__attribute__((always_inline)) inline void transpose_body(float* dst, int64_t ldd, const float* src,
                                                          int64_t lds, int64_t K, int64_t n) {
  const int64_t K8 = K / 8 * 8, n8 = n / 8 * 8;
  for (int64_t i0 = 0; i0 < n8; i0 += 8) {
    for (int64_t k0 = 0; k0 < K8; k0 += 8) {
      transpose_8x8(dst + i0 * ldd + k0, ldd, src + k0 * lds + i0, lds);
    }
  }
  // The ragged edges: columns past n8 of every row, rows past K8 of the first n8 columns.
  transpose_scalar(dst + n8 * ldd, ldd, src + n8, lds, K, n - n8);
  transpose_scalar(dst + K8, ldd, src + K8 * lds, lds, K - K8, n8);
}

#ifdef FASTCTX_TILE_GEMM_ISAS
#define FASTCTX_TRANSPOSE_VARIANT(ISA, TARGET)                                                    \
  TARGET static void transpose_##ISA(float* dst, int64_t ldd, const float* src, int64_t lds,     \
                                     int64_t K, int64_t n) {                                      \
    transpose_body(dst, ldd, src, lds, K, n);                                                    \
  }
FASTCTX_TRANSPOSE_VARIANT(v4, __attribute__((target("arch=x86-64-v4"))))
FASTCTX_TRANSPOSE_VARIANT(v3, __attribute__((target("arch=x86-64-v3"))))
FASTCTX_TRANSPOSE_VARIANT(base, )
#undef FASTCTX_TRANSPOSE_VARIANT
#endif

}  // namespace transpose_detail

// dst[i, k] = src[k, i] for k < K, i < n: a [K x n] tile (row stride lds) to
// [n x K] (row stride ldd). Small tiles: K classes, or a window's tokens. fp32
// in 8 x 8 register blocks; the result is a copy, the same on every path.
template <typename T>
inline void transpose_rows(T* dst, int64_t ldd, const T* src, int64_t lds, int64_t K, int64_t n) {
  if (K <= 0 || n <= 0) return;
  if constexpr (std::is_same_v<T, float>) {
    FASTCTX_ISA_DISPATCH(transpose_detail::transpose, (transpose_detail::transpose_body), dst, ldd,
                         src, lds, K, n)
  } else {
    transpose_detail::transpose_scalar(dst, ldd, src, lds, K, n);
  }
}

}  // namespace cpu
}  // namespace fastctx
