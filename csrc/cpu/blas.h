#pragma once
// Raw-pointer BLAS for the CPU kernels' per-tile products (column-major
// convention), with MKL pinned to one thread inside a parallel task.
#include <ATen/ATen.h>
#include <ATen/native/TransposeType.h>

#include <type_traits>

// at::native::cpublas::gemm's float/double overloads are not exported from
// libtorch_cpu (not TORCH_API; linking them fails with an undefined symbol),
// but the Fortran BLAS entry points of the BLAS torch was built with (MKL) are,
// and those are what cpublas::gemm calls. Weak, so the extension still loads
// against a torch without them; blas_gemm then falls back to at::mm on views.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace fastctx {
namespace cpu {

using at::native::TransposeType;
constexpr auto kN = TransposeType::NoTranspose;
constexpr auto kT = TransposeType::Transpose;

// MKL chooses its blocking (hence summation order) from its thread setting;
// pinning it to 1 inside a chunk makes results independent of the outer
// thread count and avoids oversubscription.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas() {
    if (&MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (&MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// Row-major [cols, rows] view of a column-major [rows x cols] matrix (ld >= rows).
template <typename scalar_t>
inline at::Tensor col_major_view(const scalar_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// Column-major BLAS: C = alpha op(A) op(B) + beta C, op(A) [m x k], op(B) [k x n].
template <typename scalar_t>
inline void blas_gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, scalar_t alpha,
               const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t beta,
               scalar_t* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  auto* fn = [] {
    if constexpr (std::is_same_v<scalar_t, float>) return &sgemm_; else return &dgemm_;
  }();
#ifndef FASTCTX_FORCE_MM_FALLBACK
  if (fn != nullptr) {
    const char cta = ta == kN ? 'N' : 'T', ctb = tb == kN ? 'N' : 'T';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb),
              ildc = static_cast<int>(ldc);
    fn(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
#endif
  (void)fn;
  // C^T [n, m] = op(B)^T [n, k] @ op(A)^T [k, m] on row-major views.
  at::Tensor at_ = ta == kN ? col_major_view(a, m, k, lda) : col_major_view(a, k, m, lda).t();
  at::Tensor bt_ = tb == kN ? col_major_view(b, k, n, ldb) : col_major_view(b, n, k, ldb).t();
  at::Tensor ct_ = col_major_view<scalar_t>(c, m, n, ldc);
  if (k == 0) {
    ct_.mul_(beta);
  } else if (beta == scalar_t(0)) {
    ct_.copy_(at::mm(bt_, at_).mul_(alpha));
  } else {
    ct_.mul_(beta).add_(at::mm(bt_, at_), alpha);
  }
}

}  // namespace cpu
}  // namespace fastctx
